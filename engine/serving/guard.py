"""An HTTP front for a local tritonserver: checks each inference request before the server sees it.

Why: tritonserver 2.51's HTTP frontend allocates a JSON-encoded input ("data": [...]) at the size its declared
shape states before it reads the data, and dies on std::bad_alloc when that size cannot be had: a 106-byte request
declaring a [1, 3000000, 3000000, 3] UINT8 image aborts the whole server. That is the server's bug (binary inputs
and gRPC are checked against their actual size first and refused cleanly); this front works around it for the
servers `LocalServer` starts (`moduseg serve`). NGC's tritonserver started by hand has no such front: expose its
gRPC port, or put a proxy that does these checks in front of its HTTP port.

`HttpGuard` listens on the public HTTP address and forwards every request to the server's private HTTP port,
refusing inference requests (POST /v2/models/NAME[/versions/V]/infer) that

- have no Content-Length or one over `max_request_bytes` (413);
- have a JSON part (the whole body, or the Inference-Header-Content-Length bytes before binary tensors) over
  `max_json_bytes` (413), that does not parse, or whose inputs state a shape that is not a list of integers >= 0;
- carry JSON tensor data whose count of values differs from what the input's shape declares (400): a JSON input
  is then never bigger than what was actually sent.

Compressed bodies (Content-Encoding gzip or deflate) are inflated to check them, up to `max_request_bytes`. The
server's inference API is restricted to requests that carry a per-server secret header (`--http-restricted-api`,
checked by tritonserver before it parses the body), which only the guard adds: a request sent straight to the
private port is refused with 403 instead of being parsed. Refusals answer like Triton does: {"error": "..."}.
"""

from __future__ import annotations

import http.client
import json
import re
import secrets
import threading
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

#: the largest request body the guard accepts (and holds in memory while it forwards it)
DEFAULT_MAX_REQUEST_BYTES = 1 << 30
#: the largest JSON part of an inference request it parses: JSON tensor data is the slow path, images go as binary
DEFAULT_MAX_JSON_BYTES = 64 << 20
#: the header tritonserver's inference API is restricted to (its value is a secret made per server)
TOKEN_HEADER = "moduseg-guard-token"
_INFER_PATH = re.compile(r"^/v2/models/[^/]+(/versions/[^/]+)?/infer$")
#: headers that belong to one connection and are not forwarded (RFC 9110, 7.6.1)
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
               "transfer-encoding", "upgrade", "proxy-connection"}


class Refused(Exception):
    """A request the guard does not forward: its HTTP status and the reason, for the client."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status


def new_token() -> str:
    return secrets.token_hex(16)


def restricted_api_arg(token: str) -> str:
    """The tritonserver argument that admits inference requests only with the guard's header."""
    return f"--http-restricted-api=inference:{TOKEN_HEADER}={token}"


def check_infer_request(headers, body: bytes, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
                        max_json_bytes: int = DEFAULT_MAX_JSON_BYTES) -> None:
    """Raise Refused unless the inference request (`headers`: a case-insensitive mapping, `body`: its bytes as
    sent) is one tritonserver can answer without allocating more than the request carries."""
    encoding = (headers.get("Content-Encoding") or "").strip().lower()
    if encoding in ("gzip", "deflate"):
        # 32 + 15: zlib or gzip framing, whichever the body has; bounded, so a small bomb cannot inflate without end
        inflater = zlib.decompressobj(32 + zlib.MAX_WBITS)
        try:
            plain = inflater.decompress(body, max_request_bytes + 1)
        except zlib.error as error:
            raise Refused(400, f"request body does not inflate as {encoding}: {error}") from error
        if len(plain) > max_request_bytes or inflater.unconsumed_tail:
            raise Refused(413, f"request body inflates to more than {max_request_bytes} bytes")
        body = plain
    elif encoding not in ("", "identity"):
        raise Refused(400, f"Content-Encoding {encoding!r} is not supported (gzip, deflate or none)")
    declared = headers.get("Inference-Header-Content-Length")
    if declared is not None:
        if not declared.strip().isdigit() or int(declared) > len(body):
            raise Refused(400, f"Inference-Header-Content-Length {declared!r} is not a byte count within the "
                               f"{len(body)}-byte body")
        body = body[:int(declared)]
    if len(body) > max_json_bytes:
        raise Refused(413, f"the request's JSON is {len(body)} bytes, over this server's {max_json_bytes}: send "
                           "tensors as binary data (tritonclient does by default)")
    try:
        request = json.loads(body)
    except (ValueError, RecursionError) as error:
        raise Refused(400, f"the request's JSON does not parse: {str(error)[:200]}") from error
    inputs = request.get("inputs") if isinstance(request, dict) else None
    if not isinstance(inputs, list):
        return  # not an inference request the server can read: it answers that itself, allocating nothing
    for index, tensor in enumerate(inputs):
        if not isinstance(tensor, dict):
            continue
        name = tensor.get("name", f"inputs[{index}]")
        shape = tensor.get("shape")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise Refused(400, f"input {name!r}: shape must be a list of integers >= 0, got {str(shape)[:100]}")
        if "data" not in tensor:
            continue  # binary or shared-memory data: the server checks its size before allocating
        expected = 1
        for dim in shape:
            expected *= dim
        carried = _count_values(tensor["data"], expected)
        if carried != expected:
            raise Refused(400, f"input {name!r}: shape {shape} declares {expected} values, the request carries "
                               f"{carried if carried <= expected else f'more than {expected}'}")


