"""The package's map holds (notes/architecture.md): every package imports only from the layers below it,
and no file imports itself back through others. Imports are read from the source (``ast``), at any depth
of a module (an import inside a function counts as much as one at the top)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "cellsam_ray"
LAYERS = [  # lowest first; a module imports from its own package and from lower layers, never from above
    ("errors", "version"),
    ("tiling", "evaluate", "device", "segmenter"),
    ("io",),
    ("model",),
    ("spec", "report", "merge", "synth"),
    ("pipeline",),
    ("table", "qc"),
    ("driver",),
    ("train",),
    ("jobspec", "jobclient", "schemas"),
    ("testing",),
    ("oracle",),
    ("bench",),
    ("commands",),
    ("cli", "__init__"),
]
LAYER = {room: depth for depth, rooms in enumerate(LAYERS) for room in rooms}


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The package's modules that ``name`` imports (for ``from a import b``: a.b where that is a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                base = ".".join(here[: len(here) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def room(module: str) -> str:
    """The top-level module or package a module belongs to ("__init__" for the package's face)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def test_every_top_level_module_and_package_has_a_layer():
    rooms = {room(name) for name in modules()}
    assert rooms - set(LAYER) == set(), "place the new module in LAYERS (and in notes/architecture.md)"
    assert set(LAYER) - rooms == set()


def test_no_import_reaches_up_or_across_a_layer():
    upward = sorted(f"{a} -> {b}" for a, targets in graph().items() for b in targets
                    if room(a) != room(b) and LAYER[room(b)] >= LAYER[room(a)])
    assert upward == []


def test_no_import_circle_between_files():
    edges = graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    assert circles == []



def test_the_face_imports_its_names_on_first_use():
    """``import cellsam_ray`` costs nothing (the model's code runs where Ray and zarr are missing); its three
    names are the API's own."""
    code = ("import sys, cellsam_ray; import cellsam_ray.model.geometry; "
            "assert not {'ray', 'zarr', 'torch'} & set(sys.modules), sorted(sys.modules); "
            "from cellsam_ray import SegmentSpec, open_labels, segment; "
            "from cellsam_ray.driver.api import segment as api; assert segment is api; "
            "assert SegmentSpec.__module__ == 'cellsam_ray.spec' and open_labels.__module__ == 'cellsam_ray.io.ngff'")
    subprocess.run([sys.executable, "-c", code], check=True)
