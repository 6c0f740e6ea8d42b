"""`serve`'s HTTP front door: every KServe v2 inference request is checked before tritonserver reads it.

Triton's HTTP front end allocates what a JSON request's declared shape says before it compares that
with the data the request carries: one request declaring [1099511627776, 5, 8] with 80 values ends the
server (std::bad_alloc). So `serve` runs tritonserver's HTTP on an internal loopback port and this front
on the user's address: it refuses (HTTP 400, one JSON error) a request whose shapes are not whole
numbers >= 0, whose element count does not match its data (JSON values, or binary_data_size), whose
batch exceeds max_batch_size or whose size exceeds what one request takes; it passes everything else
through unchanged (Triton then checks ranks, static dims and dtypes with its own messages). gRPC
requests go to tritonserver directly: its gRPC front end checks byte sizes against the shape before it
allocates.
"""

from __future__ import annotations

import http.client
import json
import math
import re
import socket
import threading
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from deploytool.errors import BadInput
from deploytool.io import loads_json

#: the largest request body the front reads (Triton's own default limit, --http-max-input-size)
MAX_BODY_BYTES = 64 << 20
#: the most elements one input of one request may declare
MAX_ELEMENTS = 1 << 30
_INFER_PATH = re.compile(r"^/v2/models/[^/]+(?:/versions/[^/]+)?/infer$")
_ITEMSIZE = {"BOOL": 1, "UINT8": 1, "UINT16": 2, "UINT32": 4, "UINT64": 8, "INT8": 1, "INT16": 2, "INT32": 4,
             "INT64": 8, "FP16": 2, "FP32": 4, "FP64": 8, "BF16": 2}
_HOP_BY_HOP = {"connection", "keep-alive", "expect", "transfer-encoding", "te", "trailer", "upgrade",
               "proxy-connection", "content-length", "host"}


@dataclass(frozen=True)
class InputLimits:
    """What one input of the served model accepts: its dims after the batch (-1: dynamic), max_batch_size."""

    dims: tuple[int, ...]
    max_batch: int


def limits_of(config: Mapping[str, Any]) -> dict[str, InputLimits]:
    """{input name: InputLimits} from a Triton model config dict (serving.config.model_config)."""
    max_batch = int(config.get("max_batch_size", 0))
    return {x["name"]: InputLimits(tuple(int(d) for d in x["dims"]), max_batch) for x in config["input"]}


def check_infer_request(path: str, headers: Mapping[str, str], body: bytes,
                        limits: Mapping[str, InputLimits]) -> str | None:
    """Why tritonserver must not see this request (one line), or None to pass it through.

    Args:
        path: the request path (only /v2/models/<name>[/versions/<v>]/infer is checked).
        headers: the request headers.
        body: the request body as received.
        limits: the served model's inputs.

    Returns:
        The problem, or None.
    """
    if not _INFER_PATH.match(path.split("?", 1)[0]):
        return None
    try:
        body = _decoded(body, headers.get("Content-Encoding", ""))
        header_length = headers.get("Inference-Header-Content-Length")
        size = int(header_length) if header_length is not None else len(body)
        if not 0 <= size <= len(body):
            return f"Inference-Header-Content-Length {size} is outside the body of {len(body)} bytes"

        request = loads_json(body[:size].decode(), "the request")
    except (BadInput, ValueError, zlib.error) as exc:
        return f"the request cannot be read: {exc}"
    inputs = request.get("inputs") if isinstance(request, dict) else None
    if not isinstance(inputs, list):
        return "the request has no list of inputs"
    binary_left = len(body) - size
    for entry in inputs:
        if not isinstance(entry, dict):
            return "an input of the request is not an object"
        problem, binary = _check_input(entry, limits)
        if problem:
            return problem
        binary_left -= binary
    if binary_left < 0:
        return "the request's binary data is shorter than its inputs declare"
    return None


