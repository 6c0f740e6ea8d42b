"""The package's import graph: no cycles (imports inside functions count) and low layers stay low."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import deploytool

PACKAGE = Path(deploytool.__file__).parent
#: the layers of docs/architecture.md, by module (a package stands for all its modules)
LAYERS = {
    0: ["deploytool", "errors", "deps", "io", "dtypes", "signature", "artifacts", "machine", "batch_sizes", "progress"],
    1: ["nn", "moe", "hf", "checkpoints", "dispatch", "losses", "models", "data", "tokens", "feeds", "model_io", "compare", "kernels", "ops", "recipes"],
    2: ["export", "engine", "runners", "training", "metrics", "lm"],
    3: ["parity", "benchmark", "serving", "runtime", "diagnostics"],
    4: ["pipeline", "penalty_study", "finetune"],
    5: ["cli"],
}


def layer_of(module: str) -> int:
    parts = module.split(".")
    name = parts[1] if len(parts) > 1 else "deploytool"
    return next(layer for layer, names in LAYERS.items() if name in names)


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the deploytool modules it imports anywhere in its source (top level or in functions)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges = set()
        tree = ast.parse(path.read_text())
        typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If) and _is_type_checking(block.test)
                       for stmt in block.body for n in ast.walk(stmt)}
        for node in ast.walk(tree):
            if id(node) in typing_only:  # `if TYPE_CHECKING:` imports never run
                continue
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for target in targets:
                if target in modules and target != name:
                    edges.add(target)
        graph[name] = edges
    return graph


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_package_has_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle_through_a_function_level_import():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_every_module_imports_only_from_its_layer_or_below():
    graph = import_graph()
    upward = [f"{module} (layer {layer_of(module)}) imports {target} (layer {layer_of(target)})"
              for module, targets in graph.items() for target in targets if layer_of(target) > layer_of(module)]
    assert not upward, "; ".join(upward)


def test_every_module_has_a_layer():
    assert all(isinstance(layer_of(module), int) for module in import_graph())


def test_help_and_loading_an_onnx_signature_import_no_torch():
    code = ("import sys; from deploytool.cli.app import app; import deploytool.runtime, deploytool.artifacts, "
            "deploytool.serving.repository; assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
