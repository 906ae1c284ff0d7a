"""benchmarks/source_digest.py: the digest of a working tree equals its commit's, changes with one byte of a
source file, and ignores what is not source (ignored files, the results folders); git's and the no-git listing
agree; --check compares an env.txt with its commit."""

import subprocess

import pytest


@pytest.fixture(scope="module")
def sd(load_benchmark):
    return load_benchmark("source_digest")


def _git(repo, *args):
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True).stdout.strip()


@pytest.fixture
def repo(tmp_path):
    files = {
        "dinoscale/a.py": "x = 1\n",
        "dinoscale/sub/b.py": "y = 2\n",
        "benchmarks/run.sh": "echo hi\n",
        "benchmarks/gpu_results/old/env.txt": "commit: abc\n",
        "configs/c.yaml": "a: 1\n",
        "tools/t.py": "pass\n",
        "README.md": "not under the roots\n",
        ".gitignore": "__pycache__/\n",
    }
    for path, text in files.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(text)
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", "-A")
    _git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "c")
    return tmp_path


def test_worktree_digest_equals_the_commit_digest_and_is_stable(sd, repo):
    first, n = sd.worktree_digest(repo)
    assert n == 5  # the results folder and README.md are not counted
    assert sd.worktree_digest(repo) == (first, n)
    assert sd.commit_digest("HEAD", repo) == (first, n)


def test_one_changed_byte_changes_the_digest(sd, repo):
    clean, _ = sd.worktree_digest(repo)
    (repo / "dinoscale/sub/b.py").write_text("y = 3\n")
    changed, _ = sd.worktree_digest(repo)
    assert changed != clean
    assert sd.commit_digest("HEAD", repo)[0] == clean  # the commit is what was committed
    (repo / "dinoscale/sub/b.py").write_text("y = 2\n")
    assert sd.worktree_digest(repo)[0] == clean


def test_a_new_or_renamed_file_changes_the_digest(sd, repo):
    clean, n = sd.worktree_digest(repo)
    (repo / "tools/new.py").write_text("")  # untracked but not ignored: a device copy carries it
    assert sd.worktree_digest(repo) != (clean, n)
    (repo / "tools/new.py").unlink()
    (repo / "tools/t.py").rename(repo / "tools/u.py")
    assert sd.worktree_digest(repo)[0] != clean


def test_ignored_files_and_results_folders_do_not_count(sd, repo):
    clean = sd.worktree_digest(repo)
    (repo / "dinoscale/__pycache__").mkdir()
    (repo / "dinoscale/__pycache__/a.cpython-312.pyc").write_bytes(b"\0")
    (repo / "benchmarks/gpu_results/new").mkdir()
    (repo / "benchmarks/gpu_results/new/step.txt").write_text("171 img/s\n")
    (repo / "benchmarks/cpu_results").mkdir()
    (repo / "benchmarks/cpu_results/env.txt").write_text("x\n")
    assert sd.worktree_digest(repo) == clean


def test_without_git_the_same_files_count(sd, repo):
    clean = sd.worktree_digest(repo)
    (repo / "dinoscale/__pycache__").mkdir()
    (repo / "dinoscale/__pycache__/a.cpython-312.pyc").write_bytes(b"\0")
    subprocess.run(["rm", "-rf", str(repo / ".git")], check=True)
    assert sd.worktree_digest(repo) == clean


def test_check_compares_env_txt_with_its_commit(sd, repo, capsys):
    digest, _ = sd.worktree_digest(repo)
    head = _git(repo, "rev-parse", "HEAD")
    env = repo / "env.txt"
    env.write_text(f"date: 2026-11-28T05:37:15Z\ncommit: {head} (given with --commit)\n"
                   f"source digest: sha256:{digest} (5 files)\n")
    assert sd.main(["--repo", str(repo), "--check", str(env)]) == 0
    assert "MATCH" in capsys.readouterr().out
    env.write_text(f"commit: {head}\nsource digest: sha256:{'0' * 64}\n")
    assert sd.main(["--repo", str(repo), "--check", str(env)]) == 1
    env.write_text("commit: unverified\nsource digest: sha256:abc\n")
    assert sd.main(["--repo", str(repo), "--check", str(env)]) == 2
