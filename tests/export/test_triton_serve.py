"""The local server's robustness (engine/serving: LocalServer, the HTTP guard, `moduseg serve` and
`moduseg triton-env`): the served models import the installed engine whatever folder the server is started from,
a tiny request declaring a huge image is refused before tritonserver allocates it, refused requests count as
failures in the server's metrics, a killed `moduseg serve` takes its tritonserver along, and the server venv is
found (or made, by the script shipped in the package) without looking in the working folder."""

import gzip
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import pytest

from engine.errors import ModelError
from engine.export import triton as tx
from engine.serving import server_env
from engine.serving.guard import Refused, check_infer_request
from engine.serving.server import LocalServer, free_port
from engine.registry import DEFAULT_BACKBONE, triton_model_name

pytest.importorskip("tritonclient.grpc", reason="tritonclient[http,grpc] is not installed")
BACKBONE_MODEL = triton_model_name(DEFAULT_BACKBONE, "python")
SEGMENT_MODEL = "moduseg_segment"
#: a [1, 3000000, 3000000, 3] UINT8 image: 27 TB declared by a request of about 100 bytes
HUGE = [1, 3000000, 3000000, 3]


def shadowing_folder(root: Path) -> Path:
    """A folder whose engine/ fails on import, as a checkout's engine/ without its compiled module does."""
    (root / "engine").mkdir(parents=True)
    (root / "engine" / "__init__.py").write_text("raise ImportError('the engine/ of the working folder')\n")
    return root


# ------------------------------------------------------------------------------------- the guard's checks alone

def _json_request(shape, data) -> bytes:
    return json.dumps({"inputs": [{"name": "IMAGE", "shape": shape, "datatype": "UINT8", "data": data}]}).encode()


def test_the_guard_refuses_json_tensors_that_declare_more_than_they_carry():
    check_infer_request({}, _json_request([1, 2, 2, 3], list(range(12))))
    check_infer_request({}, _json_request([1, 2, 2, 3], [[[[0, 1, 2]] * 2] * 2]))  # nested lists count too
    body = _json_request(HUGE, [0, 0, 0])
    with pytest.raises(Refused, match=r"declares 27000000000000 values, the request carries 3") as refused:
        check_infer_request({}, body)
    assert refused.value.status == 400
    with pytest.raises(Refused, match="carries more than 2"):
        check_infer_request({}, _json_request([1, 2], [1, 2, 3]))
    with pytest.raises(Refused, match="shape must be a list of integers >= 0"):
        check_infer_request({}, _json_request([1, -2], []))
    # compressed: inflated (within the limit) before the check
    with pytest.raises(Refused, match="declares 27000000000000"):
        check_infer_request({"Content-Encoding": "gzip"}, gzip.compress(body))
    with pytest.raises(Refused, match="declares 27000000000000"):
        check_infer_request({"Content-Encoding": "deflate"}, zlib.compress(body))
    with pytest.raises(Refused, match="inflates to more than 1000 bytes") as bomb:
        check_infer_request({"Content-Encoding": "gzip"}, gzip.compress(b" " * 10**6 + body), max_request_bytes=1000)
    assert bomb.value.status == 413
    # binary tensors: the JSON header alone is read; the server checks the binary size itself, allocating nothing
    header = json.dumps({"inputs": [{"name": "IMAGE", "shape": HUGE, "datatype": "UINT8",
                                     "parameters": {"binary_data_size": 3}}]}).encode()
    check_infer_request({"Inference-Header-Content-Length": str(len(header))}, header + b"\0\0\0")
    with pytest.raises(Refused, match="Inference-Header-Content-Length '999'"):
        check_infer_request({"Inference-Header-Content-Length": "999"}, header)
    with pytest.raises(Refused, match="over this server's 10") as big:
        check_infer_request({}, body, max_json_bytes=10)
    assert big.value.status == 413
    with pytest.raises(Refused, match="does not parse"):
        check_infer_request({}, b"{" * 100 + b"nope")


# ------------------------------------------------------------------------------------------- a real tritonserver

@pytest.fixture(scope="module")
def segment_repo(triton_launcher, voc_root, backbone_factory, tmp_path_factory):
    """A repository with the python backbone and the segmentation model over a bank of 4 VOC train images."""
    from engine import FeatureBank
    from engine.data import VOCDataset
    from engine.export.triton_segment import write_segment_model
    from engine.models.backbones import model_path

    train = VOCDataset(voc_root, "train")
    root = tmp_path_factory.mktemp("serve_repo")
    FeatureBank.build([train[i] for i in range(4)], backbone_factory(DEFAULT_BACKBONE), train.class_names,
                      progress=False).save(root / "bank")
    repo = root / "repo"
    tx.write_repository(repo, DEFAULT_BACKBONE, variants=["python"], onnx_path=model_path(DEFAULT_BACKBONE),
                        num_threads=1, warmup=False)
    write_segment_model(repo, root / "bank", BACKBONE_MODEL, num_threads=1)
    return repo, [train[i].image for i in range(2)]


