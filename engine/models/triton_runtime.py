"""A Runtime that runs the model on a Triton Inference Server (tritonclient, HTTP or gRPC).

Same face as the in-process runtimes (`run({name: array}) -> {name: array}`), so a backbone served by Triton computes
what it computes locally. The runtime

- finds the model (given by name, or the first ready one of a backbone's generated variants: tensorrt, onnx, python),
  reads its metadata and config (a ServedModel, engine.models.triton_model), and checks each request against them
  before sending (names, ranks, fixed dims, dtypes, and the limits the config states as parameters: `min_side` /
  `max_side` of an image's padded side, e.g. a TensorRT plan's optimisation profile): a mismatch is an InputError
  naming the input, the limit and the model, not a server round trip;
- splits a batch into requests of at most the model's max_batch_size and keeps up to `concurrency` of them in flight,
  so the server's dynamic batcher and instances see parallel work;
- retries transient failures (server unreachable, model not ready / unavailable, timeouts) at most `retries` times
  with exponential backoff, then raises ModelError saying what was tried; other errors (bad shapes, a failing model)
  are raised at once;
- is thread-safe: tritonclient's client objects are not, so every thread that uses the runtime gets its own client,
  made on its first call with the same arguments (its own HTTP connection pool or gRPC channel); close() closes them
  all, and a client whose thread has ended is closed when the next one is made.

    runtime = TritonRuntime("127.0.0.1:8001", backbone="effnet-lite2/block19", protocol="grpc")
    backbone = create_backbone("effnet-lite2/block19", runtime="triton", url="127.0.0.1:8000")
"""

from __future__ import annotations

import threading
import time
import weakref
from typing import Callable, Mapping, Sequence

import numpy as np

from ..errors import InputError, ModelError
from ..registry import triton_model_name
from .runtime import Runtime
from .triton_model import ServedModel

PROTOCOLS = ("http", "grpc")
DEFAULT_URLS = {"http": "127.0.0.1:8000", "grpc": "127.0.0.1:8001"}
#: variant preference when only the backbone is named: the fastest the server has loaded.
VARIANT_ORDER = ("tensorrt", "onnx", "python")
_TRANSIENT_STATUS = {"StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED", "StatusCode.RESOURCE_EXHAUSTED",
                     "503", "504", "429"}
_TRANSIENT_TEXT = ("connection refused", "failed to connect", "not ready", "unavailable", "socket closed",
                   "connection reset", "timed out", "timeout", "deadline exceeded", "broken pipe")
_MAX_BACKOFF = 8.0


class _Transient(Exception):
    """A failure worth retrying (wraps the original)."""


def _is_transient(error: BaseException) -> bool:
    if isinstance(error, (ConnectionError, TimeoutError)):
        return True
    if type(error).__name__ in ("Timeout", "ConnectionTimeout", "NetworkTimeout"):  # gevent / geventhttpclient
        return True
    status = getattr(error, "status", None)
    status = status() if callable(status) else status
    if status is not None and str(status) in _TRANSIENT_STATUS:
        return True
    message = getattr(error, "message", None)
    text = (message() if callable(message) else str(error) if message is None else str(message)) or str(error)
    if status is None or str(status) in ("400", "StatusCode.INVALID_ARGUMENT", "StatusCode.NOT_FOUND"):
        # unknown-model answers while a model is (re)loading read "... is not ready" / "unavailable"
        return any(key in text.lower() for key in _TRANSIENT_TEXT)
    return False


#: what an HTTP/1.1 client meets at a gRPC port (the server answers in HTTP/2 frames, or drops the connection), and
#: what a gRPC client meets at an HTTP port (geventhttpclient's and grpc's wording, lowercase)
_NOT_HTTP1 = ("httpparseerror", "expected http/", "httpconnectionclosed", "connection closed", "connection reset",
              "connectionreseterror", "remotedisconnected", "badstatusline")
_NOT_HTTP2 = ("parsing http/2", "http1.x server")


def _protocol_hint(protocol: str, error: BaseException) -> str:
    """A hint when the server's answer was not in the protocol asked for: the port is likely the other protocol's
    (Triton serves HTTP on 8000 and gRPC on 8001 by default); "" otherwise."""
    if isinstance(error, _Transient):
        return ""
    text = f"{type(error).__name__} {_describe(error)}".lower()
    if protocol == "http" and any(key in text for key in _NOT_HTTP1):
        return ("Is this the gRPC port? The answer was not HTTP/1.1: try --protocol grpc (protocol='grpc'), or the "
                "server's HTTP port (8000 by default)")
    if protocol == "grpc" and any(key in text for key in _NOT_HTTP2):
        return ("Is this the HTTP port? The answer was not gRPC (HTTP/2): try --protocol http (protocol='http'), or "
                "the server's gRPC port (8001 by default)")
    return ""


