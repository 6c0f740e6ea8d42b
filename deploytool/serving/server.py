"""`serve`: the model behind a real Triton Inference Server, over KServe v2 (HTTP and gRPC).

The target is packaged with the Python backend into a temporary repository (the same model.py that
`package --backend python` writes, so what `serve` runs is what `package` ships) and nvidia-pytriton's
bundled tritonserver serves it. HTTP requests reach it through deploytool's front (serving.front), which
refuses declared shapes that do not match the data a request carries before tritonserver allocates for
them; Triton then checks each request's shape and dtype against the config (a bad one gets a 400, the
server keeps serving); model.py rejects NaN rows per request.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import signal
import socket
import sysconfig
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deploytool import io
from deploytool.batch_sizes import check_batch_sizes
from deploytool.deps import require
from deploytool.errors import BadInput, CheckFailed, MissingDependency
from deploytool.serving.config import Batching, check_name
from deploytool.serving.front import HttpFront, limits_of

DEFAULT_PORT = 8000
DEFAULT_NAME = "model"
STARTUP_TIMEOUT_S = 120.0
EXIT_TIMEOUT_S = 5
_ENV_LOCK = threading.Lock()


@dataclass
class Server:
    """A running tritonserver: `http_url` / `grpc_url` for tritonclient; `stop()` (or `with`) ends it."""

    name: str
    host: str
    http_port: int
    grpc_port: int
    workdir: Path
    _triton: Any = field(repr=False)
    _stopped: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)
    #: deploytool's HTTP front on `http_port` (serving.front), relaying to tritonserver's internal port
    _front: Any = field(default=None, repr=False)

    @property
    def http_url(self) -> str:
        """host:port of the HTTP endpoint, as a client gives it."""
        return f"{_client_host(self.host)}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        """host:port of the gRPC endpoint, as a client gives it."""
        return f"{_client_host(self.host)}:{self.grpc_port}"

    @property
    def log_file(self) -> Path:
        """tritonserver's log (in the temporary folder until `keep_log`)."""
        return self.workdir / "tritonserver.log"

    def is_alive(self) -> bool:
        """Whether tritonserver still runs."""
        return self._triton.is_alive()

    def keep_log(self) -> Path | None:
        """Copy tritonserver's log out of the temporary folder `stop` removes; its new path (None if
        there is no log)."""
        try:
            fd, kept = tempfile.mkstemp(prefix="deploytool-tritonserver-", suffix=".log")
            os.close(fd)
            shutil.copyfile(self.log_file, kept)
            return Path(kept)
        except OSError:
            return None

    def stop(self) -> None:
        """Stop tritonserver (SIGINT, then kill after the exit timeout) and remove the temporary repository."""
        try:
            if self._front is not None:
                self._front.close()
                self._front = None
            self._triton.stop()
        finally:
            self._stopped.set()
            if self._thread is not None:  # a thread still inside a failed startup is a daemon: not waited for
                self._thread.join(timeout=EXIT_TIMEOUT_S)
            shutil.rmtree(self.workdir, ignore_errors=True)

    def wait(self) -> None:
        """Serve until Ctrl-C or SIGTERM (then stop cleanly); CheckFailed if tritonserver dies by itself."""
        with _stop_signals():
            try:
                while self._triton.is_alive():
                    time.sleep(0.5)
            except KeyboardInterrupt:
                return
        kept = self.keep_log()
        raise CheckFailed(f"tritonserver exited unexpectedly: {_log_error(self.log_file) or 'no error line in its log'}"
                          + (f" (its log: {kept})" if kept else ""))

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def serve(target: str | Path, *, port: int = DEFAULT_PORT, host: str = "127.0.0.1", grpc_port: int | None = None,
          name: str = DEFAULT_NAME, max_batch: int = 64, dynamic_batching: bool = False,
          preferred_batch: str | Sequence[int] = (8, 32), max_queue_delay_us: int = 100, instances: int = 1,
          block: bool = True, on_ready: Any = None, top_k: int | None = None,
          batching: Batching | None = None) -> Server:
    """Serve `target` (run dir, Hugging Face MoE folder, ONNX file or engine) on `host:port` (HTTP) and `grpc_port` (default port+1).

    block=True serves until Ctrl-C/SIGTERM and shuts down cleanly (no tritonserver left behind);
    block=False returns the running Server for the caller to stop. `on_ready(server)` is called once
    the model answers. Ports in use are refused (BadInput) before anything starts.

    Args:
        target: a run directory, a Hugging Face MoE folder, an ONNX model or a TensorRT engine.
        port: the HTTP port.
        host: the address to listen on (loopback by default).
        grpc_port: the gRPC port (default: port + 1).
        name: the model's name on the server.
        max_batch: Triton's max_batch_size.
        dynamic_batching: turn on Triton's dynamic batcher.
        preferred_batch: its preferred batch sizes.
        max_queue_delay_us: how long it waits to fill a batch.
        instances: model instances.
        block: serve until stopped (True), or return the running server (False).
        on_ready: called with the Server once the model answers.
        top_k: for a Hugging Face folder, experts per token of the model served (None: its own k); the
            folder is exported to ONNX (sparse dispatch) and that model is served.
        batching: max batch and dynamic batcher as one `serving.config.Batching`, instead of the four
            single settings above (giving both is refused).

    Returns:
        The Server (stopped already when `block`).

    Raises:
        BadInput: a bad target, name or option, a port in use.
        MissingDependency: pytriton is missing, or tritonserver could not start or load the model.
    """
    from deploytool.serving.repository import package  # looked up per call: tests stop a serve here

    check_name(name)
    preferred_batch = check_batch_sizes(preferred_batch, "preferred batch sizes", allow_empty=True)
    grpc_port = port + 1 if grpc_port is None else grpc_port
    if port == grpc_port:
        raise BadInput(f"HTTP and gRPC need different ports, both are {port}")
    for what, number in (("HTTP", port), ("gRPC", grpc_port)):
        check_port_free(host, number, what)
    pytriton = require("pytriton.triton", "deploytool serve")
    quiet_pytriton_exit_warning()
    clean_stale_workdirs()
    workdir = Path(tempfile.mkdtemp(prefix=WORKDIR_PREFIX))
    try:
        (workdir / OWNER_FILE).write_text(_process_id(os.getpid()))
        packaged = package(target, workdir / "models", name, max_batch=max_batch, dynamic_batching=dynamic_batching,
                           preferred_batch=preferred_batch, max_queue_delay_us=max_queue_delay_us,
                           instances=instances, backend="python", top_k=top_k, batching=batching)
        # tritonserver's HTTP listens on loopback only; the user's port is deploytool's front, which checks
        # every inference request's declared shapes before tritonserver allocates for them (serving.front)
        internal_port = _free_loopback_port()
        config = pytriton.TritonConfig(
            model_repository=workdir / "models", http_address="127.0.0.1", http_port=internal_port, grpc_address=host,
            grpc_port=grpc_port, allow_metrics=False, exit_on_error=False, strict_readiness=False,
            exit_timeout_secs=EXIT_TIMEOUT_S, log_file=workdir / "tritonserver.log", log_verbose=0)
        triton = pytriton.Triton(config=config, workspace=workdir / "workspace")
        try:
            front = HttpFront(host, port, internal_port, limits_of(packaged.config))
        except OSError as exc:
            raise BadInput(f"HTTP port {port} on {host} is in use ({exc.strerror}); pick free HTTP and gRPC "
                           "ports (gRPC defaults to the HTTP port + 1)") from exc
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    server = Server(name, host, port, grpc_port, workdir, triton, _front=front)
    try:
        # signals are ours from before the start, so a Ctrl-C at any moment (starting, or just after
        # "serving" is printed) ends in the clean stop below, never in an orphan tritonserver
        with _stop_signals() if block else contextlib.nullcontext():
            _start(server)
            if on_ready is not None:
                on_ready(server)
            if not block:
                return server
            server.wait()
    except KeyboardInterrupt:
        pass
    except BaseException:
        server.stop()
        raise
    server.stop()
    return server


