"""Atomic writes, safetensors checkpoints and run directories.

Every artifact is written to a temporary file beside its target and renamed into place, so a crash
or a failed check never leaves a half-written file where a good one was.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from deploytool.errors import BadInput

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
METRICS_FILE = "metrics.json"
ROUTING_PLOT = "routing.png"


def check_parent_dir(path: str | os.PathLike) -> Path:
    """`path` as an output file path: its directory exists and it is not a directory itself.

    Args:
        path: where a file will be written.

    Returns:
        `path` as a Path.

    Raises:
        BadInput: the path is a directory, or its directory does not exist.
    """
    path = Path(path)
    if path.is_dir():
        raise BadInput(f"output path {path} is a directory; give a file path")
    if not path.parent.exists():
        raise BadInput(f"output directory {path.parent} does not exist")
    return path


#: the files of a run directory, which no command's output may replace
RUN_FILES = (CONFIG_FILE, WEIGHTS_FILE, METRICS_FILE, ROUTING_PLOT)


def refuse_overwrite(out: str | os.PathLike, *inputs: str | os.PathLike | None) -> None:
    """Refuse an output path that is one of the `inputs` (files) or a file of an input run directory:
    a command must never replace what it reads."""
    target = Path(out).resolve()
    for item in inputs:
        if item is None or not isinstance(item, (str, os.PathLike)):
            continue
        source = Path(item).resolve()
        protected = [source / name for name in RUN_FILES] if source.is_dir() else [source]
        if target in protected or target == source:
            raise BadInput(f"output {out} would replace the input {target}; write it somewhere else")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _as_if_created(path: Path, mode: int) -> None:
    """mkstemp/mkdtemp make private (0600/0700) files; give the permissions a plain open/mkdir would."""
    os.chmod(path, mode & ~_umask())


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it onto `path`, on error delete it.

    Args:
        path: the file to write.

    Yields:
        The temporary path to write to.

    Raises:
        BadInput: see check_parent_dir.
    """
    target = check_parent_dir(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as exc:
        raise BadInput(f"cannot write {target}: {exc.strerror or exc}") from exc
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        _as_if_created(tmp_path, 0o666)  # after the writer: some (safetensors) recreate the file
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def check_path(path: str | os.PathLike, what: str = "") -> Path:
    """`path` as a Path, refusing one whose symlinks loop or whose name the system cannot take
    (Path.exists would call either "missing", Path.resolve raise RuntimeError).

    Args:
        path: a path a user gave.
        what: what it is, for messages ("ONNX model").

    Returns:
        `path` as a Path.

    Raises:
        BadInput: a symlink loop, or a path the system refuses (too long, a NUL byte).
    """
    label = f"{what} {path}" if what else str(path)
    try:
        os.stat(path)
    except FileNotFoundError:
        pass
    except ValueError as exc:  # an embedded NUL byte
        raise BadInput(f"{label} is not a valid path: {exc}") from exc
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise BadInput(f"{label} is a symlink loop: it points, through links, back at itself") from exc
        if exc.errno not in (errno.ENOTDIR, errno.EACCES):
            raise BadInput(f"{label} cannot be read: {exc.strerror or exc}") from exc
    return Path(path)


def process_id(pid: int) -> str:
    """`pid` and its start time (from /proc where there is one), as an owner file records them: a
    recycled pid is another process.

    Args:
        pid: a process id.

    Returns:
        "pid start-time", or "pid" where the start time cannot be read.
    """
    try:
        start = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        start = ""
    return f"{pid} {start}".strip()


def owner_alive(recorded: str) -> bool:
    """Whether the process `process_id` recorded is still running (True when in doubt: what is kept
    is never a live process's loss).

    Args:
        recorded: what process_id returned for the owner.

    Returns:
        False only when that process is gone (or its pid now belongs to another process).
    """
    parts = str(recorded).split()
    if not parts or not parts[0].isdigit():
        return True
    pid = int(parts[0])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return len(parts) < 2 or process_id(pid) == " ".join(parts[:2])


def check_file(path: str | os.PathLike, what: str) -> Path:
    """`path` when it is an existing regular file.

    Args:
        path: the file.
        what: what it is, for messages ("checkpoint").

    Returns:
        `path` as a Path.

    Raises:
        BadInput: a directory, a missing file or a symlink loop, saying which.
    """
    path = check_path(path, what)
    if path.is_dir():
        raise BadInput(f"{what} {path} is a directory; give a file")
    if not path.is_file():
        raise BadInput(f"{what} {path} does not exist")
    return path


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically (see atomic_path); returns the path.

    Args:
        path: the file.
        data: its bytes.

    Returns:
        The path.
    """
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def dumps_json(obj: Any) -> str:
    """JSON as deploytool writes it everywhere: indented, sorted keys, NumPy values and paths allowed,
    NaN and infinities as null (JSON has no such numbers; a bare NaN breaks every strict parser)."""
    return json.dumps(_finite(obj), indent=2, sort_keys=True, default=_json_default, allow_nan=False) + "\n"


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if obj == obj and obj not in (float("inf"), float("-inf")) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if hasattr(obj, "tolist") and not isinstance(obj, (str, bytes)):
        return _finite(obj.tolist())
    return obj


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write `obj` as dumps_json does, atomically; returns the path.

    Args:
        path: the file.
        obj: the JSON value (NaN and infinities refused).

    Returns:
        The path.
    """
    return write_bytes(path, dumps_json(obj).encode())


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    """The parsed JSON at `path`; a missing file or invalid JSON is BadInput naming `what`.

    Args:
        path: the file.
        what: how messages name it.

    Returns:
        The value.

    Raises:
        BadInput: a missing or unreadable file, or text that is not JSON.
    """
    path = check_file(path, what)
    try:
        return loads_json(path.read_text(), f"{what} {path}")
    except OSError as exc:
        raise BadInput(f"cannot read {what} {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise BadInput(f"{what} {path} is not valid JSON: {exc}") from exc


#: the deepest nesting of lists and objects deploytool reads from a JSON file (its own files nest 4 deep)
MAX_JSON_DEPTH = 64


def loads_json(text: str, what: str = "JSON") -> Any:
    """`text` parsed as JSON; invalid or too deeply nested JSON is one BadInput naming `what`.

    Args:
        text: the JSON text.
        what: what it is, for messages ("run config runs/a/config.json").

    Returns:
        The parsed value.

    Raises:
        BadInput: invalid JSON, or lists and objects nested deeper than MAX_JSON_DEPTH.
    """
    depth = _max_depth(text)
    if depth > MAX_JSON_DEPTH:
        raise BadInput(f"{what} nests lists or objects {depth} deep, more than the {MAX_JSON_DEPTH} "
                       "deploytool reads: it is not a file deploytool wrote")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadInput(f"{what} is not valid JSON: {exc}") from exc
    except RecursionError as exc:  # a nesting the scan above miscounted: still one line
        raise BadInput(f"{what} nests lists or objects too deeply") from exc


def _max_depth(text: str) -> int:
    """The deepest nesting of [ and { in JSON text, brackets inside strings not counted (linear time)."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def sha256_file(path: str | os.PathLike) -> str:
    """The hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def prepare_out_dir(path: str | os.PathLike) -> Path:
    """Create an output directory (and parents); refuse a path that is a file."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise BadInput(f"output directory {path} exists and is a file")
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, *, replace: bool = True) -> Iterator[Path]:
    """Build a directory under a temporary name and swap it into place when complete.

    An existing directory at `path` stays intact until the new one is whole. With `replace` False, a
    non-empty directory that appeared at `path` meanwhile (another process writing the same run) is
    refused at the swap instead of replaced. Nothing temporary is left behind, whatever fails.

    Args:
        path: the directory to build.
        replace: replace a directory that appeared at `path` meanwhile.

    Yields:
        The temporary directory to write into.

    Raises:
        BadInput: `path` is a file, or (without `replace`) a directory appeared there meanwhile.
    """
    target = Path(path).resolve()  # "" and "." name the directory itself, not a hidden sibling
    if target.exists() and not target.is_dir():
        raise BadInput(f"{target} exists and is a file")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    _as_if_created(tmp, 0o777)
    try:
        yield tmp
        if target.exists() and not replace and any(target.iterdir()):
            raise BadInput(f"{target} was written by another process meanwhile; it is kept, this result is not")
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
            try:
                os.replace(target, old / "x")
                try:
                    os.replace(tmp, target)
                except BaseException:
                    os.replace(old / "x", target)  # put the old one back
                    raise
            finally:
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# --- safetensors checkpoints -------------------------------------------------------------------

def _header_length(fh) -> int | None:
    """The length a safetensors file's first 8 bytes give its JSON header; None when it is shorter."""
    head = fh.read(8)
    return struct.unpack("<Q", head)[0] if len(head) == 8 else None


def _looks_like_safetensors(path: Path) -> bool:
    """The file starts as safetensors does: a header length within the file, then a JSON object."""
    with open(path, "rb") as fh:
        header_len = _header_length(fh)
        first = fh.read(1)
    return header_len is not None and first == b"{" and 0 < header_len < path.stat().st_size


def safetensors_names(path: str | os.PathLike) -> list[str]:
    """The tensor names in a safetensors file's header, read without loading a tensor.

    Args:
        path: the weights file.

    Returns:
        The names; [] when the file is absent or not readable as safetensors (left to the loader).
    """
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            size = _header_length(fh)
            if size is None or size > min(path.stat().st_size, 1 << 28):
                return []
            header = json.loads(fh.read(size))
    except (OSError, ValueError):
        return []
    return [k for k in header if k != "__metadata__"] if isinstance(header, dict) else []


def save_weights(path: str | os.PathLike, state_dict: dict, metadata: dict[str, str] | None = None) -> Path:
    """Write a state dict as safetensors, atomically; returns the path.

    Args:
        path: the .safetensors file.
        state_dict: the tensors by name.
        metadata: string metadata stored in the header.

    Returns:
        The path.
    """
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return Path(path)


def load_weights(path: str | os.PathLike) -> dict:
    """Load a safetensors file; anything else (a pickle included) is refused, never unpickled.

    Args:
        path: the weights file.

    Returns:
        {name: tensor}.

    Raises:
        BadInput: a missing, empty, non-safetensors or corrupt file.
    """
    path = Path(path)
    check_file(path, "checkpoint")
    if path.stat().st_size == 0:
        raise BadInput(f"checkpoint {path} is empty")
    if not _looks_like_safetensors(path):
        raise BadInput(
            f"checkpoint {path} is not a safetensors file (pickled checkpoints are refused: "
            "convert with safetensors.torch.save_file)"
        )
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise BadInput(f"checkpoint {path} is corrupt: {exc}") from exc
