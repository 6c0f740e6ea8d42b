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
    0: ["deploytool", "errors", "deps", "io", "dtypes", "choices", "signature", "artifacts", "machine", "batch_sizes", "progress"],
    1: ["nn", "moe", "hf", "checkpoints", "dispatch", "losses", "models", "data", "tokens", "feeds", "model_io", "compare", "kernels", "ops", "recipes"],
    2: ["export", "engine", "runners", "comparator", "training", "metrics", "lm"],
    3: ["parity", "benchmark", "serving", "runtime", "diagnostics", "study_doc"],
    4: ["pipeline", "penalty_study", "finetune", "lm_study"],
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


# --- one table per vocabulary --------------------------------------------------------------------

#: the backend names of the registry (deploytool.runners.BACKENDS)
BACKEND_NAMES = {"torch", "torch-dense", "torch-sparse", "onnxruntime", "onnxruntime-cuda", "tensorrt"}
#: the only module that may compare backend names: the registry
REGISTRY = "deploytool.runners"
#: dtype spellings of every vocabulary (NumPy, ONNX, short precision names, Triton's, TensorRT's enums)
DTYPE_WORDS = {"float", "float32", "float16", "bfloat16", "float64", "double", "int8", "int16", "int32", "int64",
               "uint8", "uint16", "uint32", "uint64", "bool", "fp32", "fp16", "bf16", "fp64", "i32", "i64",
               "half", "bfloat"} | {f"type_{t}" for t in ("fp32", "fp16", "bf16", "fp64", "int8", "int16", "int32",
                                                          "int64", "uint8", "uint16", "uint32", "uint64", "bool")}
#: the one module that holds dtype tables
DTYPES = "deploytool.dtypes"


def _names_a_backend(node: ast.AST) -> bool:
    """An expression that holds a backend name: `backend`, `name`, `r.backend`, `runner.name`, `backends`."""
    return any((isinstance(n, ast.Name) and n.id in ("backend", "backends", "name", "names", "chosen")) or
               (isinstance(n, ast.Attribute) and n.attr in ("backend", "name")) for n in ast.walk(node))


def backend_name_comparisons(tree: ast.AST) -> list[int]:
    """Lines where a backend name is compared with what names a backend (==, !=, in, startswith)."""
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            constants = [o.value for o in operands if isinstance(o, ast.Constant) and isinstance(o.value, str)]
            if any(c in BACKEND_NAMES for c in constants) and any(_names_a_backend(o) for o in operands
                                                                 if not isinstance(o, ast.Constant)):
                lines.append(node.lineno)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and node.func.attr in ("startswith", "endswith") and _names_a_backend(node.func.value):
            if any(isinstance(a, ast.Constant) and any(str(a.value) and b.startswith(str(a.value)) for b in BACKEND_NAMES)
                   for a in node.args):
                lines.append(node.lineno)
    return lines


def _dtype_word(node: ast.AST) -> bool:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value.lower() in DTYPE_WORDS
    return isinstance(node, ast.Attribute) and node.attr.lower() in DTYPE_WORDS


def dtype_maps(tree: ast.AST) -> list[int]:
    """Lines of dict literals that translate dtype spellings (a dtype key -> a dtype value)."""
    return [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Dict)
            and sum(k is not None and _dtype_word(k) and _dtype_word(v) for k, v in zip(node.keys, node.values)) >= 2]


def _offences(find, allowed: str) -> list[str]:
    return [f"{_module_name(p)}:{line}" for p in sorted(PACKAGE.rglob("*.py")) if _module_name(p) != allowed
            for line in find(ast.parse(p.read_text()))]


def test_no_backend_name_is_compared_outside_the_registry():
    offences = _offences(backend_name_comparisons, REGISTRY)
    assert not offences, f"ask the registry (deploytool.runners: Backend, runs_weights, runs_on_gpu) instead: {offences}"


def test_the_backend_name_check_finds_what_it_looks_for():
    found = backend_name_comparisons(ast.parse(
        'name == "onnxruntime-cuda"\nr.backend == "torch"\nr.backend.startswith("torch")\n"tensorrt" in backends\n'
        '"tensorrt" not in manifest\nname == "x"\n'))
    assert found == [1, 2, 3, 4]


def test_no_dtype_map_outside_dtypes():
    offences = _offences(dtype_maps, DTYPES)
    assert not offences, f"dtype tables live in deploytool/dtypes.py: {offences}"


def test_the_dtype_map_check_finds_what_it_looks_for():
    found = dtype_maps(ast.parse('a = {"float32": "TYPE_FP32", "int64": "TYPE_INT64"}\n'
                                 'b = {"fp16": T.FLOAT16, "bf16": T.BFLOAT16}\nc = {"float32": (1, 2), "x": 1}\n'))
    assert found == [1, 2]