#: the temporary serving folders `serve` makes (in the system's temporary directory), and the file in
#: each that names the process owning it
WORKDIR_PREFIX = "deploytool-serve-"
OWNER_FILE = "deploytool-serve.pid"


_process_id = io.process_id
_owner_alive = io.owner_alive


def clean_stale_workdirs(tmpdir: str | Path | None = None) -> list[Path]:
    """Remove the temporary serving folders that `serve` processes killed without a chance to clean up
    (SIGKILL) left behind: only this user's, only those whose recorded owner process is gone, never a
    live server's.

    Args:
        tmpdir: where to look (default: the system's temporary directory).

    Returns:
        The folders removed.
    """
    removed = []
    root = Path(tmpdir or tempfile.gettempdir())
    try:
        candidates = list(root.glob(WORKDIR_PREFIX + "*"))
    except OSError:
        return removed
    for folder in candidates:
        try:
            if folder.is_symlink() or not folder.is_dir() or folder.stat().st_uid != os.getuid():
                continue
            recorded = (folder / OWNER_FILE).read_text()
        except OSError:
            continue  # no owner recorded (an older serve, or one just starting): left alone
        if not _owner_alive(recorded):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


#: pytriton's warning whenever tritonserver exits non-zero, a Ctrl-C'd stop included
_PYTRITON_EXIT_WARNING = "Triton Inference Server exited with failure"


def quiet_pytriton_exit_warning() -> None:
    """Drop pytriton's "exited with failure. Please wait." line: it also fires on a clean Ctrl-C stop
    (exit 0), and a real failure is reported by `_start` / `Server.wait` with the reason from the log."""
    logger = logging.getLogger("pytriton.server.triton_server")
    if _not_exit_warning not in logger.filters:
        logger.addFilter(_not_exit_warning)


