"""engine.models.triton_runtime: TritonRuntime's argument checks, bounded retries with backoff against a closed port,
timeouts against a silent one (no server needed), the config's limits and one client per thread (against a stand-in
for tritonclient's client), and against a real tritonserver (nvidia-pytriton's, python backend, in its own venv):
batches split into concurrent requests, clear errors before and from the server, threads sharing a runtime."""

from __future__ import annotations

import socket
import threading
import time
import types

import numpy as np
import pytest

from engine.errors import InputError, ModelError
from engine.registry import DEFAULT_BACKBONE, triton_model_name

pytest.importorskip("tritonclient.grpc", reason="tritonclient[http,grpc] is not installed")

from engine.models import triton_runtime  # noqa: E402
from engine.models.triton_runtime import TritonRuntime  # noqa: E402


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def sleeps(monkeypatch):
    """The backoffs TritonRuntime waits, recorded instead of slept."""
    waited = []
    monkeypatch.setattr(triton_runtime, "time", types.SimpleNamespace(monotonic=time.monotonic,
                                                                      sleep=waited.append))
    return waited


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_closed_port_fails_after_bounded_retries_with_backoff(protocol, sleeps):
    with pytest.raises(ModelError, match=r"failed after 3 attempt\(s\).*Is the server running"):
        TritonRuntime(f"127.0.0.1:{free_port()}", backbone=DEFAULT_BACKBONE, protocol=protocol, retries=2,
                      backoff=0.05, timeout=2.0)
    assert sleeps == [0.05, 0.1]  # exponential backoff between the three attempts


