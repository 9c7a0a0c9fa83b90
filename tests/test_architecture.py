"""The package's shape: imports flow one way through the layers, and modules stay small.

The layer order is written once, here (and drawn in docs/DEVELOPING.md). A module may import
from its own layer or any lower one; never from a higher one, and never in a circle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

PACKAGE = Path(__file__).resolve().parents[1] / "cytopipe"

# lowest first; a module is placed by the longest prefix of its dotted name listed here
LAYERS: list[tuple[str, ...]] = [
    (
        "cytopipe.errors",
        "cytopipe.schema",
        "cytopipe.config",
        "cytopipe.intervals",
        "cytopipe.peaks",
        "cytopipe._peakkernels",
        "cytopipe.tabular",
        "cytopipe.files",
        "cytopipe.arrowfiles",
        "cytopipe.pngchunks",
        "cytopipe.directio",
        "cytopipe.threads",
        "cytopipe._fcskernels",
        "cytopipe._transform_kernels",
        "cytopipe._dask_plugins",
    ),
    ("cytopipe.fcs", "cytopipe.panel", "cytopipe.manifest", "cytopipe.validate", "cytopipe.store"),
    ("cytopipe.qc",),
    ("cytopipe.compensation", "cytopipe.transforms"),
    ("cytopipe.gating",),
    ("cytopipe.cluster",),
    ("cytopipe.clinical", "cytopipe.stats", "cytopipe.simulate"),
    ("cytopipe.report",),
    (
        "cytopipe.workflow",
        "cytopipe.rerun",
        "cytopipe.pipeline",
        "cytopipe.export",
        "cytopipe.reconcile",
        "cytopipe.review",
    ),
    ("cytopipe.cli", "cytopipe.__main__", "cytopipe.serve"),
]
TOP = "cytopipe"  # the package's __init__: lazy names only (see cytopipe/__init__.py)


def _modules() -> dict[str, Path]:
    mods = {}
    for f in PACKAGE.rglob("*.py"):
        parts = list(f.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = f
    return mods


def import_graph() -> nx.DiGraph:
    """Edges module -> cytopipe module it imports (at any depth of the file, lazy imports included)."""
    mods = _modules()
    graph = nx.DiGraph()
    graph.add_nodes_from(mods)
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                targets = [
                    f"{module}.{a.name}" if f"{module}.{a.name}" in mods else module for a in node.names
                ]
            for target in targets:
                while target and target not in mods:
                    target = target.rsplit(".", 1)[0] if "." in target else ""
                if target.startswith("cytopipe") and target != name:
                    graph.add_edge(name, target)
    # importing a submodule runs its parent packages first: a module -> own-parent edge is no circle
    graph.remove_edges_from([(a, b) for a, b in list(graph.edges) if a.startswith(b + ".")])
    return graph


def layer_of(module: str) -> int:
    best, level = -1, None
    for i, names in enumerate(LAYERS):
        for prefix in names:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, level = len(prefix), i
    assert level is not None, f"{module} is in no layer: add it to LAYERS in {__file__}"
    return level


def test_no_import_circles():
    cycles = sorted(nx.simple_cycles(import_graph()), key=len)
    assert not cycles, "import circles:\n" + "\n".join(" -> ".join(c + c[:1]) for c in cycles[:10])


def test_imports_only_go_down_the_layers():
    upward = [
        f"{a} (layer {layer_of(a)}) imports {b} (layer {layer_of(b)})"
        for a, b in import_graph().edges
        if b != TOP and a != TOP and layer_of(b) > layer_of(a)
    ]
    assert not upward, "imports against the layer order:\n" + "\n".join(sorted(upward))


def test_long_modules_say_why_at_their_top():
    long = []
    for name, path in _modules().items():
        text = path.read_text(encoding="utf-8")
        if text.count("\n") > 620:
            doc = ast.get_docstring(ast.parse(text)) or ""
            if "Why one module" not in doc:
                long.append(f"{name}: {text.count(chr(10))} lines")
    assert not long, (
        "modules over ~600 lines without a 'Why one module' paragraph in their docstring:\n" + "\n".join(long)
    )
