"""The benchmark scripts are not a package: the tests load them from benchmarks/ by file name."""

import importlib.util
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="session")
def load_benchmark():
    """``load_benchmark("name")``: benchmarks/name.py as a module (registered in ``sys.modules``, where dataclasses
    look their module up; scripts that import their neighbours put benchmarks/ on ``sys.path`` themselves)."""

    def load(name: str):
        spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        return module

    return load