def test_backoff_is_capped(sleeps):
    with pytest.raises(ModelError, match=r"failed after 7 attempt\(s\)"):
        TritonRuntime(f"127.0.0.1:{free_port()}", backbone=DEFAULT_BACKBONE, retries=6, backoff=1.0, timeout=1.0)
    assert sleeps == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_silent_server_times_out(protocol):
    """A port that accepts connections but never answers: each call ends at the timeout, then the retries end."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        with pytest.raises(ModelError, match="failed after 2 attempt"):
            TritonRuntime(f"127.0.0.1:{silent.getsockname()[1]}", backbone=DEFAULT_BACKBONE, protocol=protocol,
                          retries=1, backoff=0.05, timeout=0.5)


def test_argument_checks():
    from engine.models import create_backbone

    with pytest.raises(InputError, match="protocol"):
        TritonRuntime("127.0.0.1:1", backbone=DEFAULT_BACKBONE, protocol="udp")
    with pytest.raises(InputError, match="model_name or backbone"):
        TritonRuntime("127.0.0.1:1")
    for bad in (dict(retries=-1), dict(timeout=0), dict(concurrency=0), dict(max_batch_size=0)):
        with pytest.raises(InputError, match="retries >= 0"):
            TritonRuntime("127.0.0.1:1", backbone=DEFAULT_BACKBONE, **bad)
    with pytest.raises(InputError, match="apply to runtime='triton' only"):
        create_backbone(DEFAULT_BACKBONE, runtime="onnxruntime", url="127.0.0.1:8000")
    with pytest.raises(InputError, match="asks for TLS but ssl=False"):
        TritonRuntime("https://127.0.0.1:1", backbone=DEFAULT_BACKBONE, ssl=False)
    with pytest.raises(InputError, match="the scheme must be"):
        TritonRuntime("ftp://127.0.0.1:1", backbone=DEFAULT_BACKBONE)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_an_https_url_is_never_sent_in_plaintext(triton_server, protocol, sleeps):
    # the local server speaks plaintext only: a TLS client must fail its handshake, not fall back
    scheme = "https" if protocol == "http" else "grpcs"
    with pytest.raises(ModelError):
        TritonRuntime(f"{scheme}://{url(triton_server, protocol)}", backbone=DEFAULT_BACKBONE, protocol=protocol,
                      retries=0, timeout=5)
    plain = TritonRuntime(url(triton_server, protocol), backbone=DEFAULT_BACKBONE, protocol=protocol,
                          headers={"x-moduseg-test": "1"})
    assert plain.describe()["ssl"] is False and plain.headers == {"x-moduseg-test": "1"}
    plain.close()


# -------------------------------------------------------------------------------------- against a real server


def url(server, protocol):
    return server.http_url if protocol == "http" else server.grpc_url


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_large_batches_are_split_and_sent_concurrently(triton_server, protocol, rng):
    from engine.models.backbones import model_path
    from engine.models.runtime import OnnxRuntime

    runtime = TritonRuntime(url(triton_server, protocol), backbone=DEFAULT_BACKBONE, protocol=protocol,
                            concurrency=3)
    assert runtime.model_name == triton_model_name(DEFAULT_BACKBONE, "python")  # the only ready variant
    assert runtime.max_batch_size == 8 and runtime.input_names == ["images"]
    assert runtime.describe()["protocol"] == protocol
    images = rng.integers(0, 256, (19, 64, 96, 3), dtype=np.uint8)  # 8 + 8 + 3
    got = runtime.run({"images": images})["features"]
    want = OnnxRuntime(model_path(DEFAULT_BACKBONE), num_threads=2).run({"images": images})["features"]
    assert got.shape == (19, 4, 6, 680) and float(np.abs(got - want).max()) <= 1e-5
    one_request = TritonRuntime(url(triton_server, protocol), backbone=DEFAULT_BACKBONE, protocol=protocol,
                                concurrency=1, max_batch_size=4)
    np.testing.assert_allclose(one_request.run({"images": images})["features"], got, atol=1e-6)
    runtime.close()
    one_request.close()  # an open HTTP connection holds the server's shutdown for its exit timeout


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_served_errors_are_clear(triton_server, protocol, sleeps):
    runtime = TritonRuntime(url(triton_server, protocol), backbone=DEFAULT_BACKBONE, protocol=protocol)
    with pytest.raises(InputError, match=r"input 'images': shape \(2, 64, 64, 4\) does not fit .*\(-1, -1, -1, 3\)"):
        runtime.run({"images": np.zeros((2, 64, 64, 4), np.uint8)})
    with pytest.raises(InputError, match="cannot be sent as UINT8"):
        runtime.run({"images": np.zeros((1, 64, 64, 3), np.float32)})
    with pytest.raises(InputError, match="unknown outputs"):
        runtime.run({"images": np.zeros((1, 64, 64, 3), np.uint8)}, ["logits"])
    # the server itself refuses a shape the client let through (a wrong rank sent around the check): not retried
    runtime.served.inputs["images"] = ([-1, -1, -1], "UINT8")
    with pytest.raises(ModelError, match="inference of"):
        runtime.run({"images": np.zeros((1, 64, 3), np.uint8)})
    assert sleeps == []  # a refused request is not a transient failure: no retry
    runtime.close()
    # in the repository but not loaded: says so and lists the server's models
    with pytest.raises(ModelError, match=r"not ready.*effnet-lite2_multilayer_python READY"):
        TritonRuntime(url(triton_server, protocol), model_name=triton_model_name(DEFAULT_BACKBONE, "onnx"),
                      protocol=protocol, retries=1, backoff=0.05)
    assert sleeps == [0.05]  # "not ready" is transient: retried once


# ------------------------------------------------------------------ limits and threads, against a fake tritonclient


class _FakeResult:
    def __init__(self, arrays):
        self.arrays = arrays

    def as_numpy(self, name):
        return self.arrays[name]


class _FakeClient:
    """Stands in for tritonclient.http.InferenceServerClient: a model `fake` taking uint8 (B, H, W, 3) images with
    the config parameters of `PARAMETERS`; `features` = the channel sum. Like the real one it must be used only by
    the thread that made it: a call from another thread is recorded in `VIOLATIONS`."""

    PARAMETERS: dict = {}
    MADE: list = []
    VIOLATIONS: list = []

    def __init__(self, url, **kwargs):
        self.owner, self.closed, self.infers = threading.get_ident(), False, 0
        _FakeClient.MADE.append(self)

    def _check(self, what):
        if threading.get_ident() != self.owner:
            _FakeClient.VIOLATIONS.append(what)
        if self.closed:
            raise ConnectionError(f"{what} on a closed client")
        time.sleep(0.001)  # let other threads interleave

    def is_server_live(self, **kwargs):
        self._check("is_server_live")
        return True

    def is_model_ready(self, name, version="", **kwargs):
        self._check("is_model_ready")
        return name == "fake"

    def get_model_repository_index(self, **kwargs):
        return [{"name": "fake", "state": "READY"}]

    def get_model_metadata(self, name, version="", **kwargs):
        self._check("get_model_metadata")
        return {"name": name, "platform": "tensorrt_plan",
                "inputs": [{"name": "images", "datatype": "UINT8", "shape": [-1, -1, -1, 3]}],
                "outputs": [{"name": "features", "datatype": "FP32", "shape": [-1, -1, -1, 1]}]}

    def get_model_config(self, name, version="", **kwargs):
        self._check("get_model_config")
        return {"name": name, "max_batch_size": 8,
                "parameters": {k: {"string_value": v} for k, v in _FakeClient.PARAMETERS.items()}}

    def infer(self, model_name, inputs, model_version="", outputs=None, **kwargs):
        self._check("infer")
        self.infers += 1
        (tensor,) = inputs
        images = np.frombuffer(tensor._raw_data, np.uint8).reshape(tensor.shape())
        return _FakeResult({"features": images.astype(np.float32).sum(-1, keepdims=True)})

    def close(self):
        self.closed = True


@pytest.fixture
def fake_server(monkeypatch):
    import tritonclient.http

    monkeypatch.setattr(tritonclient.http, "InferenceServerClient", _FakeClient)
    _FakeClient.PARAMETERS, _FakeClient.MADE, _FakeClient.VIOLATIONS = {"min_side": "32", "max_side": "1024"}, [], []
    return _FakeClient


def test_limits_in_the_config_are_checked_before_sending(fake_server):
    runtime = TritonRuntime("127.0.0.1:1", model_name="fake")
    assert runtime.limits == {"min_side": 32, "max_side": 1024} and runtime.describe()["limits"] == runtime.limits
    assert runtime.parameters == {"min_side": "32", "max_side": "1024"}
    (client,) = fake_server.MADE
    ok = np.ones((2, 1024, 64, 3), np.uint8)
    np.testing.assert_array_equal(runtime.run({"images": ok})["features"][..., 0], np.full((2, 1024, 64), 3.0))
    assert client.infers == 1
    with pytest.raises(InputError, match=r"padded image 1056 x 64 exceeds max_side 1024 of Triton model fake"):
        runtime.run({"images": np.zeros((1, 1056, 64, 3), np.uint8)})
    with pytest.raises(InputError, match=r"64 x 1040 exceeds max_side 1024"):
        runtime.run({"images": np.zeros((9, 64, 1040, 3), np.uint8)})  # before the batch is even split
    with pytest.raises(InputError, match=r"padded image 16 x 64 is below min_side 32 of Triton model fake"):
        runtime.run({"images": np.zeros((1, 16, 64, 3), np.uint8)})
    assert client.infers == 1  # none of the refused requests reached the server
    runtime.close()
    assert client.closed and runtime.open_clients == 0


def test_no_limits_stated_none_checked(fake_server):
    fake_server.PARAMETERS = {}
    runtime = TritonRuntime("127.0.0.1:1", model_name="fake")
    assert runtime.limits == {}
    assert runtime.run({"images": np.zeros((1, 2048, 32, 3), np.uint8)})["features"].shape == (1, 2048, 32, 1)
    fake_server.PARAMETERS = {"max_side": "big"}
    with pytest.raises(ModelError, match="max_side 'big' is not an integer"):
        TritonRuntime("127.0.0.1:1", model_name="fake")


def test_each_thread_gets_its_own_client(fake_server, rng):
    """Eight threads share one runtime: every client is used only by the thread that made it, every answer is the
    one for that thread's images, and close() closes every thread's client."""
    from concurrent.futures import ThreadPoolExecutor

    runtime = TritonRuntime("127.0.0.1:1", model_name="fake", concurrency=1)
    batches = [rng.integers(0, 256, (int(rng.integers(1, 12)), 32, 48, 3), dtype=np.uint8) for _ in range(64)]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda b: runtime.run({"images": b})["features"], batches))
    for batch, answer in zip(batches, answers):
        np.testing.assert_array_equal(answer, batch.astype(np.float32).sum(-1, keepdims=True))
    assert fake_server.VIOLATIONS == []
    assert 2 <= len(fake_server.MADE) <= 9  # the constructing thread's, and one per pool thread that ran
    assert runtime.open_clients == len(fake_server.MADE)
    runtime.close()
    assert all(client.closed for client in fake_server.MADE) and runtime.open_clients == 0
    # a later call makes a fresh client for its thread
    assert runtime.run({"images": batches[0]})["features"].shape[0] == batches[0].shape[0]
    assert runtime.open_clients == 1


def test_clients_of_ended_threads_are_closed(fake_server):
    runtime = TritonRuntime("127.0.0.1:1", model_name="fake")
    for _ in range(5):
        worker = threading.Thread(target=lambda: runtime.run({"images": np.zeros((1, 32, 32, 3), np.uint8)}))
        worker.start()
        worker.join()
    # each new thread's client replaced the ended thread's: the main thread's and the last worker's stay open
    assert runtime.open_clients == 2
    assert sum(not client.closed for client in fake_server.MADE) == 2 and len(fake_server.MADE) == 6
    runtime.close()


def test_a_runtime_that_fails_to_connect_leaves_no_client_open(fake_server, sleeps):
    with pytest.raises(ModelError, match="not ready"):
        TritonRuntime("127.0.0.1:1", model_name="other", retries=1, backoff=0.01)
    assert fake_server.MADE and all(client.closed for client in fake_server.MADE)


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_threads_sharing_a_runtime_get_their_own_answers_from_a_real_server(triton_server, protocol, rng):
    """Four threads, one TritonRuntime, a real tritonserver: every answer equals in-process onnxruntime's for that
    thread's own images (sizes differ per request, so a crossed answer would not even have the right shape)."""
    from concurrent.futures import ThreadPoolExecutor

    from engine.models.backbones import model_path
    from engine.models.runtime import OnnxRuntime

    runtime = TritonRuntime(url(triton_server, protocol), backbone=DEFAULT_BACKBONE, protocol=protocol,
                            concurrency=2, max_batch_size=2)
    local = OnnxRuntime(model_path(DEFAULT_BACKBONE), num_threads=1)
    batches = [rng.integers(0, 256, (int(rng.integers(1, 5)), 32 * int(rng.integers(1, 4)), 64, 3), dtype=np.uint8)
               for _ in range(12)]
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda b: runtime.run({"images": b})["features"], batches))
    for batch, answer in zip(batches, answers):
        want = local.run({"images": batch})["features"]
        assert answer.shape == want.shape and float(np.abs(answer - want).max()) <= 1e-5
    assert runtime.open_clients >= 2
    runtime.close()
    assert runtime.open_clients == 0


