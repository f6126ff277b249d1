"""The imports of ``autocompress`` run one way: no module reaches itself again through imports.

Every import counts, at module level or inside a function (an import moved into a function still
makes the two modules depend on each other; it only hides the loop until that function runs).
Imports under ``if TYPE_CHECKING:`` do not count: they never run. Importing ``a.b.c`` also runs
the package ``a.b``'s ``__init__``, so that edge counts too — except for the root package, which
imports nothing of its own at module level (checked below), so an edge into it can close no loop.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "autocompress"

# Cycles that run through files this change could not touch, each named with why it is allowed.
# Empty: every loop is broken.
ALLOWED: frozenset[frozenset[str]] = frozenset()


def _modules(root: Path) -> dict[str, Path]:
    out = {}
    for f in sorted(root.rglob("*.py")):
        parts = list(f.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST) -> list[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Give every import statement that can run, with whether it is at module level."""
    found: list[tuple[ast.Import | ast.ImportFrom, bool]] = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                for n in child.orelse:
                    visit_one(n, top)
                continue
            visit_one(child, top)

    def visit_one(node: ast.AST, top: bool) -> None:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append((node, top))
            return
        visit(node, top and not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(tree, True)
    return found


def import_graph(root: Path = ROOT) -> dict[str, dict[str, int]]:
    """Give, for each module of the package at ``root``, the modules it imports and the line of the first import."""
    mods = _modules(root)
    top_package = root.name

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, dict[str, int]] = {}
    for mod, path in mods.items():
        is_pkg = path.name == "__init__.py"
        edges: dict[str, int] = {}
        for node, _top in _imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [resolve(a.name) for a in node.names]
            else:
                if node.level:
                    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    base = base[: len(base) - node.level + 1]
                    src = ".".join([*base, *([node.module] if node.module else [])])
                else:
                    src = node.module or ""
                targets = [f"{src}.{a.name}" if f"{src}.{a.name}" in mods else resolve(src) for a in node.names]
            for t in targets:
                if t is None or not t.startswith(top_package):
                    continue
                edges.setdefault(t, node.lineno)
                parts = t.split(".")
                for i in range(2, len(parts)):  # the packages whose __init__ this import runs (not the root)
                    parent = ".".join(parts[:i])
                    if parent in mods and not mod.startswith(parent + "."):
                        edges.setdefault(parent, node.lineno)
        edges.pop(mod, None)
        graph[mod] = edges
    return graph


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Give the strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def connect(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                connect(w)
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
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


def _describe(graph: dict[str, dict[str, int]], comp: list[str]) -> str:
    members = set(comp)
    return "; ".join(f"{a}:{line} -> {b}" for a in comp for b, line in graph[a].items() if b in members)


def test_no_import_cycles() -> None:
    graph = import_graph()
    assert len(graph) > 50 and "autocompress.model.loading" in graph  # the walk found the package
    bad = [c for c in cycles(graph) if frozenset(c) not in ALLOWED]
    assert not bad, "import cycles: " + " | ".join(_describe(graph, c) for c in bad)


def test_the_root_package_imports_nothing_of_its_own_at_module_level() -> None:
    """Why edges into ``autocompress`` itself are left out: its __init__ can close no loop at import time."""
    tree = ast.parse((ROOT / "__init__.py").read_text())
    own = [
        n.module
        for n, top in _imports(tree)
        if top and isinstance(n, ast.ImportFrom) and (n.module or "").startswith("autocompress")
    ]
    assert own == ["autocompress._version"]


def test_the_walk_sees_a_loop_hidden_in_a_function(tmp_path) -> None:
    pkg = tmp_path / "autocompress"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from autocompress.sub.b import g\n")
    (pkg / "a.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from autocompress import c\n")
    (pkg / "c.py").write_text("import autocompress.a\n")
    (pkg / "sub" / "b.py").write_text("def g():\n    from autocompress.d import h\n    return h\n")
    (pkg / "d.py").write_text("from autocompress.sub import b\n\ndef h():\n    return 1\n")
    graph = import_graph(pkg)
    assert graph["autocompress.a"] == {}  # TYPE_CHECKING imports never run
    assert cycles(graph) == [["autocompress.d", "autocompress.sub", "autocompress.sub.b"]]


# The cost side (profiles, the cost model, fits of given timings) never builds or runs a model file:
# what compresses, exports or runs a model reaches hardware/, not the other way round.
COST_SIDE = "autocompress.hardware"
WEIGHT_SIDE = ("autocompress.compress", "autocompress.export", "autocompress.runtime", "autocompress.workbench")


def reached_from(graph: dict[str, dict[str, int]], prefix: str) -> dict[str, list[str]]:
    """Give each module the modules under ``prefix`` reach through imports (any depth), with one path to it."""
    paths = {m: [m] for m in graph if m == prefix or m.startswith(prefix + ".")}
    todo = list(paths)
    while todo:
        v = todo.pop()
        for w in graph.get(v, {}):
            if w not in paths:
                paths[w] = [*paths[v], w]
                todo.append(w)
    return paths


def _under(mod: str, packages: tuple[str, ...]) -> bool:
    return any(mod == p or mod.startswith(p + ".") for p in packages)


def test_hardware_reaches_nothing_that_builds_or_runs_a_model() -> None:
    graph = import_graph()
    paths = reached_from(graph, COST_SIDE)
    assert "autocompress.hardware.cost" in paths and "autocompress.plan" in paths  # the walk found the package
    bad = [" -> ".join(p) for m, p in sorted(paths.items()) if _under(m, WEIGHT_SIDE)]
    assert not bad, "hardware/ imports the weight side: " + " | ".join(bad)


def test_the_hardware_rule_sees_an_import_inside_a_function_two_modules_away(tmp_path) -> None:
    pkg = tmp_path / "autocompress"
    (pkg / "hardware").mkdir(parents=True)
    (pkg / "export").mkdir()
    for init in (pkg, pkg / "hardware", pkg / "export"):
        (init / "__init__.py").write_text("")
    (pkg / "hardware" / "fit.py").write_text("from autocompress import plan\n")
    (pkg / "plan.py").write_text("def f():\n    from autocompress.export.onnx import g\n    return g\n")
    (pkg / "export" / "onnx.py").write_text("def g():\n    return 1\n")
    paths = reached_from(import_graph(pkg), "autocompress.hardware")
    assert paths["autocompress.export.onnx"] == [
        "autocompress.hardware.fit",
        "autocompress.plan",
        "autocompress.export.onnx",
    ]