@pytest.fixture(scope="module")
def guarded_server(segment_repo, triton_launcher, tmp_path_factory):
    repo, _ = segment_repo
    server = LocalServer(repo, env_dir=triton_launcher.parents[1],
                            log_path=tmp_path_factory.mktemp("guarded") / "tritonserver.log")
    server.start(timeout=180)
    yield server
    server.stop()


@pytest.mark.slow
@pytest.mark.parametrize("folder", ["checkout", "shadowing"])
def test_the_served_segmentation_model_works_started_from_any_folder(folder, segment_repo, triton_launcher,
                                                                     repo_root, tmp_path, monkeypatch):
    """tritonserver's python backend put the server's working folder ('') first on the model's sys.path: started
    from the checkout root, the checkout's engine/ (no compiled module) shadowed the installed one and every
    segmentation request failed; from a folder like `shadowing` the model did not even load."""
    from engine.remote import RemoteEngine

    repo, images = segment_repo
    monkeypatch.chdir(repo_root if folder == "checkout" else shadowing_folder(tmp_path / "shadowing"))
    with LocalServer(repo, env_dir=triton_launcher.parents[1], log_path=tmp_path / "tritonserver.log") as server:
        with RemoteEngine(server.http_url, retries=0) as remote:
            results = remote.segment_batch(images)
    assert [r.label_map.shape for r in results] == [im.shape[:2] for im in images]


