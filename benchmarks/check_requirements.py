"""Which of dinoscale's requirements (``setup.py``) this Python cannot import, checked before a long run on a
machine that installs nothing (a lent GPU machine): one clear list at the start instead of an ImportError
minutes into the run.

    python benchmarks/check_requirements.py              # install_requires; exit 0 when all are there, else 1
    python benchmarks/check_requirements.py --extras dev # and an extra's requirements too

Prints one line per requirement: its installed version, ``MISSING`` (no module to import) or ``WRONG VERSION``
(installed, outside the specifier; checked where ``packaging`` can be imported). ``setup.py`` is read as text
(``ast``), not run. A requirement's import name is its distribution name with ``-`` as ``_`` unless
:data:`IMPORT_NAMES` says otherwise. ``benchmarks/gpu.sh`` runs this first; the wheels for what a bare GPU
machine lacks come from ``bash benchmarks/gpu_wheels.sh``.
"""

from __future__ import annotations

import argparse
import ast
import importlib.metadata
import importlib.util
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SETUP_PY = REPO / "setup.py"

# distribution name -> the module it installs, where the two differ by more than "-" -> "_"
IMPORT_NAMES = {
    "opencv-python-headless": "cv2",
    "pillow": "PIL",
    "scikit-image": "skimage",
    "scikit-learn": "sklearn",
}

_NAME = re.compile(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def read_requirements(setup_py: Path = SETUP_PY) -> tuple[list[str], dict[str, list[str]]]:
    """``(install_requires, extras_require)`` as written in ``setup_py``'s ``setup(...)`` call (literals only)."""
    tree = ast.parse(setup_py.read_text(encoding="utf-8"), filename=str(setup_py))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setup":
            keywords = {k.arg: k.value for k in node.keywords}
            install = ast.literal_eval(keywords["install_requires"]) if "install_requires" in keywords else []
            extras = ast.literal_eval(keywords["extras_require"]) if "extras_require" in keywords else {}
            return list(install), {name: list(reqs) for name, reqs in extras.items()}
    raise ValueError(f"no setup(...) call in {setup_py}")


def distribution_name(requirement: str) -> str:
    match = _NAME.match(requirement)
    if match is None:
        raise ValueError(f"cannot read a distribution name from the requirement {requirement!r}")
    return match.group(1)


def import_name(distribution: str) -> str:
    return IMPORT_NAMES.get(distribution.lower(), distribution.replace("-", "_"))


def check(requirement: str) -> tuple[str, str | None]:
    """``(distribution, problem)`` for one requirement string; ``problem`` is None when it is satisfied."""
    dist = distribution_name(requirement)
    if importlib.util.find_spec(import_name(dist)) is None:
        return dist, "MISSING"
    try:
        version = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return dist, None  # importable without metadata (a source tree on the path): nothing to compare
    try:
        from packaging.requirements import Requirement
    except ImportError:
        return dist, None
    specifier = Requirement(requirement).specifier
    if specifier and not specifier.contains(version, prereleases=True):
        return dist, f"WRONG VERSION {version} (wants {specifier})"
    return dist, None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--extras", default="", help="comma list of setup.py extras to check as well")
    parser.add_argument("--setup", type=Path, default=SETUP_PY, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    install, extras = read_requirements(args.setup)
    requirements = list(install)
    for extra in filter(None, args.extras.split(",")):
        if extra not in extras:
            parser.error(f"unknown extra {extra!r}; setup.py has {sorted(extras)}")
        requirements += extras[extra]
    problems = []
    for requirement in requirements:
        dist, problem = check(requirement)
        if problem is None:
            try:
                shown = importlib.metadata.version(dist)
            except importlib.metadata.PackageNotFoundError:
                shown = "importable"
        else:
            shown = problem
            problems.append(dist)
        print(f"  {dist:28s} {shown}")
    if problems:
        print(f"check_requirements: {len(problems)} of {len(requirements)} requirements not met: "
              f"{', '.join(problems)}", file=sys.stderr)
        return 1
    print(f"check_requirements: all {len(requirements)} requirements met ({sys.executable})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
