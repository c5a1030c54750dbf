"""The layers the folders promise, checked on every import statement (function-local ones included):

    tuning/    Ray Tune sweeps                       may import actors/ and pipeline/
    actors/    the Ray runtime: shells, pools, sync, the driver loop, the CLI   may import pipeline/
    pipeline/  the library, runs without Ray         imports neither, and never `ray`

and the pure math imports nothing but torch and the registry.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
ALLOWED = {"pipeline": {"pipeline"}, "actors": {"pipeline", "actors"}, "tuning": {"pipeline", "actors", "tuning"}}
PROJECT = set(ALLOWED)


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


def test_the_check_sees_a_violation(tmp_path):
    """The walk finds a function-local `import ray` (what the layers test relies on)."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from ray.util import get_node_ip_address\n    import ray as r\n")
    assert imports(bad) == [(2, "ray.util"), (3, "ray")]
