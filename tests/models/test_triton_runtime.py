"""engine.models.triton_runtime: TritonRuntime's argument checks, bounded retries with backoff against a closed port,
timeouts against a silent one (no server needed), and against a real tritonserver (nvidia-pytriton's, python backend,
in its own venv): batches split into concurrent requests, clear errors before and from the server."""

from __future__ import annotations

import socket
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
    runtime._inputs["images"] = ([-1, -1, -1], "UINT8")
    with pytest.raises(ModelError, match="inference of"):
        runtime.run({"images": np.zeros((1, 64, 3), np.uint8)})
    assert sleeps == []  # a refused request is not a transient failure: no retry
    runtime.close()
    # in the repository but not loaded: says so and lists the server's models
    with pytest.raises(ModelError, match=r"not ready.*effnet-lite2_multilayer_python READY"):
        TritonRuntime(url(triton_server, protocol), model_name=triton_model_name(DEFAULT_BACKBONE, "onnx"),
                      protocol=protocol, retries=1, backoff=0.05)
    assert sleeps == [0.05]  # "not ready" is transient: retried once