def _check_input(entry: dict, limits: Mapping[str, InputLimits]) -> tuple[str | None, int]:
    name, shape, datatype = entry.get("name"), entry.get("shape"), entry.get("datatype")
    label = f"input {name!r}"
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        return f"{label} declares the shape {str(shape)[:80]}; a shape is a list of whole numbers >= 0", 0
    count = math.prod(shape)
    limit = limits.get(name) if isinstance(name, str) else None
    # a shape of the wrong rank or static dims is left to Triton, whose message names the model's dims; what
    # it would allocate for before checking (a batch, a dynamic dim, the element count) is checked here
    if limit is not None and limit.max_batch > 0 and shape and shape[0] > limit.max_batch:
        return f"{label} declares a batch of {shape[0]}; the server takes at most {limit.max_batch}", 0
    if count > MAX_ELEMENTS:
        return f"{label} declares {count} elements; one request takes at most {MAX_ELEMENTS}", 0
    parameters = entry.get("parameters") if isinstance(entry.get("parameters"), dict) else {}
    if "data" in entry:
        values = _count_values(entry["data"], count)
        if values != count:
            return (f"{label} declares the shape {shape} ({count} values) but carries "
                    f"{'more' if values is None else values}"), 0
        return None, 0
    binary = parameters.get("binary_data_size")
    if binary is not None:
        itemsize = _ITEMSIZE.get(str(datatype))
        if not isinstance(binary, int) or binary < 0:
            return f"{label} has binary_data_size {binary!r}", 0
        if itemsize is not None and binary != count * itemsize:
            return (f"{label} declares the shape {shape} ({count * itemsize} bytes of {datatype}) but carries "
                    f"{binary}"), 0
        return None, binary
    return None, 0  # shared memory or no data: Triton checks those against the region it was given


def _count_values(data: Any, most: int) -> int | None:
    """How many leaf values nested lists hold; None as soon as there are more than `most`."""
    count, stack = 0, [data]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
        else:
            count += 1
            if count > most:
                return None
    return count


def _decoded(body: bytes, encoding: str) -> bytes:
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "deflate"):
        raise ValueError(f"unknown Content-Encoding {encoding!r}")
    inflater = zlib.decompressobj(zlib.MAX_WBITS | (16 if encoding == "gzip" else 0))
    out = inflater.decompress(body, MAX_BODY_BYTES + 1)
    if len(out) > MAX_BODY_BYTES:
        raise ValueError(f"it inflates beyond {MAX_BODY_BYTES >> 20} MiB")
    return out


class HttpFront:
    """A threaded HTTP server on (host, port) that checks inference requests and relays every request to
    tritonserver's HTTP port on loopback; `close()` stops it."""

    def __init__(self, host: str, port: int, backend_port: int, limits: Mapping[str, InputLimits]):
        self.backend_port = backend_port
        self.limits = dict(limits)
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        server_class = type("FrontServer", (ThreadingHTTPServer,), {"address_family": family,
                                                                     "daemon_threads": True})
        self.httpd = server_class((host, port), _handler(self))
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="deploytool-http-front", daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _handler(front: HttpFront) -> type[BaseHTTPRequestHandler]:
    local = threading.local()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def setup(self):
            super().setup()
            # headers and body go out as separate writes: without this, Nagle and delayed ACKs add 40 ms
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def log_message(self, format, *args):  # noqa: A002 - the base class's name
            pass

        def _reply(self, status: int, message: str) -> None:
            data = json.dumps({"error": message}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _relay(self) -> None:
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                self.close_connection = True
                return self._reply(411, "send the request with a Content-Length, not chunked")
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                length = -1
            if not 0 <= length <= MAX_BODY_BYTES:
                self.close_connection = True
                return self._reply(413, f"the request body must be 0..{MAX_BODY_BYTES} bytes")
            body = self.rfile.read(length)
            problem = check_infer_request(self.path, self.headers, body, front.limits)
            if problem:
                return self._reply(400, problem)
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
            for attempt in (0, 1):  # a kept-alive connection the server closed meanwhile: once more, fresh
                conn = getattr(local, "conn", None)
                try:
                    if conn is None:
                        conn = local.conn = http.client.HTTPConnection("127.0.0.1", front.backend_port, timeout=600)
                        conn.connect()
                        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    conn.request(self.command, self.path, body=body if length or self.command != "GET" else None,
                                 headers=headers)
                    response = conn.getresponse()
                    data = response.read()
                    break
                except (OSError, http.client.HTTPException):
                    if conn is not None:
                        conn.close()
                    local.conn = None
                    if attempt:
                        return self._reply(503, "tritonserver is not answering")
            self.send_response(response.status, response.reason)
            for key, value in response.getheaders():
                if key.lower() not in _HOP_BY_HOP:
                    self.send_header(key, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        do_GET = do_POST = do_HEAD = do_PUT = do_DELETE = _relay

    return Handler
