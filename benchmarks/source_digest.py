"""A digest of the source a benchmark ran: which code produced a results folder, without trusting ``.git``.

    python benchmarks/source_digest.py                      # the working tree (what a run here or on a copy runs)
    python benchmarks/source_digest.py --commit e68dcbd     # the same files as committed at e68dcbd
    python benchmarks/source_digest.py --check benchmarks/gpu_results/DIR/env.txt
                                                            # does the digest in env.txt match its commit's?

A machine that gets a copy of the working tree may carry a stale ``.git`` (``git rev-parse HEAD`` there named
78ef1bf for runs made at 0278b9c and e68dcbd), so a results folder records this digest next to the commit the
caller names. Equal digests mean the same bytes under ``ROOTS``, whatever ``.git`` says.

Digest: ``sha256`` over the sorted lines ``<path>\\0<sha256 of the file's bytes>\\n``, one per file under
``ROOTS`` (``dinoscale/``, ``benchmarks/``, ``tools/``, ``configs/``), paths relative to the repository root with
``/``. Files: those git would track in the working tree (``git ls-files --cached --others --exclude-standard``,
so ignored files such as ``__pycache__`` are out and untracked ones are in, and only those that exist), or every
regular file when there is no git; for ``--commit``, the files of that commit (``git ls-tree``). Left out in both:
the results folders ``EXCLUDED`` (a run writes its results there while it runs, and committing them must not
change the digest of the code). A symbolic link counts as its target path, as git stores it.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROOTS = ("dinoscale", "benchmarks", "tools", "configs")
EXCLUDED = ("benchmarks/gpu_results/", "benchmarks/cpu_results/")
# without git: the ignore rules that matter under ROOTS (see .gitignore)
_NO_GIT_SKIP_DIRS = {"__pycache__", ".pytest_cache"}
_NO_GIT_SKIP_SUFFIXES = (".pyc", ".egg-info")


def _included(path: str, roots: tuple[str, ...]) -> bool:
    return any(path == r or path.startswith(r + "/") for r in roots) and not path.startswith(EXCLUDED)


def digest_of(entries: dict[str, str]) -> str:
    """``sha256`` over ``<path>\\0<file sha256>\\n`` lines in path order (``entries``: path -> file sha256)."""
    h = hashlib.sha256()
    for path in sorted(entries):
        h.update(path.encode() + b"\0" + entries[path].encode() + b"\n")
    return h.hexdigest()


def _file_sha(path: Path) -> str:
    if path.is_symlink():
        return hashlib.sha256(os.readlink(path).encode()).hexdigest()
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _git(repo: Path, *args: str) -> bytes:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, check=True).stdout


def worktree_files(repo: Path = REPO, roots: tuple[str, ...] = ROOTS) -> list[str]:
    """Paths under ``roots`` that git would track here (see the module docstring), sorted."""
    try:
        out = _git(repo, "ls-files", "-z", "--cached", "--others", "--exclude-standard", "--", *roots)
        paths = {p for p in out.decode().split("\0") if p}
    except (OSError, subprocess.CalledProcessError):  # no git, or not a repository
        paths = set()
        for root in roots:
            for dirpath, dirnames, filenames in os.walk(repo / root):
                dirnames[:] = [d for d in dirnames if d not in _NO_GIT_SKIP_DIRS and not d.endswith(".egg-info")]
                for name in filenames:
                    if not name.endswith(_NO_GIT_SKIP_SUFFIXES):
                        paths.add((Path(dirpath) / name).relative_to(repo).as_posix())
    # the index may list files deleted since; a stale index misses none that exist (they are "others")
    return sorted(p for p in paths if _included(p, roots) and ((repo / p).is_file() or (repo / p).is_symlink()))


def worktree_digest(repo: Path = REPO, roots: tuple[str, ...] = ROOTS) -> tuple[str, int]:
    """(digest, number of files) of the working tree under ``roots``."""
    entries = {p: _file_sha(repo / p) for p in worktree_files(repo, roots)}
    return digest_of(entries), len(entries)


def commit_digest(commit: str, repo: Path = REPO, roots: tuple[str, ...] = ROOTS) -> tuple[str, int]:
    """(digest, number of files) of ``commit``'s files under ``roots``, read from git's objects."""
    listing = _git(repo, "ls-tree", "-r", "-z", commit, "--", *roots).decode().split("\0")
    blobs = {}
    for line in filter(None, listing):
        meta, path = line.split("\t", 1)
        _mode, kind, sha = meta.split()
        if kind == "blob" and _included(path, roots):
            blobs[path] = sha
    # one `git cat-file --batch` for all blobs: "<sha> blob <size>\n<bytes>\n" per object
    request = "".join(f"{sha}\n" for sha in blobs.values()).encode()
    out = subprocess.run(["git", "-C", str(repo), "cat-file", "--batch"], input=request, capture_output=True,
                         check=True).stdout
    entries, pos = {}, 0
    for path, sha in blobs.items():
        header_end = out.index(b"\n", pos)
        got_sha, _kind, size = out[pos:header_end].decode().split()
        if got_sha != sha:
            raise RuntimeError(f"git cat-file answered {got_sha} for {sha} ({path})")
        start = header_end + 1
        entries[path] = hashlib.sha256(out[start:start + int(size)]).hexdigest()
        pos = start + int(size) + 1
    return digest_of(entries), len(entries)


def read_env(path: Path) -> dict[str, str]:
    """``key: value`` lines of a results folder's env.txt."""
    fields = {}
    for line in Path(path).read_text().splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip()] = value.strip()
    return fields


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--commit", help="digest of this commit's files instead of the working tree's")
    group.add_argument("--check", metavar="ENV_TXT",
                       help="compare the 'source digest' of a results folder's env.txt with its 'commit''s")
    parser.add_argument("--repo", default=str(REPO), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    repo = Path(args.repo)
    if args.check:
        env = read_env(Path(args.check))
        recorded, commit = env.get("source digest", "").split(" ")[0], env.get("commit", "").split(" ")[0]
        if not recorded or not commit or commit == "unverified":
            print(f"{args.check}: no 'source digest' or no verified 'commit' line; nothing to compare", file=sys.stderr)
            return 2
        digest, n = commit_digest(commit, repo)
        same = recorded == f"sha256:{digest}"
        print(f"{args.check}: recorded {recorded}; commit {commit}: sha256:{digest} ({n} files) -> "
              f"{'MATCH' if same else 'DIFFERENT: the run did not run this commit as committed'}")
        return 0 if same else 1
    if args.commit:
        digest, n = commit_digest(args.commit, repo)
        where = f"commit {args.commit}"
    else:
        digest, n = worktree_digest(repo)
        where = "working tree"
    print(f"sha256:{digest} ({n} files under {', '.join(ROOTS)}; {where})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
