"""No import cycle among dinoscale's modules, function-local imports counted (tools/check_imports.py)."""

from __future__ import annotations

import importlib.util
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _checker():
    spec = importlib.util.spec_from_file_location("check_imports", REPO / "tools" / "check_imports.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_package_has_no_import_cycle():
    checker = _checker()
    graph = checker.import_graph(checker.module_files(REPO))
    assert "dinoscale.train.loop" in graph and "dinoscale.data.loader" in graph
    assert checker.cycles(graph) == []


def test_a_cycle_behind_a_function_local_import_is_found(tmp_path):
    checker = _checker()
    package = tmp_path / "dinoscale"
    (package / "data").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "data" / "__init__.py").write_text("")
    (package / "data" / "a.py").write_text("from dinoscale.data.b import thing\n")
    (package / "data" / "b.py").write_text(textwrap.dedent("""
        def thing():
            from dinoscale.data import a  # hidden inside a function
            return a
    """))
    (package / "data" / "c.py").write_text("from . import a\n")  # relative: an edge, no cycle
    graph = checker.import_graph(checker.module_files(tmp_path))
    assert graph["dinoscale.data.c"] == {"dinoscale.data.a"}
    assert checker.cycles(graph) == [["dinoscale.data.a", "dinoscale.data.b"]]
    assert checker.main(["--root", str(tmp_path)]) == 1