def _count_values(data, limit: int) -> int:
    """The scalars in nested JSON lists, counted without recursion; stops past `limit`."""
    count, stack = 0, [data]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
        else:
            count += 1
            if count > limit:
                return count
    return count


class HttpGuard:
    """The front: a threaded HTTP server on (host, port) forwarding to tritonserver's HTTP port `upstream_port` on
    127.0.0.1 with the `token` header. start() binds and serves in a background thread; stop() closes it."""

    def __init__(self, host: str, port: int, upstream_port: int, token: str,
                 max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES, max_json_bytes: int = DEFAULT_MAX_JSON_BYTES):
        if max_request_bytes < 1 or max_json_bytes < 1:
            raise ValueError(f"max_request_bytes and max_json_bytes must be >= 1, got {max_request_bytes}, "
                             f"{max_json_bytes}")
        self.host, self.port, self.upstream_port, self.token = host, port, upstream_port, token
        self.max_request_bytes, self.max_json_bytes = max_request_bytes, max_json_bytes
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # stop() may come from the server's watcher and its owner at once

    def start(self) -> "HttpGuard":
        guard = self

        class Handler(_Handler):
            pass

        Handler.guard = guard
        server = ThreadingHTTPServer((self.host, self.port), Handler)
        server.daemon_threads = True
        self._server = server
        self.port = server.server_address[1]
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name=f"tritonserver-http-guard-{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the port; a second caller returns once the first has closed it."""
        with self._lock:
            server, self._server = self._server, None
            thread, self._thread = self._thread, None
            if server is not None:
                server.shutdown()
                server.server_close()
            if thread is not None:
                thread.join(10)


class _Handler(BaseHTTPRequestHandler):
    guard: HttpGuard
    protocol_version = "HTTP/1.1"  # keep-alive, as tritonclient's connection pools expect
    timeout = 600  # an idle client connection is dropped after this many seconds

    def setup(self) -> None:
        super().setup()
        self._upstream: http.client.HTTPConnection | None = None

    def finish(self) -> None:
        if self._upstream is not None:
            self._upstream.close()
        super().finish()

    def log_message(self, format, *args) -> None:  # noqa: A002 - the base class's signature
        pass  # tritonserver logs requests itself (--log-verbose)

    def do_GET(self) -> None:
        self._forward(b"")

    def do_POST(self) -> None:
        try:
            body = self._read_body()
            if _INFER_PATH.match(self.path.split("?", 1)[0]):
                check_infer_request(self.headers, body, self.guard.max_request_bytes, self.guard.max_json_bytes)
        except Refused as refused:
            self._answer(refused.status, {"error": str(refused)})
            return
        self._forward(body)

    def _read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            self.close_connection = True
            raise Refused(411, "send the request with a Content-Length (chunked bodies are not accepted)")
        length = self.headers.get("Content-Length")
        if length is None:
            return b""
        if not length.strip().isdigit():
            self.close_connection = True
            raise Refused(400, f"Content-Length {length!r} is not a byte count")
        if int(length) > self.guard.max_request_bytes:
            self.close_connection = True  # its body is never read
            raise Refused(413, f"request of {int(length)} bytes is over this server's {self.guard.max_request_bytes}")
        return self.rfile.read(int(length))

    def _forward(self, body: bytes) -> None:
        headers = {key: value for key, value in self.headers.items()
                   if key.lower() not in _HOP_BY_HOP and key.lower() not in ("host", "content-length", "expect",
                                                                             TOKEN_HEADER)}  # expect: answered here
        headers[TOKEN_HEADER] = self.guard.token
        if body or self.command == "POST":
            headers["Content-Length"] = str(len(body))
        for attempt in range(2):  # a kept-alive upstream connection the server has closed is reopened once
            if self._upstream is None:
                self._upstream = http.client.HTTPConnection("127.0.0.1", self.guard.upstream_port)
            try:
                self._upstream.request(self.command, self.path, body=body or None, headers=headers)
                response = self._upstream.getresponse()
                payload = response.read()
                break
            except (OSError, http.client.HTTPException) as error:
                self._upstream.close()
                self._upstream = None
                if attempt:
                    self._answer(503, {"error": f"tritonserver unavailable behind this front: "
                                                f"{type(error).__name__}: {error}"})
                    return
        self.send_response(response.status, response.reason)
        for key, value in response.getheaders():
            if key.lower() not in _HOP_BY_HOP and key.lower() != "content-length":
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    def _answer(self, status: int, document: dict) -> None:
        data = json.dumps(document).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)
