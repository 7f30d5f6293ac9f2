"""The packages depend on each other one way (configs, shards, slurm, models, trainer, launch, ...: no
cycle), and the login-node modules import no torch, timm or deepspeed."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import slurmvision

pytestmark = pytest.mark.unit

ROOT = Path(slurmvision.__file__).parent
HEAVY = ("torch", "timm", "deepspeed", "torchvision")
# What runs on the login node: every module of these packages, and these top-level modules.
LOGIN_PACKAGES = ("configs", "slurm", "launch")
LOGIN_MODULES = ("slurmvision.cli", "slurmvision.checkpoints", "slurmvision.errors", "slurmvision.evaluate.inspect")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def unit(module: str) -> str:
    """The package a module belongs to (`slurmvision.trainer.loop` -> trainer); a top-level module is its own."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def imported_modules(path: Path) -> set[str]:
    """Every slurmvision module `path` imports, anywhere in it (inside functions too), absolute or relative."""
    module = module_name(path)
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            target = ".".join([*base, *([node.module] if node.module else [])])
            found.add(target)
            # `from slurmvision import checkpoints` imports a module, not a name of the package.
            found.update(
                f"{target}.{alias.name}"
                for alias in node.names
                if (ROOT.parent / f"{target}.{alias.name}".replace(".", "/")).with_suffix(".py").is_file()
            )
    return {name for name in found if name.startswith("slurmvision.")}


def package_graph() -> dict[str, dict[str, list[str]]]:
    """{package: {package it imports: [the modules that do, with the module they import]}}."""
    graph: dict[str, dict[str, list[str]]] = {}
    for path in sorted(ROOT.rglob("*.py")):
        source = module_name(path)
        for target in imported_modules(path):
            if unit(target) not in (unit(source), "slurmvision"):
                graph.setdefault(unit(source), {}).setdefault(unit(target), []).append(f"{source} -> {target}")
    return graph


def find_cycle(graph: dict[str, dict[str, list[str]]]) -> list[str]:
    """A cycle of packages, as [a, b, ..., a], or [] if there is none."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, {})):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return []

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return []


def test_the_graph_sees_every_kind_of_import(tmp_path):
    assert "slurmvision.trainer.entry" in imported_modules(ROOT / "launch" / "local.py")  # inside a function
    assert find_cycle({"a": {"b": []}, "b": {"c": []}, "c": {"a": []}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b": []}, "b": {}}) == []


def test_no_import_cycle_between_packages():
    graph = package_graph()
    cycle = find_cycle(graph)
    edges = [line for a, b in zip(cycle, cycle[1:]) for line in graph[a][b][:3]]
    assert not cycle, f"import cycle between packages {' -> '.join(cycle)}:\n" + "\n".join(edges)


def login_modules() -> list[str]:
    modules = [module_name(path) for package in LOGIN_PACKAGES for path in sorted((ROOT / package).rglob("*.py"))]
    return [*modules, *LOGIN_MODULES]


def test_login_modules_do_not_import_torch():
    modules = login_modules()
    assert "slurmvision.launch.coordinator" in modules and "slurmvision.slurm.client" in modules
    script = (
        "import importlib, json, sys\n"
        f"for name in {modules!r}:\n    importlib.import_module(name)\n"
        "print(json.dumps(sorted(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    loaded = set(json.loads(out.strip().splitlines()[-1]))
    assert not [m for m in HEAVY if m in loaded]