def test_the_segment_model_file_imports_the_installed_engine_from_any_folder(segment_repo, triton_launcher,
                                                                               tmp_path):
    """The model.py a repository holds drops the working folder from sys.path before importing the engine, for
    servers started by other means than LocalServer (NGC's, by hand from a checkout root): run here by the server
    venv's Python (a regular install of the engine) with '' first on sys.path, as the stub has it."""
    repo, _ = segment_repo
    shim = repo / SEGMENT_MODEL / "1" / "model.py"
    probe = ("import runpy, sys; sys.path.insert(0, ''); "
             f"runpy.run_path({str(shim)!r}); print(sys.modules['engine'].__file__)")
    run = subprocess.run([str(triton_launcher.parents[1] / "bin" / "python"), "-c", probe], capture_output=True,
                         text=True, cwd=shadowing_folder(tmp_path / "shadowing"), timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().startswith(str(triton_launcher.parents[1]))


def _raw_http(port: int, body: bytes, headers: dict, path: str = f"/v2/models/{SEGMENT_MODEL}/infer"):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        connection.request("POST", path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


@pytest.mark.slow
def test_a_tiny_request_declaring_a_huge_image_is_refused_and_the_server_stays_up(guarded_server, segment_repo):
    """106 bytes of JSON declaring a 27 TB image aborted tritonserver 2.51 (std::bad_alloc in its HTTP frontend):
    the guard refuses it; binary and gRPC forms are refused by the server itself; the server's own HTTP port
    refuses inference without the guard's token, before parsing."""
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    from engine.remote import RemoteEngine

    server = guarded_server
    body = json.dumps({"inputs": [{"name": "IMAGE", "shape": HUGE, "datatype": "UINT8", "data": [0, 0, 0]}]}).encode()
    assert len(body) < 150
    status, answer = _raw_http(server.http_port, body, {"Content-Type": "application/json"})
    assert status == 400 and "declares 27000000000000 values" in json.loads(answer)["error"]
    header = json.dumps({"inputs": [{"name": "IMAGE", "shape": HUGE, "datatype": "UINT8",
                                     "parameters": {"binary_data_size": 3}}]}).encode()
    status, answer = _raw_http(server.http_port, header + b"\0\0\0",
                               {"Inference-Header-Content-Length": str(len(header))})
    assert status == 400 and "byte size mismatch" in json.loads(answer)["error"]
    status, answer = _raw_http(server.server_http_port, body, {"Content-Type": "application/json"})
    assert status == 403 and "restricted" in json.loads(answer)["error"]
    stub = service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(server.grpc_url))
    request = service_pb2.ModelInferRequest(model_name=SEGMENT_MODEL)
    tensor = request.inputs.add(name="IMAGE", datatype="UINT8", shape=HUGE)
    tensor.contents.uint_contents.extend([0, 0, 0])
    with pytest.raises(grpc.RpcError) as refused:
        stub.ModelInfer(request, timeout=60)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    status, answer = _raw_http(server.http_port, b"x" * 100, {"Content-Length": str(2 << 30)})
    assert status == 413  # over max_request_bytes: refused before the body is read
    time.sleep(0.5)
    assert server.process.poll() is None, server.log_tail()
    _, images = segment_repo
    with RemoteEngine(server.http_url, retries=0) as remote:  # and it still segments, through the guard
        assert remote.segment(images[0]).label_map.shape == images[0].shape[:2]


def _request_counts(server) -> tuple[int, int]:
    """(success, failure) request counts of the segmentation model, from the metrics endpoint."""
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    counts = {"success": 0, "failure": 0}
    for line in text.splitlines():
        match = re.match(r'nv_inference_request_(success|failure)\{(.*)\} (\d+)', line)
        if match and f'model="{SEGMENT_MODEL}"' in match.group(2):
            counts[match.group(1)] += int(match.group(3))
    return counts["success"], counts["failure"]


@pytest.mark.slow
def test_refused_requests_count_as_failures_in_the_metrics(guarded_server, segment_repo):
    """The python backend of tritonserver 2.51 counted a request the model answered with an error as a success;
    the model raises when every request of an execution is refused, which the server counts as failures."""
    import tritonclient.http as http

    server = guarded_server
    _, images = segment_repo
    client = http.InferenceServerClient(server.http_url)
    try:
        before = _request_counts(server)
        empty = http.InferInput("IMAGE", [1, 0, 5, 3], "UINT8")
        empty.set_data_from_numpy(np.zeros((1, 0, 5, 3), np.uint8))
        with pytest.raises(Exception, match="empty image of shape"):
            client.infer(SEGMENT_MODEL, [empty])
        refused = _request_counts(server)
        assert (refused[0] - before[0], refused[1] - before[1]) == (0, 1)
        good = http.InferInput("IMAGE", [1, *images[0].shape], "UINT8")
        good.set_data_from_numpy(images[0][None])
        client.infer(SEGMENT_MODEL, [good])
        after = _request_counts(server)
        assert (after[0] - refused[0], after[1] - refused[1]) == (1, 0)
    finally:
        client.close()


def _descendants(pid: int) -> set[int]:
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] == "Z")  # a zombie is gone


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_a_killed_serve_takes_its_tritonserver_along(triton_launcher, tmp_path):
    """kill -9 of `moduseg serve` left tritonserver (and its stubs) running, holding the ports."""
    from engine.models.backbones import model_path

    tx.write_repository(tmp_path / "repo", DEFAULT_BACKBONE, variants=["python"],
                        onnx_path=model_path(DEFAULT_BACKBONE), warmup=False)
    ports = [free_port() for _ in range(3)]
    command = [sys.executable, "-m", "engine.cli", "serve", "--repo", str(tmp_path / "repo"),
               "--http-port", str(ports[0]), "--grpc-port", str(ports[1]), "--metrics-port", str(ports[2]),
               "--env", str(triton_launcher.parents[1])]
    cli = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    server_pid, family = None, set()
    try:
        text = ""
        for line in cli.stdout:
            text += line
            if line.startswith("use:"):
                break
        server_pid = int(re.search(r"tritonserver \(pid (\d+)\)", text).group(1))
        family = {server_pid} | _descendants(server_pid)
        assert len(family) >= 2, text  # the server and its model's stub
        cli.send_signal(signal.SIGKILL)
        cli.wait(10)
        deadline = time.monotonic() + 60
        while any(_alive(pid) for pid in family) and time.monotonic() < deadline:
            time.sleep(0.25)
        assert not [pid for pid in family if _alive(pid)], "tritonserver or a stub outlived `moduseg serve`"
        assert not any(_listening(port) for port in ports)
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait()
        for pid in family:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
