"""The package's shape, checked from its source with ``ast``: layers, cycles, cheap ``--help``, short functions.

The layers (lowest first; a module may import its own layer and those below, never above):

    errors, config, hashing, tiling           plain data and pure geometry
    io, models, report                        readers and writers, networks, reports
    weights, segmenters                       checkpoints and coarse segmenters
    refiners                                  the methods behind the refiner protocol
    engine                                    tiles, levels, outputs, resume
    api, segment, evaluate, evaluation_io,    the library calls
    overlay, batch, review
    train                                     may import inference modules, never the reverse
    commands, cli                             the command line
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "refine_cli"

LAYERS = {
    "refine_cli": 0, "refine_cli.__main__": 9, "refine_cli._bundled": 0, "refine_cli.devtools": 8,
    "refine_cli.errors": 0, "refine_cli.config": 0, "refine_cli.hashing": 0, "refine_cli.tiling": 0,
    "refine_cli.io": 1, "refine_cli.models": 1, "refine_cli.report": 1,
    "refine_cli.weights": 2, "refine_cli.segmenters": 2,
    "refine_cli.refiners": 3,
    "refine_cli.engine": 4,
    "refine_cli.api": 5, "refine_cli.segment": 5, "refine_cli.evaluate": 5, "refine_cli.evaluation_io": 5,
    "refine_cli.overlay": 5, "refine_cli.batch": 5, "refine_cli.review": 5, "refine_cli.cluster": 5,
    "refine_cli.train": 7,
    "refine_cli.commands": 9, "refine_cli.cli": 9,
}
"""Layer of each top-level module or subpackage (a module belongs to its longest listed prefix)."""

INFERENCE = ("refiners", "engine", "io", "models", "tiling", "api", "weights", "segmenters", "report")
"""Packages that never import ``train``, ``commands`` or ``cli``."""

MAX_LINES = 80
"""No function longer than this (from its first decorator to its last line)."""


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.with_suffix("").relative_to(PACKAGE.parent).parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = path
    return mods


MODULES = _modules()


def _resolve(module: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The ``refine_cli`` modules an import statement names (``from pkg import mod`` included)."""
    is_pkg = MODULES[module].name == "__init__.py"
    names: list[str] = []
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        if node.level:
            base = module.split(".")[: len(module.split(".")) - node.level + (1 if is_pkg else 0)]
            prefix = ".".join(base + ([node.module] if node.module else []))
        else:
            prefix = node.module or ""
        names = [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in MODULES else prefix for a in node.names]
    found = []
    for name in names:
        while name and name not in MODULES:
            name = name.rpartition(".")[0]
        if name.startswith("refine_cli"):
            found.append(name)
    return found


def _imports(module: str, top_level_only: bool = False) -> set[str]:
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    out: set[str] = set()
    for node in nodes:
        if top_level_only and isinstance(node, ast.If):  # `if TYPE_CHECKING:` blocks import nothing at run time
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            out.update(t for t in _resolve(module, node) if t != module)
    return out


def _layer(module: str) -> int:
    best = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return LAYERS[best]


GRAPH = {m: _imports(m) for m in MODULES}


def test_every_module_has_a_layer():
    assert all(any(m == p or m.startswith(p + ".") for p in LAYERS) for m in MODULES)


def test_no_import_cycles():
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(GRAPH[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for m in sorted(GRAPH):
        if m not in index:
            visit(m)
    assert not cycles, f"import cycles: {cycles}"


def test_layers_only_import_downwards():
    upward = sorted(f"{m} -> {t}" for m, targets in GRAPH.items() for t in targets if _layer(t) > _layer(m))
    assert not upward, "imports that climb the layers:\n" + "\n".join(upward)


@pytest.mark.parametrize("package", INFERENCE)
def test_inference_never_imports_training_or_the_command_line(package):
    bad = sorted(f"{m} -> {t}" for m, targets in GRAPH.items()
                 if m == f"refine_cli.{package}" or m.startswith(f"refine_cli.{package}.")
                 for t in targets if t.split(".")[1:2] in (["train"], ["commands"], ["cli"]))
    assert not bad, bad


def test_no_module_level_torch_or_opencv_import_reachable_from_help():
    seen: set[str] = set()
    todo = ["refine_cli.cli", "refine_cli.__main__"]
    heavy = []
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        tree = ast.parse(MODULES[m].read_text(encoding="utf-8"))
        for node in tree.body:
            if isinstance(node, ast.Import):
                heavy += [f"{m}: import {a.name}" for a in node.names if a.name.split(".")[0] in ("torch", "cv2")]
            elif isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").split(".")[0] in (
                    "torch", "cv2"):
                heavy.append(f"{m}: from {node.module} import ...")
        todo += [t for t in _imports(m, top_level_only=True) if t not in seen]
        todo += [p for p in _parents(m) if p not in seen]
    assert not heavy, heavy


def _parents(module: str) -> list[str]:
    """Packages whose ``__init__`` runs when ``module`` is imported."""
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts)) if ".".join(parts[:i]) in MODULES]


def test_help_does_not_import_torch():
    code = "import sys; from refine_cli.cli import app; print('torch' in sys.modules, 'cv2' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_no_function_over_80_lines():
    long = []
    for m, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                start = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                span = (node.end_lineno or node.lineno) - start + 1
                if span > MAX_LINES:
                    long.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name} ({span} lines)")
    assert not long, "functions over 80 lines:\n" + "\n".join(sorted(long))