# ------------------------------------------------------------------------------------ the other protocol's port


def test_an_http_client_at_a_grpc_port_is_told_so(not_http_port, sleeps):
    """Was: "HTTPParseError: ('Expected HTTP/, RTSP/ or ICE/', 8)" and nothing more, when an HTTP client (the
    default protocol) was pointed at the gRPC port."""
    with pytest.raises(ModelError, match=r"HTTPParseError.*Is this the gRPC port\? The answer was not HTTP/1.1: try "
                                         r"--protocol grpc \(protocol='grpc'\)"):
        TritonRuntime(f"127.0.0.1:{not_http_port}", model_name="m", protocol="http", timeout=5)


def test_an_http_client_at_a_real_grpc_server_is_told_so(sleeps):
    import grpc
    from concurrent import futures

    server = grpc.server(futures.ThreadPoolExecutor(1))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with pytest.raises(ModelError, match="Is this the gRPC port"):
            TritonRuntime(f"127.0.0.1:{port}", model_name="m", protocol="http", timeout=5)
    finally:
        server.stop(0)


def test_a_grpc_client_at_an_http_port_is_told_so(sleeps):
    import http.server

    class Quiet(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with pytest.raises(ModelError, match=r"Is this the HTTP port\? The answer was not gRPC \(HTTP/2\): try "
                                             r"--protocol http"):
            TritonRuntime(f"127.0.0.1:{server.server_address[1]}", model_name="m", protocol="grpc", timeout=5)
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_a_closed_port_gets_no_protocol_hint(sleeps):
    with pytest.raises(ModelError) as refused:
        TritonRuntime(f"127.0.0.1:{free_port()}", model_name="m", protocol="http", timeout=5, retries=1)
    assert "Is the server running" in str(refused.value) and "gRPC port" not in str(refused.value)