def _describe(error: BaseException) -> str:
    if isinstance(error, _Transient):
        return str(error)
    message = getattr(error, "message", None)
    text = message() if callable(message) else str(error)
    return f"{type(error).__name__}: {text or error!r}"


class TritonRuntime(Runtime):
    """Runs a model on a Triton server.

    url: "host:port" of the server's HTTP or gRPC endpoint (default 127.0.0.1:8000 for http, :8001 for grpc).
    model_name: the Triton model; None picks the first ready of `backbone`'s generated variants (tensorrt, onnx,
        python; engine.registry.triton_model_name).
    backbone: backbone name used when model_name is None.
    protocol: "http" or "grpc".
    model_version: "" for the server's policy (latest).
    timeout: seconds allowed for connecting and for each request's answer; a slower answer is a transient failure.
    retries: further attempts after a transient failure (0: none); waits backoff, 2*backoff, 4*backoff, ... (max 8 s).
    concurrency: requests in flight at once when a batch is split (at most max_batch_size images each).
    max_batch_size: images per request; None takes the model's max_batch_size (a model without batching gets one
        request per image).
    ssl: TLS to the server; None (default) follows the url's scheme ("https://" or "grpcs://" mean TLS), never
        silently plaintext for an https url. ssl_options: passed to tritonclient as they are (http: `ssl_options`,
        `insecure`; grpc: `root_certificates`, `private_key`, `certificate_chain`).
    headers: HTTP headers or gRPC metadata sent with every call (authentication, routing).
    """

    name = "triton"

    def __init__(self, url: str | None = None, model_name: str | None = None, backbone: str | None = None,
                 protocol: str = "http", model_version: str = "", timeout: float = 60.0, retries: int = 3,
                 backoff: float = 0.5, concurrency: int = 4, max_batch_size: int | None = None,
                 ssl: bool | None = None, ssl_options: dict | None = None, headers: dict | None = None) -> None:
        if protocol not in PROTOCOLS:
            raise InputError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
        if timeout <= 0 or retries < 0 or backoff < 0 or concurrency < 1 or \
                (max_batch_size is not None and max_batch_size < 1):
            raise InputError(f"need timeout > 0, retries >= 0, backoff >= 0, concurrency >= 1, max_batch_size >= 1; "
                             f"got {timeout}, {retries}, {backoff}, {concurrency}, {max_batch_size}")
        if model_name is None and backbone is None:
            raise InputError("TritonRuntime needs model_name or backbone")
        url = url or DEFAULT_URLS[protocol]
        scheme, _, rest = url.partition("://")
        if rest:
            if scheme not in ("http", "https", "grpc", "grpcs"):
                raise InputError(f"Triton url {url!r}: the scheme must be http, https, grpc or grpcs")
            if ssl is False and scheme in ("https", "grpcs"):
                raise InputError(f"Triton url {url!r} asks for TLS but ssl=False")
            ssl = scheme in ("https", "grpcs") if ssl is None else ssl
            url = rest
        self.ssl, self.headers = bool(ssl), dict(headers or {})
        self.url, self.protocol, self.model_version = url.rstrip("/"), protocol, str(model_version)
        self.timeout, self.retries, self.backoff, self.concurrency = float(timeout), int(retries), float(backoff), \
            int(concurrency)
        try:
            if protocol == "http":
                import tritonclient.http as client_module
            else:
                import tritonclient.grpc as client_module
        except ImportError as error:
            raise ModelError("the Triton runtime needs tritonclient: pip install 'tritonclient[http,grpc]'") from error
        self._module = client_module
        self._ssl_options = dict(ssl_options or {})
        self._local = threading.local()
        self._clients: dict[int, tuple] = {}  # id of the owning thread -> (weakref to the thread, client)
        self._clients_lock = threading.Lock()
        self.client  # the constructing thread's client: a malformed url fails here  # noqa: B018
        try:
            self._wait_live()
            self.model_name = model_name or self._pick_model(backbone)
            self._load_metadata()
        except BaseException:
            self.close()  # no connection left open by a runtime that never came to be
            raise
        self.max_batch_size = max_batch_size or (self.model_max_batch_size or None)

    # ------------------------------------------------------------------------------------------------- plumbing

    @property
    def client(self):
        """This thread's tritonclient client (made on the thread's first use: the client objects are not
        thread-safe, and an HTTP client's connection pool belongs to the thread that made it)."""
        client = getattr(self._local, "client", None)
        if client is None:
            client = self._make_client()
            self._local.client = client
        return client

    def _make_client(self):
        module = self._module
        try:
            if self.protocol == "http":
                client = module.InferenceServerClient(self.url, concurrency=self.concurrency,
                                                      connection_timeout=self.timeout, network_timeout=self.timeout,
                                                      ssl=self.ssl, **self._ssl_options)
            else:
                client = module.InferenceServerClient(self.url, ssl=self.ssl, **self._ssl_options)
        except Exception as error:  # a malformed url
            raise ModelError(f"cannot make a Triton {self.protocol} client for {self.url}: {_describe(error)}") \
                from error
        thread = threading.current_thread()
        with self._clients_lock:
            ended = [key for key, (owner, _) in self._clients.items() if owner() is None or not owner().is_alive()]
            stale = [self._clients.pop(key)[1] for key in ended]
            self._clients[id(thread)] = (weakref.ref(thread), client)
        for old in stale:
            _close_quietly(old)
        return client

    @property
    def open_clients(self) -> int:
        """How many per-thread clients are open."""
        with self._clients_lock:
            return len(self._clients)

    def call_options(self) -> dict:
        """Keyword arguments every client call takes: the headers, and gRPC's per-call timeout."""
        extra = {"headers": self.headers} if self.headers else {}
        return extra if self.protocol == "http" else {"client_timeout": self.timeout, **extra}

    def _retrying(self, what: str, call: Callable[[], object]):
        """call() with bounded retries on transient failures; ModelError naming `what` when they run out."""
        attempt, start = 0, time.monotonic()
        while True:
            try:
                result = call()
                if result is False:  # readiness probes answer False while loading
                    raise _Transient(f"{what}: not ready")
                return result
            except (InputError, ModelError):
                raise
            except Exception as error:  # noqa: BLE001 - classified below
                hint = _protocol_hint(self.protocol, error)
                if not (isinstance(error, _Transient) or _is_transient(error)):
                    raise ModelError(f"Triton {self.protocol} {self.url}: {what} failed: {_describe(error)}"
                                     + (f". {hint}" if hint else "")) from error
                if attempt >= self.retries:
                    raise ModelError(
                        f"Triton {self.protocol} server at {self.url}: {what} failed after {attempt + 1} attempt(s) "
                        f"over {time.monotonic() - start:.1f} s (timeout {self.timeout:g} s per call): "
                        f"{_describe(error)}. " + (hint or "Is the server running (moduseg serve --repo DIR) and the "
                                                   "model loaded?")) from error
                time.sleep(min(self.backoff * (2 ** attempt), _MAX_BACKOFF))
                attempt += 1

    def _wait_live(self) -> None:
        self._retrying("server liveness check", lambda: self.client.is_server_live(**self.call_options()))

    def _pick_model(self, backbone: str) -> str:
        candidates = [triton_model_name(backbone, variant) for variant in VARIANT_ORDER]

        def first_ready():
            ready = {entry.get("name") for entry in self.repository_index() if entry.get("state") == "READY"}
            for name in candidates:
                if name in ready:
                    return name
            raise _Transient(f"none of {candidates} is ready (ready models: {sorted(ready) or 'none'})")

        return self._retrying(f"finding a ready model of backbone {backbone}", first_ready)

    def _load_metadata(self) -> None:
        name, version = self.model_name, self.model_version
        try:
            self._retrying(f"model {name!r} readiness",
                           lambda: self.client.is_model_ready(name, version, **self.call_options()))
        except ModelError as error:
            raise ModelError(f"{error} The server's models: {self.repository_states()}") from error
        if self.protocol == "http":
            metadata = self._retrying("model metadata",
                                      lambda: self.client.get_model_metadata(name, version, **self.call_options()))
            config = self._retrying("model config",
                                    lambda: self.client.get_model_config(name, version, **self.call_options()))
        else:
            metadata = self._retrying("model metadata", lambda: self.client.get_model_metadata(
                name, version, as_json=True, **self.call_options()))
            config = self._retrying("model config", lambda: self.client.get_model_config(
                name, version, as_json=True, **self.call_options())).get("config", {})
        self.served = served = ServedModel.from_answers(name, metadata, config)
        self.model_max_batch_size, self.parameters, self.limits = served.max_batch_size, served.parameters, \
            served.limits
        self.input_names, self.output_names, self.platform = list(served.inputs), list(served.outputs), \
            served.platform

    # ---------------------------------------------------------------------------------------------------- run

    def request(self, arrays: Mapping[str, np.ndarray], outputs: Sequence[str]):
        """tritonclient's inputs and requested outputs of one request of `arrays` (checked ones)."""
        module = self._module
        infer_inputs = []
        for name, array in arrays.items():
            tensor = module.InferInput(name, list(array.shape), self.served.inputs[name][1])
            tensor.set_data_from_numpy(array)
            infer_inputs.append(tensor)
        infer_outputs = [module.InferRequestedOutput(name) for name in outputs]
        return infer_inputs, infer_outputs

    def infer(self, arrays: Mapping[str, np.ndarray], outputs: Sequence[str]) -> dict[str, np.ndarray]:
        """One synchronous request of checked `arrays`, retried on transient failures."""
        def call():
            infer_inputs, infer_outputs = self.request(arrays, outputs)
            result = self.client.infer(self.model_name, infer_inputs, model_version=self.model_version,
                                       outputs=infer_outputs, **self.call_options())
            return {name: result.as_numpy(name) for name in outputs}

        shapes = {name: tuple(a.shape) for name, a in arrays.items()}
        return self._retrying(f"inference of {self.model_name} on {shapes}", call)

    def run(self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        requested = self._check_request(inputs, outputs)
        arrays = self.served.check(inputs)
        if not self.model_max_batch_size:
            return self.infer(arrays, requested)
        batch = next(iter(arrays.values())).shape[0]
        step = self.max_batch_size or batch
        chunks = [{name: array[start:start + step] for name, array in arrays.items()}
                  for start in range(0, batch, step)]
        if len(chunks) == 1 or self.concurrency == 1:
            results = [self.infer(chunk, requested) for chunk in chunks]
        else:
            results = []
            for first in range(0, len(chunks), self.concurrency):
                results += _infer_concurrently(self, chunks[first:first + self.concurrency], requested)
        merged = {name: np.concatenate([r[name] for r in results]) for name in requested}
        for name, array in merged.items():
            if array.shape[0] != batch:
                raise ModelError(f"Triton model {self.model_name} returned {array.shape[0]} rows of {name!r} for a "
                                 f"batch of {batch}")
        return merged

    def repository_index(self) -> list[dict]:
        """The server's models, [{"name": ..., "state": ...}] (one call, not retried)."""
        index = self.client.get_model_repository_index(**self.call_options())
        return index if isinstance(index, list) else [{"name": m.name, "state": m.state} for m in index.models]

    def repository_states(self) -> str:
        """The server's models and their states, for error messages."""
        try:
            entries = self.repository_index()
        except Exception as error:  # noqa: BLE001 - only for the message
            return f"(repository index unavailable: {_describe(error)})"
        return ", ".join(f"{e.get('name')} {e.get('state') or 'UNLOADED'}" for e in entries) or "none"

    def describe(self) -> dict:
        return {**super().describe(), "url": self.url, "protocol": self.protocol, "ssl": self.ssl,
                "model": self.model_name, "platform": self.platform, "max_batch_size": self.max_batch_size,
                "limits": dict(self.limits)}

    def close(self) -> None:
        """Close every thread's client (a later call makes a new one for its thread)."""
        with self._clients_lock:
            clients = [client for _, client in self._clients.values()]
            self._clients.clear()
            self._local = threading.local()
        for client in clients:
            _close_quietly(client)


def _close_quietly(client) -> None:
    try:
        client.close()
    except Exception:  # noqa: BLE001 - closing a dead connection
        pass


def _infer_concurrently(runtime: "TritonRuntime", chunks: list[dict[str, np.ndarray]],
                        outputs: Sequence[str]) -> list:
    """Send every chunk at once (the client bounds what is in flight); a chunk that fails goes through the
    retrying synchronous path."""
    results: list = [None] * len(chunks)
    if runtime.protocol == "http":
        handles = []
        for chunk in chunks:
            infer_inputs, infer_outputs = runtime.request(chunk, outputs)
            try:
                handles.append(runtime.client.async_infer(runtime.model_name, infer_inputs,
                                                          model_version=runtime.model_version,
                                                          outputs=infer_outputs, **runtime.call_options()))
            except Exception:  # noqa: BLE001 - retried synchronously below
                handles.append(None)
        for index, handle in enumerate(handles):
            try:
                if handle is not None:
                    result = handle.get_result(timeout=runtime.timeout)
                    results[index] = {name: result.as_numpy(name) for name in outputs}
            except Exception:  # noqa: BLE001
                results[index] = None
    else:
        done = threading.Semaphore(0)
        answers: list = [None] * len(chunks)
        sent = 0
        for index, chunk in enumerate(chunks):
            infer_inputs, infer_outputs = runtime.request(chunk, outputs)

            def callback(result, error, index=index):
                answers[index] = None if error is not None else {n: result.as_numpy(n) for n in outputs}
                done.release()

            try:
                runtime.client.async_infer(runtime.model_name, infer_inputs, callback,
                                           model_version=runtime.model_version, outputs=infer_outputs,
                                           **runtime.call_options())
                sent += 1
            except Exception:  # noqa: BLE001
                pass
        deadline = time.monotonic() + runtime.timeout * max(1, len(chunks))
        for _ in range(sent):
            if not done.acquire(timeout=max(0.0, deadline - time.monotonic())):
                break
        results = list(answers)
    for index, chunk in enumerate(chunks):
        if results[index] is None:
            results[index] = runtime.infer(chunk, outputs)
    return results
