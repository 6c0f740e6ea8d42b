"""`package`: write a Triton Inference Server model repository entry for an engine, ONNX file or run dir.

Layout: <repository>/<name>/config.pbtxt, <repository>/<name>/1/<model file>, <repository>/<name>/README.md.
The whole <name> directory is built under a temporary name and swapped in when complete
(io.atomic_dir), so a failure, or a --force replace, never leaves a half-written model version.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from deploytool import io
from deploytool.artifacts import Target, manifest_path, read_manifest, resolve_target, top_k_of
from deploytool.artifacts import max_batch as profile_max_batch
from deploytool.batch_sizes import check_batch_sizes
from deploytool.dtypes import NUMPY_OF_TRITON
from deploytool.errors import BadInput
from deploytool.runners import artifact_of, make_runner, native_backend, reads
from deploytool.runtime import resolve_backend
from deploytool.serving import config as cfg
from deploytool.signature import ModelSignature

TRITON_BACKENDS = ("auto", *cfg.TRITON_BACKENDS)
VERSION = "1"
# the artifact's name inside the version directory (Triton's default model file names)
_ARTIFACT = {"engine": "model.plan", "onnx": "model.onnx", "run": "run"}
_RUN_FILES = (io.CONFIG_FILE, io.WEIGHTS_FILE, io.METRICS_FILE)
PYTHON_MODEL = Path(__file__).with_name("triton_model.py")


@dataclass
class Package:
    repository: Path
    name: str
    backend: str               # tensorrt | onnxruntime | python (Triton's side)
    runtime_backend: str | None  # python only: the deploytool backend model.py runs
    model_dir: Path
    config_path: Path
    readme: Path
    files: list[str]
    config: dict[str, Any]
    validated: bool            # parsed with Triton's ModelConfig schema (False: tritonclient not installed)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def package(target: str | Path, repository: str | Path, name: str, *, max_batch: int = 64,
            dynamic_batching: bool = False, preferred_batch: str | Sequence[int] = (8, 32),
            max_queue_delay_us: int = 100, instances: int = 1, backend: str = "auto",
            force: bool = False, top_k: int | None = None, batching: cfg.Batching | None = None) -> Package:
    """Write `repository/name` for `target` (engine -> tensorrt_plan, ONNX -> onnxruntime, run dir -> python).

    backend="python" serves any target through the deploytool runtime (model.py in the Python backend).
    A Hugging Face MoE folder is exported first (sparse dispatch, validated) and its ONNX model packaged:
    the deployment runs only each token's chosen experts.
    An existing `repository/name` is refused unless `force`; with it the old one stays whole until the
    new one is complete. config.pbtxt comes from the model's signature (every input, every output, each
    router's index and probs) and is checked with Triton's own ModelConfig schema.

    Args:
        target: a run directory, a Hugging Face MoE folder, an ONNX model or a TensorRT engine.
        repository: the model repository directory (created if needed).
        name: the model's name in it.
        max_batch: Triton's max_batch_size (0: no batching; the dims carry the whole shape).
        dynamic_batching: turn on Triton's dynamic batcher.
        preferred_batch: its preferred batch sizes.
        max_queue_delay_us: how long it waits to fill a batch.
        instances: model instances.
        backend: auto (the target's own), tensorrt, onnxruntime or python.
        force: replace an existing `repository/name`.
        top_k: for a Hugging Face folder, experts per token of the exported model (None: its own k).
        batching: max batch and dynamic batcher as one `serving.config.Batching`, instead of the four
            single settings above (giving both is refused).

    Returns:
        The Package written.

    Raises:
        BadInput: a bad target, name or option; a model without routers; a repository entry that holds
            the target; an existing entry without `force`.
        MissingDependency: tritonclient (Triton's schema) is missing.
    """
    cfg.check_name(name)
    target, repository = Path(target), Path(repository)
    model_dir = _check_destination(target, repository, name, force)
    if backend not in TRITON_BACKENDS:
        raise BadInput(f"unknown backend {backend!r}; choose {', '.join(TRITON_BACKENDS)}")
    resolved = resolve_target(target)  # read lazily and once: the ONNX model is parsed once, below
    kind = resolved.kind
    if kind == "hf":
        return _package_hf(target, repository, name, top_k=top_k, max_batch=max_batch,
                           dynamic_batching=dynamic_batching, preferred_batch=preferred_batch,
                           max_queue_delay_us=max_queue_delay_us, instances=instances, backend=backend, force=force,
                           batching=batching)
    if top_k is not None:
        raise BadInput(f"top-k applies to a Hugging Face MoE folder; {target} is a {kind} (export with --top-k)")
    backend = _triton_backend(target, kind, backend)
    preferred = tuple(check_batch_sizes(preferred_batch, "preferred batch sizes", allow_empty=True))
    batching = cfg.Batching.choose(batching, max_batch=max_batch, dynamic=dynamic_batching, preferred=preferred,
                                   max_queue_delay_us=max_queue_delay_us)

    if kind == "onnx":
        _external_data(resolved)  # every external-data file checked before anything reads it
    signature, notes = _signature(resolved, batching.max_batch)
    runtime_backend = parameters = None
    if backend == "python":
        runtime_backend = resolve_backend(resolved)[1]
        parameters = {"deploytool_artifact": _ARTIFACT[kind], "deploytool_backend": runtime_backend}
    config = cfg.model_config(name, list(signature.inputs), list(signature.outputs), backend=backend,
                              batching=batching, instances=instances, parameters=parameters)
    text = cfg.render(config)
    validated = cfg.validate(text)
    readme_text = readme(repository, config, notes)  # before the temporary folder exists: nothing to leave behind
    clean_stale_builds(repository, name)
    files = _write_model_dir(model_dir, resolved, kind, backend, text, readme_text)
    return Package(repository=repository, name=name, backend=backend, runtime_backend=runtime_backend,
                   model_dir=model_dir, config_path=model_dir / "config.pbtxt", readme=model_dir / "README.md",
                   files=files, config=config, validated=validated, notes=notes)


def _check_destination(target: Path, repository: Path, name: str, force: bool) -> Path:
    """`repository/name`, once it is a place package may write: not the target or inside it, not inside a
    run directory, and new or (with force) a folder package wrote."""
    if repository.exists() and not repository.is_dir():
        raise BadInput(f"repository {repository} exists and is a file; give a directory")
    model_dir = repository / name
    if model_dir.resolve() == target.resolve() or model_dir.resolve() in target.resolve().parents:
        raise BadInput(f"{model_dir} holds the input {target}; package into another repository or name")
    inside_run = next((p for p in (repository.resolve(), *repository.resolve().parents)
                       if (p / io.CONFIG_FILE).is_file()), None)
    if inside_run is not None:
        raise BadInput(f"repository {repository} is inside the run directory {inside_run}; give another directory")
    if (model_dir.exists() or model_dir.is_symlink()) and not force:
        raise BadInput(f"{model_dir} already exists; replace it with force "
                       "(the old model stays intact until the new one is complete)")
    check_replaceable(model_dir, repository)
    return model_dir


def _triton_backend(target: Path, kind: str, backend: str) -> str:
    """The Triton backend that serves a target of `kind`: "auto" picks the one that serves it natively
    (the registry's native backend where Triton has it, else python); another must read the target."""
    backend = cfg.triton_backend(native_backend(kind)) if backend == "auto" else backend
    if backend != "python" and not reads(backend, kind):
        raise BadInput(f"the {backend} backend serves {cfg.SERVES[artifact_of(backend)]}, not {target}; "
                       "or use the python backend")
    return backend


def _write_model_dir(model_dir: Path, target: Target, kind: str, backend: str, config_text: str,
                     readme_text: str) -> list[str]:
    """Build the model folder under a temporary name and swap it in whole; the files written."""
    with io.atomic_dir(model_dir) as tmp:
        # the marker first, naming this process: a package killed before the swap leaves a folder that the
        # next package of this name removes (clean_stale_builds); at the end it lists the files written
        (tmp / MARKER).write_text(io.dumps_json({"written_by": "deploytool package", "files": [],
                                                 "building": io.process_id(os.getpid())}))
        version = tmp / VERSION
        version.mkdir()
        (tmp / "config.pbtxt").write_text(config_text)
        _copy_artifact(target, kind, version / _ARTIFACT[kind])
        if backend == "python":
            shutil.copyfile(PYTHON_MODEL, version / "model.py")
        (tmp / "README.md").write_text(readme_text)
        files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file() and p.name != MARKER)
        (tmp / MARKER).write_text(io.dumps_json({"written_by": "deploytool package", "files": files}))
    return files


#: the file in every model folder `package` writes, listing what it wrote: `force` replaces only such a folder
MARKER = ".deploytool-package.json"


def clean_stale_builds(repository: Path, name: str) -> list[Path]:
    """Remove the temporary folders (`.<name>.*` in `repository`) that a package of `name` killed before
    it finished left behind: only those whose marker names a process that is gone, never a live one's.

    Args:
        repository: the model repository.
        name: the model's name.

    Returns:
        The folders removed.
    """
    removed = []
    if not repository.is_dir():
        return removed
    for folder in repository.glob(f".{name}.*"):
        try:
            if folder.is_symlink() or not folder.is_dir():
                continue
            marker = io.loads_json((folder / MARKER).read_text(), "package marker")
        except (OSError, BadInput):
            continue  # not one of ours, or one just starting: left alone
        if isinstance(marker, dict) and marker.get("building") and not io.owner_alive(marker["building"]):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def check_replaceable(model_dir: Path, repository: Path) -> None:
    """Refuse to replace `model_dir` unless it is a model folder `package` wrote: a real directory
    inside `repository` (not a symlink to somewhere else) holding the marker file and only the files
    the marker lists, so `force` never deletes a file deploytool did not write.

    Args:
        model_dir: repository/name.
        repository: the model repository.

    Raises:
        BadInput: a symlink, a file, or a folder deploytool did not write (or that holds other files now).
    """
    if model_dir.is_symlink():
        raise BadInput(f"{model_dir} is a symlink (to {os.readlink(model_dir)}); package replaces only a model folder "
                       "it wrote, never what a link points at: remove the link or choose another name")
    if not model_dir.exists():
        return
    if not model_dir.is_dir():
        raise BadInput(f"{model_dir} exists and is a file, not a model folder package wrote; remove it or choose "
                       "another name")
    if model_dir.resolve().parent != repository.resolve():
        raise BadInput(f"{model_dir} resolves outside the repository {repository}; choose another name")
    marker = model_dir / MARKER
    if not marker.is_file() or marker.is_symlink():
        raise BadInput(f"{model_dir} was not written by deploytool package (it has no {MARKER}); it is kept: "
                       "remove it yourself or choose another name")
    listed = io.read_json(marker, "package marker")
    files = listed.get("files") if isinstance(listed, dict) else None
    wrote = set(files) if isinstance(files, list) else set()
    present = {str(p.relative_to(model_dir)) for p in model_dir.rglob("*")
               if (p.is_file() or p.is_symlink()) and p != marker}
    others = sorted(present - wrote)
    if others:
        raise BadInput(f"{model_dir} holds files deploytool did not write ({', '.join(others[:3])}"
                       f"{', ...' if len(others) > 3 else ''}); it is kept: move them out or choose another name")


def _package_hf(folder: Path, repository: Path, name: str, *, top_k: int | None, **options: Any) -> Package:
    """The folder exported to ONNX (sparse dispatch, validated against the folder's model), then packaged."""
    from deploytool.export.onnx import export_onnx

    with tempfile.TemporaryDirectory(prefix="deploytool-package-") as tmp:
        exported = export_onnx(folder, Path(tmp) / "model.onnx", top_k=top_k)
        packaged = package(exported.path, repository, name, **options)
    k = top_k_of(exported.signature)
    packaged.notes.insert(0, f"exported from the Hugging Face folder {folder}"
                             + (f" at top-{k}" if k is not None else "") + ", sparse dispatch")
    return packaged


def _signature(target: Target, max_batch: int) -> tuple[ModelSignature, list[str]]:
    """The target's signature (a run directory's from the torch runner, which also proves the
    checkpoint loads; an ONNX model's from ONNX Runtime, which proves it loads) and README notes; a
    model without routers is refused."""
    notes: list[str] = []
    kind = target.kind
    if kind == "run":
        signature = make_runner(native_backend(kind), target.opened()).signature
    elif kind == "onnx":
        target.artifact()  # the stored signature's checks, on the model parsed once
        runner = make_runner(native_backend(kind), target.path)  # opens an InferenceSession: a model ORT cannot load fails here
        signature = runner.signature
        runner.session = None
    else:
        signature = target.signature
        if kind == "engine":
            notes = _engine_notes(target.path, max_batch)
    signature.require_router(str(target.path))
    return signature, notes


def _engine_notes(engine: Path, max_batch: int) -> list[str]:
    """README notes on loading an engine, from its manifest (model.plan.json).

    Refuses a max batch above the engine's optimisation profile: Triton would accept batches the engine
    cannot run.
    """
    manifest = read_manifest(engine)
    profile_max = profile_max_batch(manifest)
    if profile_max is not None and max_batch > profile_max:
        raise BadInput(f"max batch {max_batch} is above the engine's optimisation profile (max batch "
                       f"{profile_max}); lower it or rebuild the engine with a max batch of {max_batch}")
    if manifest.get("op_path") == "plugin":
        ops = ", ".join(manifest.get("plugin_ids", [])) or "deploytool's ops"
        plugin = (f"The engine runs {ops} as TensorRT plugins whose Triton kernels are compiled into the engine "
                  "(ahead-of-time): Triton's TensorRT backend runs it with no Python, no LD_PRELOAD and no "
                  "`--backend-config=tensorrt,plugins=...`.")
    else:
        plugin = ("The engine has no plugin (deploytool's ops were built from their ONNX function bodies as "
                  "standard TensorRT layers): nothing to preload.")
    machine = (f"It loads only under TensorRT {manifest.get('tensorrt')} on a GPU of compute capability "
               f"{manifest.get('compute_capability')} ({manifest.get('gpu')}): pick the Triton release whose "
               "TensorRT matches, or rebuild the engine where Triton runs.")
    return [plugin, machine]


def _copy_artifact(resolved: Target, kind: str, dest: Path) -> None:
    target = resolved.path
    if kind == "run":
        dest.mkdir()
        for name in _RUN_FILES:
            if (target / name).is_file():
                shutil.copyfile(target / name, dest / name)
        return
    shutil.copyfile(target, dest)
    if kind == "onnx":
        for location in _external_data(resolved):  # the model parsed once, by the resolver
            (dest.parent / location).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(target.parent / location, dest.parent / location)
    else:
        shutil.copyfile(manifest_path(target), manifest_path(dest))


def _external_data(target: Target) -> list[str]:
    """Relative paths of the external-data files an ONNX model refers to (they travel with it)."""
    import onnx

    onnx_path = target.path
    graph = target.onnx_model().graph
    locations = set()
    for tensor in graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            entry = {e.key: e.value for e in tensor.external_data}
            location = entry.get("location", "")
            if Path(location).is_absolute() or ".." in Path(location).parts:
                raise BadInput(f"{onnx_path} refers to external data outside its directory ({location})")
            # the location's string may stay inside while a symlink on the way leads out: check the real path
            folder = os.path.realpath(onnx_path.parent)
            real = os.path.realpath(onnx_path.parent / location)
            if os.path.commonpath([folder, real]) != folder:
                raise BadInput(f"{onnx_path} refers to external data {location}, a link to {real} outside the "
                               "model's folder; copy the data file beside the model")
            if not os.path.isfile(real):
                raise BadInput(f"{onnx_path} refers to external data {location}, which is not a file")
            locations.add(location)
    return sorted(locations)


# --- README ------------------------------------------------------------------------------------

def readme(repository: Path, config: dict[str, Any], notes: list[str]) -> str:
    """How to serve this model with tritonserver and call it: the exact command and a client example.

    Args:
        repository: the model repository.
        config: the model's config (as serving.config.model_config makes it).
        notes: paragraphs on loading it (an engine's plugin and TensorRT version).

    Returns:
        The README's Markdown.
    """
    max_batch = config["max_batch_size"]
    examples = []  # (name, Triton dtype, NumPy dtype, shape of 2 samples, shape of one)
    for x in config["input"]:
        dims = [d if d > 0 else 8 for d in x["dims"]]
        shape, one_row = ([2, *dims], [1, *dims]) if max_batch > 0 else (dims, dims)
        examples.append((x["name"], x["data_type"].removeprefix("TYPE_"), NUMPY_OF_TRITON[x["data_type"]], shape,
                         one_row))
    lines = [*_readme_serving(repository, config), *[line for note in notes for line in (note, "")],
             *_readme_tensors(config), *_readme_client(config["name"], config, examples)]
    return "\n".join(lines)


def _readme_serving(repository: Path, config: dict[str, Any]) -> list[str]:
    """The README's title, the tritonserver command, and for the Python backend what its server needs."""
    name = config["name"]
    backend = config.get("platform") or config["backend"]
    env = ""
    if backend == "python":
        env = ('LD_LIBRARY_PATH="$(python -c \'import sysconfig; print(sysconfig.get_config_var("LIBDIR"))\'):'
               '$LD_LIBRARY_PATH" ')
    lines = [
        f"# Triton model `{name}` ({backend})",
        "",
        "Written by `deploytool package`. Serve it with Triton Inference Server:",
        "",
        "```bash",
        f"{env}tritonserver {shlex.quote(f'--model-repository={repository.resolve()}')} "
        f"--model-control-mode=explicit --load-model={shlex.quote(name)}",
        "```",
        "",
        "HTTP (KServe v2) listens on port 8000, gRPC on 8001, metrics on 8002.",
        "",
    ]
    if backend == "python":
        lines += [
            "The Python backend runs `1/model.py`, which serves the artifact beside it through the deploytool",
            "runtime, so the server's Python environment needs deploytool (`pip install deploytool`, with",
            "`deploytool[tensorrt]` for engines). The `LD_LIBRARY_PATH` prefix makes the Python-backend stub",
            "load the libpython of that environment's interpreter; a libpython of another patch release fails",
            "with `'_thread.RLock' object has no attribute '_recursion_count'`. `deploytool serve` does this",
            "for you.",
            "",
        ]
    return lines


def _readme_tensors(config: dict[str, Any]) -> list[str]:
    """The README's list of tensors, as a request sends them."""
    max_batch = config["max_batch_size"]
    lines = [f"Tensors as a request sends them (max_batch_size {max_batch}"
             + (": a leading batch dimension is added to every shape):" if max_batch > 0 else "):"),
             ""]
    for kind in ("input", "output"):
        for t in config[kind]:
            full = ([-1] if max_batch > 0 else []) + list(t["dims"])
            lines.append(f"- {kind} `{t['name']}`: {t['data_type'].removeprefix('TYPE_')} {full}")
    return lines


def _readme_client(name: str, config: dict[str, Any], examples: list[tuple]) -> list[str]:
    """The README's Python client and curl examples."""
    return [
        "",
        "Client (`pip install \"tritonclient[http]\"`):",
        "",
        "```python",
        "import numpy as np",
        "import tritonclient.http as httpclient",
        "",
        'client = httpclient.InferenceServerClient("localhost:8000")',
        "inputs = []",
        *[line for x_name, dtype, np_dtype, shape, _ in examples for line in (
            (f"value = np.random.rand({', '.join(map(str, shape))}).astype(np.{np_dtype})" if _is_float(np_dtype)
             else f"value = np.zeros(({', '.join(map(str, shape))},), dtype=np.{np_dtype})"),
            f"inputs.append(httpclient.InferInput({_py(x_name)}, list(value.shape), {_py(dtype)}))",
            "inputs[-1].set_data_from_numpy(value)")],
        f"result = client.infer({_py(name)}, inputs)",
        "outputs = {name: result.as_numpy(name) for name in ("
        + ", ".join(_py(t["name"]) for t in config["output"]) + ",)}",
        "```",
        "",
        "Or with curl, one sample:",
        "",
        "```bash",
        _curl_line(name, [(x_name, dtype, np_dtype, one_row) for x_name, dtype, np_dtype, _, one_row in examples]),
        "```",
        "",
    ]


def _py(text: str) -> str:
    """`text` as a Python string literal: JSON's escapes are Python's, and every character outside ASCII
    is escaped, so no name can end the literal or the line."""
    return json.dumps(text)


#: the most values the curl example writes out; beyond it the example makes its JSON body with Python
MAX_README_VALUES = 64


def _curl_line(name: str, examples: list[tuple[str, str, str, list[int]]]) -> str:
    """The curl command for one sample, every tensor name quoted for the shell and for JSON (or for
    Python, when the body is made by a one-line Python program): its length does not grow with the dims."""
    url = shlex.quote(f"localhost:8000/v2/models/{name}/infer")
    if all(math.prod(shape) <= MAX_README_VALUES for *_, shape in examples):
        body = {"inputs": [{"name": x_name, "shape": shape, "datatype": dtype,
                            "data": [json.loads(_json_sample(np_dtype))] * math.prod(shape)}
                           for x_name, dtype, np_dtype, shape in examples]}
        return f"curl -s {url} -d {shlex.quote(json.dumps(body))}"
    tensors = ", ".join(f"{{'name': {x_name!r}, 'shape': {shape!r}, 'datatype': {dtype!r}, "
                        f"'data': [{_json_sample(np_dtype).replace('false', 'False')}] * {math.prod(shape)}}}"
                        for x_name, dtype, np_dtype, shape in examples)
    program = f"import json; print(json.dumps({{'inputs': [{tensors}]}}))"
    return f"python -c {shlex.quote(program)} | curl -s {url} -d @-"


def _is_float(numpy_dtype: str) -> bool:
    return numpy_dtype.startswith(("float", "bfloat"))


def _json_sample(numpy_dtype: str) -> str:
    """A value of the dtype as KServe v2 JSON takes it: 0.5 for floats, 0 for ints, false for bools."""
    return "0.5" if _is_float(numpy_dtype) else ("false" if numpy_dtype == "bool" else "0")
