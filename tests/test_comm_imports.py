"""The collective modules import one way (``common`` at the bottom, ``collectives`` at the top).

Two checks: the static import graph of ``mpilm/comm/`` (every mpilm import at module level, none
inside a function, no cycle, and each module only imports those below it in ``LAYERS``), and
each module imported alone in a fresh interpreter with the package's ``__init__`` (which loads
``collectives`` first and so would hide a cycle) skipped.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

COMM = Path(__file__).resolve().parents[1] / "mpilm" / "comm"
# bottom to top: a module may import only modules of earlier layers (world and errors: the base)
LAYERS = [
    ("world",),
    ("common",),
    ("p2p", "shm", "tuning"),
    ("ring", "rhd", "tree", "mpi"),
    ("hier", "staging"),
    ("collectives",),
]
COLLECTIVE_MODULES = [name for layer in LAYERS for name in layer]


def _mpilm_imports(tree: ast.AST) -> list[tuple[str, bool]]:
    """``(imported comm module, at module level?)`` for every import of ``mpilm.comm.*``."""
    found = []
    top_level = {id(node) for node in tree.body}
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "mpilm.comm":
                names = [alias.name for alias in node.names]
            elif node.module.startswith("mpilm.comm."):
                names = [node.module.split(".")[2]]
        elif isinstance(node, ast.Import):
            names = [alias.name.split(".")[2] for alias in node.names if alias.name.startswith("mpilm.comm.")]
        found += [(name, id(node) in top_level) for name in names]
    return found


def test_comm_import_graph_is_layered_and_has_no_function_level_imports():
    layer_of = {name: i for i, layer in enumerate(LAYERS) for name in layer}
    for name in COLLECTIVE_MODULES:
        tree = ast.parse((COMM / f"{name}.py").read_text())
        for imported, at_top in _mpilm_imports(tree):
            assert at_top, f"comm/{name}.py imports mpilm.comm.{imported} inside a function"
            assert imported in layer_of, f"comm/{name}.py imports {imported}, which is above the collectives"
            assert layer_of[imported] < layer_of[name], (
                f"comm/{name}.py (layer {layer_of[name]}) imports {imported} (layer {layer_of[imported]})")


@pytest.mark.parametrize("name", COLLECTIVE_MODULES, ids=lambda name: f"comm.{name}")
def test_each_comm_module_imports_alone(name):
    # a bare package object stands in for mpilm.comm, so its __init__ (collectives) does not run
    code = (
        "import sys, types, importlib, mpilm\n"
        f"package = types.ModuleType('mpilm.comm'); package.__path__ = [{str(COMM)!r}]\n"
        "sys.modules['mpilm.comm'] = package\n"
        f"importlib.import_module('mpilm.comm.{name}')\n"
        "assert 'mpilm.comm.collectives' not in sys.modules or "
        f"{name!r} == 'collectives', 'imported collectives'\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-2000:]
