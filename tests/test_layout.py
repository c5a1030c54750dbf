"""The layers the folders promise, checked on every import statement (function-local ones included):

    tuning/    Ray Tune sweeps                       may import actors/ and pipeline/
    actors/    the Ray runtime: shells, pools, sync, the driver loop, the CLI   may import pipeline/
    pipeline/  the library, runs without Ray         imports neither, and never `ray`

inside the library, each room imports only rooms on its floor or below (`FLOORS`), no module reaches
itself through others (no import circle anywhere), and the pure math imports nothing but torch and the
registry.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
ALLOWED = {"pipeline": {"pipeline"}, "actors": {"pipeline", "actors"}, "tuning": {"pipeline", "actors", "tuning"}}
PROJECT = set(ALLOWED)

# The library's floors, bottom first: a room (a folder of pipeline/) or a top-level module may import its own
# floor and those below. Pure parts at the bottom; the contracts every room reads; the rooms; what the
# commands run on top.
FLOORS = [
    {"algorithms", "registry", "errors", "torch_env", "batch", "weights", "collective", "small_models",
     "tracking", "plots", "__init__"},
    {"config", "models", "checkpoint"},
    {"data"},
    {"rewards"},
    {"envs"},
    {"rollout"},
    {"trainers"},
    {"demo", "runs"},
]


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, top-level module) of every import in a file, wherever it sits."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def files(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


@pytest.mark.parametrize("folder", sorted(ALLOWED))
def test_folders_import_only_downward(folder):
    wrong = [f"{path.relative_to(ROOT)}:{line} imports {module}" for path in files(folder)
             for line, module in imports(path)
             if module.split(".")[0] in PROJECT and module.split(".")[0] not in ALLOWED[folder]]
    assert not wrong, wrong


def test_no_ray_outside_actors_and_tuning():
    wrong = [f"{path.relative_to(ROOT)}:{line} imports {module}" for path in files("pipeline")
             for line, module in imports(path) if module.split(".")[0] == "ray"]
    assert files("pipeline") and not wrong, wrong


def test_the_pure_math_imports_only_torch_and_the_registry():
    allowed = {"__future__", "torch", "typing", "dataclasses", "math", "pipeline.registry"}
    wrong = [f"{path.relative_to(ROOT)}:{line} imports {module}" for path in files("pipeline/algorithms")
             for line, module in imports(path)
             if module not in allowed and module.split(".")[0] not in ("torch",)
             and not module.startswith("pipeline.algorithms")]
    assert not wrong, wrong


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_graph() -> dict[str, set[str]]:
    """Project module -> the project modules it imports (`from pkg import mod` counts as importing `pkg.mod`)."""
    modules = {module_name(p): p for folder in sorted(PROJECT) for p in files(folder)}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                           for a in node.names]
            edges |= {t for t in targets if t in modules and t != name}
        graph[name] = edges
    return graph


def floor(module: str) -> int:
    parts = module.split(".")
    room = parts[1] if len(parts) > 1 else "__init__"
    found = [i for i, rooms in enumerate(FLOORS) if room in rooms]
    assert found, f"{module}: pipeline/{room} is on no floor of tests/test_layout.py's FLOORS; give it one"
    return found[0]


def test_rooms_import_only_their_floor_and_below():
    graph = module_graph()
    wrong = [f"{a} (floor {floor(a)}) imports {b} (floor {floor(b)})" for a, edges in graph.items()
             if a.startswith("pipeline") for b in edges if b.startswith("pipeline") and floor(b) > floor(a)]
    assert not wrong, wrong


def test_no_import_circle():
    graph, circles, state = module_graph(), [], {}

    def visit(node, path):                       # depth-first; a grey node met again closes a circle
        state[node] = "grey"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "grey":
                circles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "black"

    for start in sorted(graph):
        if start not in state:
            visit(start, [start])
    assert not circles, circles


def test_the_top_of_the_library_keeps_only_what_rooms_share():
    top = sorted(p.name for p in (ROOT / "pipeline").glob("*.py"))
    assert len(top) <= 16, top


TIERS = {"unit", "ray", "slow", "gpu"}


def _marks(decorators) -> set[str]:
    """Tier names among `@pytest.mark.X` / `pytest.mark.X` expressions (a list of them, as pytestmark allows)."""
    found = set()
    for node in decorators:
        for sub in ast.walk(node):
            if isinstance(sub, ast.Attribute) and isinstance(sub.value, ast.Attribute) and sub.value.attr == "mark":
                found.add(sub.attr)
    return found & TIERS


def test_every_test_carries_exactly_one_tier():
    """unit (pure, no Ray), ray (a local cluster), slow (end-to-end learning), gpu (CUDA): `-m unit` etc. must
    select every test of its tier and none of another (pyproject's --strict-markers refuses a misspelt one)."""
    wrong = []
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        tree = ast.parse(path.read_text(), str(path))
        module = set()
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "pytestmark" for t in node.targets):
                module = _marks([node.value])
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test_"):
                tiers = module | _marks(node.decorator_list)
                if len(tiers) != 1:
                    wrong.append(f"{path.name}:{node.lineno} {node.name}: {sorted(tiers) or 'no tier'}")
    assert not wrong, wrong


def test_the_check_sees_a_violation(tmp_path):
    """The walk finds a function-local `import ray` (what the layers test relies on)."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from ray.util import get_node_ip_address\n    import ray as r\n")
    assert imports(bad) == [(2, "ray.util"), (3, "ray")]
