"""Import hygiene of lanton_dist: the planner and ``lanton-dist plan`` run with torch blocked, and the
package's import graph (every ``import`` of every module, at module or function level, parsed
with ``ast``) has no cycle."""
from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "lanton_dist"

#: Prepended to a ``python -c`` program: any ``import torch`` (or a torch submodule) raises.
BLOCK_TORCH = textwrap.dedent("""
    import sys

    class _NoTorch:
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ImportError(f"torch is blocked in this test (import {name})")
            return None

    sys.meta_path.insert(0, _NoTorch())
""")


def run_without_torch(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (this checkout first on the path) where torch cannot be imported."""
    return subprocess.run([sys.executable, "-c", BLOCK_TORCH + textwrap.dedent(code)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


# ------------------------------------------------------------------------------- torch-free planner
def test_the_torch_blocker_blocks_torch_and_what_imports_it():
    proc = run_without_torch("import lanton_dist.factory")
    assert proc.returncode != 0 and "torch is blocked in this test (import torch)" in proc.stderr, proc.stderr


def test_planner_modules_import_and_plan_every_strategy_with_torch_blocked():
    """``lanton_dist.plan`` and what it builds on (layouts, ranges, option names, the profiler's
    torch-free sampler and report) import without torch, and every registered strategy model —
    DeepSpeed's partitions included — plans a step without it."""
    proc = run_without_torch("""
        import lanton_dist.engine.ranges, lanton_dist.names, lanton_dist.profiling.report, lanton_dist.profiling.sampler
        from lanton_dist.plan import STRATEGY_MODELS, OptimSettings, ParallelLayout, StepPlanner
        for strategy in sorted(STRATEGY_MODELS):
            p = StepPlanner("llama-1b", ParallelLayout(nodes=1, gpus_per_node=3, strategy=strategy), OptimSettings(estimate_every=2))
            assert p.step_summary(2)["tensor_bytes"] > 0, strategy
        print("planned", sorted(STRATEGY_MODELS))
    """)
    assert proc.returncode == 0, proc.stderr
    assert "planned ['ddp', 'deepspeed', 'deepspeed3', 'fsdp2', 'zero1', 'zero2', 'zero3']" in proc.stdout


def test_plan_command_runs_with_torch_blocked():
    proc = run_without_torch("""
        from lanton_dist.cli import main
        raise SystemExit(main(["plan", "--model", "llama-1b", "--nodes", "1", "--gpus-per-node", "3", "--strategy", "deepspeed3",
                               "--growth-models", "llama-1b", "--ks", "10"]))
    """)
    assert proc.returncode == 0, proc.stderr
    assert "TP 1 x PP 1 x DP 3" in proc.stdout and "deepspeed3 validated against" in proc.stdout


# ------------------------------------------------------------------------------- import graph
Edge = tuple[str, str, str]  # (importer, imported, "file:line")


def module_files(root: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` under ``root/package`` (``__init__`` = the package)."""
    out = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _runtime_nodes(node: ast.AST) -> Iterator[ast.AST]:
    """Every node under ``node`` except the bodies of ``if TYPE_CHECKING:`` (never executed)."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
            for sub in child.orelse:
                yield sub
                yield from _runtime_nodes(sub)
            continue
        yield child
        yield from _runtime_nodes(child)


def lazy_export_map(tree: ast.Module) -> dict[str, str] | None:
    """``name -> module`` of a package ``__init__`` that calls ``lazy_exports(__name__, globals(),
    EXPORTS, ...)``: the module-level dict literal ``EXPORTS``. None if it makes no such call."""
    call = next((n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "lazy_exports"), None)
    if call is None:
        return None
    target = call.args[2]
    assert isinstance(target, ast.Name), f"lazy_exports' export map must be a module-level name, got {ast.unparse(target)}"
    for stmt in tree.body:
        names = [t.id for t in getattr(stmt, "targets", [getattr(stmt, "target", None)]) if isinstance(t, ast.Name)]
        if target.id in names and isinstance(stmt.value, ast.Dict):
            return {ast.literal_eval(k): ast.literal_eval(v) for k, v in zip(stmt.value.keys, stmt.value.values)}
    raise AssertionError(f"lazy_exports map {target.id} is not a module-level dict literal")


def import_edges(root: Path, package: str) -> list[Edge]:
    """Import edges between the modules of ``package``, at module and function level.

    ``from pkg import name`` is an edge to ``pkg.name`` when that is a module, to the module a
    package's lazy export map (:mod:`lanton_dist.lazy`) names for ``name`` (what the import runs),
    else to ``pkg`` itself. A lazy map is not an edge from the package: its entries load only when
    imported by name, and such imports are edges to their targets. ``if TYPE_CHECKING:`` imports
    never run and are not edges; a submodule's parent packages are not edges either (their
    ``__init__`` runs first, but imports nothing of the submodule back unless it says so).
    """
    files = module_files(root, package)
    trees = {name: ast.parse(path.read_text(), str(path)) for name, path in files.items()}
    lazy = {name: m for name, tree in trees.items() if files[name].name == "__init__.py" and (m := lazy_export_map(tree))}
    edges: list[Edge] = []
    for name, tree in trees.items():
        where = files[name].relative_to(root)
        here = name if files[name].name == "__init__.py" else name.rpartition(".")[0]
        for node in _runtime_nodes(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = here.split(".")[: len(here.split(".")) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                for alias in node.names:
                    if f"{base}.{alias.name}" in files:
                        targets.append(f"{base}.{alias.name}")
                    elif alias.name in lazy.get(base, {}):
                        targets.append(lazy[base][alias.name])
                    else:
                        targets.append(base)
            elif (isinstance(node, ast.Call) and ast.unparse(node.func) in ("importlib.import_module", "import_module")
                  and node.args and isinstance(node.args[0], ast.Constant)):
                targets = [node.args[0].value]
            for target in targets:
                while target and target not in files:  # `import a.b.c` of a name inside a module: its module
                    target = target.rpartition(".")[0]
                if target.startswith(package) and target != name:
                    edges.append((name, target, f"{where}:{node.lineno}"))
    return edges


def import_cycles(edges: list[Edge]) -> list[list[Edge]]:
    """One cycle (as its edges, in order) per strongly connected component of the graph that has one."""
    graph: dict[str, dict[str, Edge]] = {}
    for e in edges:
        graph.setdefault(e[0], {}).setdefault(e[1], e)
        graph.setdefault(e[1], {})
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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
            components.append(comp)

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10 * len(graph) + 100))
    try:
        for v in sorted(graph):
            if v not in index:
                connect(v)
    finally:
        sys.setrecursionlimit(limit)
    cycles = []
    for comp in components:
        if len(comp) < 2:
            continue
        members, start = set(comp), min(comp)
        # shortest path start -> ... -> start inside the component (breadth first)
        parent: dict[str, Edge] = {}
        frontier, seen, found = [start], {start}, None
        while frontier and found is None:
            nxt = []
            for v in frontier:
                for w, e in sorted(graph[v].items()):
                    if w == start:
                        found = e
                        break
                    if w in members and w not in seen:
                        seen.add(w)
                        parent[w] = e
                        nxt.append(w)
                if found:
                    break
            frontier = nxt
        path = [found]
        while path[0][0] != start:
            path.insert(0, parent[path[0][0]])
        cycles.append(path)
    return cycles


def format_cycle(cycle: list[Edge]) -> str:
    return " -> ".join([cycle[0][0]] + [f"{e[1]} ({e[2]})" for e in cycle])


def test_import_graph_finder_sees_relative_lazy_and_function_level_imports_but_not_type_checking(tmp_path):
    """The checker itself: on a toy package it finds exactly the cycles that run."""
    pkg = tmp_path / "toy"
    (pkg / "sub").mkdir(parents=True)
    files = {
        "__init__.py": """
            from toy.lazy import lazy_exports
            _LAZY = {"Thing": "toy.sub.thing"}
            __getattr__, __dir__ = lazy_exports(__name__, globals(), _LAZY, frozenset())
        """,
        "lazy.py": "def lazy_exports(*a): return None, None\n",
        "a.py": "from toy import Thing\n",                 # lazy export: an edge to toy.sub.thing
        "sub/__init__.py": "",
        "sub/thing.py": "def f():\n    from ..a import Thing\n",  # function-level, relative: back to toy.a
        "b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from toy.c import X\n",
        "c.py": "import toy.b\n",                           # b -> c only under TYPE_CHECKING: no cycle
    }
    for rel, text in files.items():
        (pkg / rel).write_text(textwrap.dedent(text))
    edges = import_edges(tmp_path, "toy")
    assert {(a, b) for a, b, _ in edges} == {("toy", "toy.lazy"), ("toy.a", "toy.sub.thing"), ("toy.sub.thing", "toy.a"),
                                            ("toy.c", "toy.b")}
    cycles = import_cycles(edges)
    assert [format_cycle(c) for c in cycles] == ["toy.a -> toy.sub.thing (toy/a.py:1) -> toy.a (toy/sub/thing.py:2)"]


def test_lanton_dist_import_graph_has_no_cycle():
    """No module of lanton_dist imports itself back, directly or through others (module-level,
    function-level and lazy-export imports all count)."""
    edges = import_edges(ROOT, PACKAGE)
    assert len(edges) > 100 and ("lanton_dist.plan.report", "lanton_dist.plan.planner") in {(a, b) for a, b, _ in edges}
    cycles = import_cycles(edges)
    assert not cycles, "import cycles:\n" + "\n".join(format_cycle(c) for c in cycles)