def _not_exit_warning(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith(_PYTRITON_EXIT_WARNING)


def _start(server: Server) -> None:
    """Start tritonserver and wait until the model is ready; a failure says why, from the server's log.

    pytriton spawns tritonserver with PR_SET_PDEATHSIG, which fires when the spawning *thread* exits:
    the thread that starts it stays alive until `stop`, so the server lives exactly as long as the Server.
    """
    triton = server._triton
    started = threading.Event()
    failure: list[BaseException] = []

    def run() -> None:
        try:
            with _libpython_first():
                triton.run()
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
            failure.append(exc)
        finally:
            started.set()
        server._stopped.wait()

    server._thread = threading.Thread(target=run, name="deploytool-tritonserver", daemon=True)
    server._thread.start()
    begin = time.monotonic()
    while not started.wait(0.2):
        # the process starts within milliseconds; gone after that means it exited during startup
        if time.monotonic() - begin > 2.0 and not triton.is_alive():
            break
        if time.monotonic() - begin > STARTUP_TIMEOUT_S:
            break
    reason = _log_error(server.log_file)
    if "already in use" in reason.lower():  # another server took the port after our check
        raise BadInput(f"port {server.http_port} or {server.grpc_port} on {server.host} was taken while the server "
                       "started (another server is starting there); pick other free ports")
    if not started.is_set() or failure or not triton.is_alive():
        detail = reason or (f"{type(failure[0]).__name__}: {failure[0]}" if failure else "no reason in its log")
        kept = server.keep_log()
        raise MissingDependency(f"tritonserver did not start: {detail}" + (f" (its log: {kept})" if kept else ""))
    if not _model_ready(server):
        kept = server.keep_log()
        raise MissingDependency(f"tritonserver could not load model {server.name!r}: "
                                f"{reason or 'no error line in its log'}" + (f" (its log: {kept})" if kept else ""))


def _model_ready(server: Server) -> bool:
    """Whether our model is ready; a port that answers as another server (403 and the like) is BadInput."""
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    client = httpclient.InferenceServerClient(server.http_url)
    try:
        return client.is_model_ready(server.name)
    except InferenceServerException as exc:
        raise BadInput(f"port {server.http_port} on {server.host} answers as another server ({exc}); "
                       "pick other free ports") from exc
    finally:
        client.close()


@contextlib.contextmanager
def _libpython_first() -> Iterator[None]:
    """Put this interpreter's libpython first on LD_LIBRARY_PATH while tritonserver is spawned.

    The Python-backend stub links libpython3.X.so.1.0 from the system library path; a different patch
    release than the running interpreter fails to load models with "'_thread.RLock' object has no
    attribute '_recursion_count'". pytriton copies os.environ when it spawns the server, so the change
    is only needed for that moment.
    """
    libdir = sysconfig.get_config_var("LIBDIR")
    soname = sysconfig.get_config_var("INSTSONAME") or ""
    if not libdir or not soname or not (Path(libdir) / soname).exists():
        yield
        return
    with _ENV_LOCK:
        old = os.environ.get("LD_LIBRARY_PATH")
        os.environ["LD_LIBRARY_PATH"] = os.pathsep.join([libdir, *([old] if old else [])])
        try:
            yield
        finally:
            if old is None:
                os.environ.pop("LD_LIBRARY_PATH", None)
            else:
                os.environ["LD_LIBRARY_PATH"] = old


def check_port_free(host: str, port: int, what: str = "HTTP") -> None:
    """BadInput naming the port when something already listens on host:port (or the host is unknown).

    Args:
        host: the address.
        port: the port.
        what: how messages name it (HTTP, gRPC).

    Raises:
        BadInput: a port out of range or in use, or an unknown host.
    """
    if not 0 < port < 65536:
        raise BadInput(f"{what} port {port} is not a valid port (1-65535)")
    try:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise BadInput(f"cannot resolve host {host!r}: {exc}") from exc
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: TIME_WAIT is not "in use"
        try:
            sock.bind(address)
        except OSError as exc:
            raise BadInput(f"{what} port {port} on {host} is in use ({exc.strerror}); "
                           "pick free HTTP and gRPC ports (gRPC defaults to the HTTP port + 1)") from exc


def _free_loopback_port() -> int:
    """A port on 127.0.0.1 that nothing listens on now (the system picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _client_host(host: str) -> str:
    return {"0.0.0.0": "127.0.0.1", "::": "[::1]"}.get(host, host)


def _log_error(log_file: Path) -> str:
    """The first error line of tritonserver's log, without its timestamp prefix."""
    try:
        lines = log_file.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    for line in lines:
        if line.startswith("E") and "CudaDriverHelper" not in line:  # no GPU here is not an error for us
            message = re.sub(r"^E\d{4} [\d:.]+\s+\d+\s+\S+\]\s*", "", line).strip().strip('"')
            return message.split("\\n")[0].strip()[:500]  # the log escapes newlines: keep the first line
    return ""


@contextlib.contextmanager
def _stop_signals() -> Iterator[None]:
    """SIGINT and SIGTERM (Ctrl-C, docker stop, kill) both end `wait` with a clean shutdown.

    SIGINT is installed explicitly because a process started in the background by a non-interactive
    shell inherits it ignored. Only the main thread can install handlers.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