def test_a_server_started_from_a_short_lived_thread_outlives_the_thread(triton_launcher, tmp_path):
    """The parent-death signal follows the thread that forked: servers are started from one long-lived thread, so
    that one started from a thread that then ends (a restart in a worker thread) keeps running."""
    from engine.models.backbones import model_path

    tx.write_repository(tmp_path / "repo", DEFAULT_BACKBONE, variants=["python"],
                        onnx_path=model_path(DEFAULT_BACKBONE), warmup=False)
    server = LocalServer(tmp_path / "repo", env_dir=triton_launcher.parents[1], log_path=tmp_path / "log")
    starter = threading.Thread(target=server.start, kwargs={"timeout": 180})
    starter.start()
    starter.join(200)
    try:
        time.sleep(1.0)
        assert server.process is not None and server.process.poll() is None, server.log_tail()
        with urllib.request.urlopen(f"http://{server.http_url}/v2/health/ready", timeout=5) as response:
            assert response.status == 200
    finally:
        server.stop()
    assert not _listening(server.http_port)  # the guard closed with it


# ------------------------------------------------------------------------------------------------- the venv

def test_the_server_env_is_found_by_variable_checkout_or_user_folder_never_the_working_folder(tmp_path,
                                                                                              monkeypatch):
    def make_env(path: Path) -> Path:
        (path / "bin").mkdir(parents=True)
        (path / server_env.SERVER_LAUNCHER).write_text("#!/bin/sh\n")
        return path

    work = tmp_path / "work"
    make_env(work / server_env.SERVER_ENV_DIR)  # ./.triton-venv: never used unless named
    monkeypatch.chdir(work)
    monkeypatch.delenv(server_env.ENV_VARIABLE, raising=False)
    monkeypatch.setenv("MODUSEG_CACHE", str(tmp_path / "cache"))
    # an installed engine (no checkout around it): the per-user venv
    monkeypatch.setattr(server_env, "_source_root", lambda: None)
    assert server_env.default_env_dir() == tmp_path / "cache" / server_env.USER_ENV_DIR
    with pytest.raises(ModelError, match=r"make one with `moduseg triton-env.*pass --env \.triton-venv"):
        server_env.server_env()
    make_env(tmp_path / "cache" / server_env.USER_ENV_DIR)
    assert server_env.server_env() == tmp_path / "cache" / server_env.USER_ENV_DIR / server_env.SERVER_LAUNCHER
    # run from a checkout: its .triton-venv first when it holds one, else the per-user one
    checkout = tmp_path / "checkout"
    monkeypatch.setattr(server_env, "_source_root", lambda: checkout)
    assert server_env.default_env_dir() == tmp_path / "cache" / server_env.USER_ENV_DIR
    make_env(checkout / server_env.SERVER_ENV_DIR)
    assert server_env.default_env_dir() == checkout / server_env.SERVER_ENV_DIR
    # the variable wins, alone
    monkeypatch.setenv(server_env.ENV_VARIABLE, str(tmp_path / "named"))
    assert server_env.default_env_dir() == tmp_path / "named"
    with pytest.raises(ModelError, match=f"no Triton server environment at {tmp_path / 'named'}:"):
        server_env.server_env()
    # the script that makes one ships inside the package, and a checkout's scripts/ runs it
    assert server_env.ENV_SCRIPT.is_file() and server_env.ENV_SCRIPT.parent == Path(server_env.__file__).parent


@pytest.mark.slow
def test_an_installed_engine_makes_its_server_env_with_moduseg_triton_env(tmp_path):
    """`moduseg triton-env` of a regular (non-editable) install, run outside any checkout: the packaged script
    copies the installed engine (its compiled module included) into the server venv with its requirements."""
    import site

    import engine

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    installed = tmp_path / "installed"
    shutil.copytree(os.path.dirname(engine.__file__), installed / "engine",
                    ignore=shutil.ignore_patterns("__pycache__"))
    dist_infos = [d for p in site.getsitepackages() for d in Path(p).glob("moduseg_engine-*.dist-info")]
    if not dist_infos:
        pytest.skip("moduseg-engine's dist-info is not in this environment's site-packages")
    shutil.copytree(dist_infos[0], installed / dist_infos[0].name)
    (purelib,) = (venv / "lib").glob("python3*/site-packages")
    (purelib / "moduseg_test.pth").write_text("\n".join([str(installed), *site.getsitepackages()]) + "\n")
    env = tmp_path / "server-env"
    run = subprocess.run([str(venv / "bin" / "python"), "-m", "engine.cli", "triton-env", "--env", str(env)],
                         cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    assert "ready:" in run.stdout and (env / server_env.SERVER_LAUNCHER).is_file()
    assert "engine-installed-" in (env / ".moduseg-triton-env").read_text()
    check = subprocess.run([str(env / "bin" / "python"), "-c",
                            "import engine, engine._C, numpy; print(engine.__file__, numpy.__version__)"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stderr[-2000:]
    where, numpy_version = check.stdout.split()
    assert where.startswith(str(env)) and numpy_version.startswith("1.")
