"""The server-side segmentation model (engine/export/triton_segment*.py) and its client (engine/remote.py): config
text, the model's execute() against a fake python backend, and the whole pipeline through the real local
tritonserver (HTTP and gRPC) against the in-process engine."""

import json
import threading
import types

import numpy as np
import pytest

from engine.errors import InputError, ModelError
from engine.export.triton_config import check_config, to_text, validate_config
from engine.export.triton_segment import SEGMENT_MODEL, segment_config, write_segment_model
from engine.registry import DEFAULT_BACKBONE, triton_model_name

pytest.importorskip("tritonclient.grpc", reason="tritonclient[http,grpc] is not installed")
BACKBONE_MODEL = triton_model_name(DEFAULT_BACKBONE, "python")


# ---------------------------------------------------------------------------------------------------- config

def test_the_config_states_ragged_batching_types_and_parameters():
    built = segment_config(SEGMENT_MODEL, BACKBONE_MODEL, ["background", "cat"], max_batch_size=6, instances=2,
                           queue_delay_us=500, num_threads=3, backbone_batch_size=4,
                           execution_env="$$TRITON_MODEL_DIRECTORY/env.tar.gz")
    config = validate_config(to_text(built, "segmentation"), SEGMENT_MODEL)  # the text parses back into the message
    assert config == built
    assert config.backend == "python" and config.max_batch_size == 6
    assert config.input[0].allow_ragged_batch and list(config.input[0].dims) == [-1, -1, 3]
    assert {o.name: o.data_type for o in config.output} == {"LABELS": 2, "SEGMENTS": 13}  # UINT8, STRING
    assert config.dynamic_batching.max_queue_delay_microseconds == 500
    assert config.instance_group[0].count == 2 and config.instance_group[0].kind == 2  # KIND_CPU
    parameters = {key: value.string_value for key, value in config.parameters.items()}
    assert parameters["backbone_model"] == BACKBONE_MODEL and parameters["num_threads"] == "3"
    assert json.loads(parameters["class_names"]) == ["background", "cat"]
    assert parameters["EXECUTION_ENV_PATH"] == "$$TRITON_MODEL_DIRECTORY/env.tar.gz"
    plain = segment_config(SEGMENT_MODEL, BACKBONE_MODEL, ["a"])
    assert "EXECUTION_ENV_PATH" not in plain.parameters and "max_side" not in plain.parameters
    limited = segment_config(SEGMENT_MODEL, BACKBONE_MODEL, ["a"], max_side=1024)
    assert limited.parameters["max_side"].string_value == "1024"


def test_labels_widen_past_256_classes_and_bad_knobs_are_refused():
    config = check_config(segment_config(SEGMENT_MODEL, "b", [str(i) for i in range(300)]), SEGMENT_MODEL)
    assert {o.name: o.data_type for o in config.output}["LABELS"] == 8  # INT32
    with pytest.raises(InputError, match="max_batch_size"):
        segment_config(SEGMENT_MODEL, "b", ["a"], max_batch_size=0)


def test_a_cuda_config_places_gpu_instances_that_keep_tensors_on_the_device():
    config = check_config(segment_config(SEGMENT_MODEL, BACKBONE_MODEL, ["a", "b"], instances=2, device="cuda",
                                         gpus=[0, 2]), SEGMENT_MODEL)
    group = config.instance_group[0]
    assert group.kind == 1 and group.count == 2 and list(group.gpus) == [0, 2]  # KIND_GPU
    parameters = {key: value.string_value for key, value in config.parameters.items()}
    assert parameters["device"] == "cuda" and parameters["FORCE_CPU_ONLY_INPUT_TENSORS"] == "no"
    everywhere = segment_config(SEGMENT_MODEL, BACKBONE_MODEL, ["a"], device="cuda")
    assert everywhere.instance_group[0].kind == 1 and not everywhere.instance_group[0].gpus
    # the CPU config is the one written before GPU instances existed: KIND_CPU, no device parameters
    plain = segment_config(SEGMENT_MODEL, BACKBONE_MODEL, ["a"])
    assert plain.instance_group[0].kind == 2 and not plain.instance_group[0].gpus  # KIND_CPU
    assert "FORCE_CPU_ONLY_INPUT_TENSORS" not in plain.parameters and "device" not in plain.parameters
    assert plain == segment_config(SEGMENT_MODEL, BACKBONE_MODEL, ["a"], device="cpu")
    with pytest.raises(InputError, match="device must be one of"):
        segment_config(SEGMENT_MODEL, BACKBONE_MODEL, ["a"], device="gpu")
    with pytest.raises(InputError, match="need device 'cuda'"):
        segment_config(SEGMENT_MODEL, BACKBONE_MODEL, ["a"], gpus=[0])
    with pytest.raises(InputError, match="GPU ids >= 0"):
        segment_config(SEGMENT_MODEL, BACKBONE_MODEL, ["a"], device="cuda", gpus=[-1])


# ------------------------------------------------------------------------------- the model against a fake backend

def _stub_backbone():
    """A backbone whose served model gives float32 features and float16 saliency from the images."""
    def run(arrays, outputs):
        images = arrays["images"].astype(np.float32)
        made = {"features": images / 255.0, "saliency": (images[..., :1] / 7.0).astype(np.float16)}
        return {name: made[name] for name in outputs}

    return types.SimpleNamespace(runtime=types.SimpleNamespace(run=run))


def test_bls_outputs_on_the_device_equal_the_host_arrays_from_either_memory(pb_utils):
    torch = pytest.importorskip("torch")
    from engine.models.bls_runtime import BLSRuntime

    images = np.random.default_rng(0).integers(0, 256, (2, 8, 12, 3), dtype=np.uint8)
    names = ["features", "saliency"]
    pb_utils.backbone = _stub_backbone()
    on_host = BLSRuntime("backbone", ["images"], names, pb_utils.module)
    assert not on_host.keeps_outputs_on_device
    expected = on_host.run({"images": images})
    for outputs_on in (None, "cpu"):  # host memory (as_numpy), then "GPU" memory (DLPack only) held by the CPU here
        pb_utils.outputs_on = outputs_on
        pb_utils.options.clear()
        runtime = BLSRuntime("backbone", ["images"], names, pb_utils.module, device_outputs=True, device="cpu")
        assert runtime.keeps_outputs_on_device
        got = runtime.run_on_device({"images": images})
        assert sorted(got) == names
        for name, tensor in got.items():
            assert isinstance(tensor, torch.Tensor) and tensor.dtype == torch.float32 and tensor.device.type == "cpu"
            assert np.array_equal(tensor.numpy(), expected[name].astype(np.float32))
        assert list(runtime.run_on_device({"images": images}, ["saliency"])) == ["saliency"]
        assert pb_utils.options == [{}, {}]  # no preferred_memory on a server without it, nor for the host


def test_a_gpu_bls_request_asks_for_the_instances_gpu_memory(pb_utils):
    from engine.models.bls_runtime import BLSRuntime

    images = np.zeros((1, 8, 8, 3), np.uint8)
    fake = pb_utils
    fake.backbone = _stub_backbone()
    fake.module.PreferredMemory = lambda kind, index: (kind, index)  # python backend 23.04+
    fake.module.TRITONSERVER_MEMORY_GPU = "gpu"
    runtime = BLSRuntime("backbone", ["images"], ["features"], fake.module, device_outputs=True, device="cuda:1")
    runtime.run({"images": images})
    runtime._exec({"images": images}, None, on_device=True)  # the request run_on_device sends (no GPU here)
    assert fake.options == [{}, {"preferred_memory": ("gpu", 1)}]
    assert runtime.describe()["device"] == "cuda:1"
    with pytest.raises(InputError, match="'cuda:N'"):
        BLSRuntime("backbone", ["images"], ["features"], fake.module, device="gpu")


def test_the_model_takes_request_pixels_from_host_or_gpu_memory(pb_utils):
    torch = pytest.importorskip("torch")
    from engine.export.triton_segment_model import TritonPythonModel

    image = np.random.default_rng(1).integers(0, 256, (1, 5, 7, 3), dtype=np.uint8)
    pb = pb_utils.module
    model = TritonPythonModel()
    model.device = "cpu"
    # a CPU instance reads as_numpy() only, as before (FORCE_CPU_ONLY_INPUT_TENSORS is the backend's default there)
    assert model._host_array(types.SimpleNamespace(as_numpy=lambda: image)) is image
    model.device = "cuda:0"  # what initialize sets on a GPU instance; nothing below touches a GPU
    for tensor in (pb.Tensor("IMAGE", image), pb.Tensor("IMAGE", torch.from_numpy(image.copy()), device="cpu")):
        got = model._host_array(tensor)
        assert isinstance(got, np.ndarray) and got.dtype == np.uint8 and np.array_equal(got, image)


def test_a_cuda_model_config_needs_gpu_instances(pb_utils):
    from engine.export.triton_segment_model import TritonPythonModel

    def initialize(device, kind):
        config = {"parameters": {"backbone_model": {"string_value": "b"}, "device": {"string_value": device}}}
        TritonPythonModel().initialize({"model_config": json.dumps(config), "model_repository": "/nowhere",
                                        "model_version": "1", "model_name": SEGMENT_MODEL,
                                        "model_instance_kind": kind, "model_instance_device_id": "0"})

    with pytest.raises(RuntimeError, match="needs KIND_GPU instances, got CPU"):
        initialize("cuda", "CPU")
    with pytest.raises(RuntimeError, match="device must be 'cpu' or 'cuda', got 'tpu'"):
        initialize("tpu", "GPU")


def _initialized_model(bank, tmp_path, instance=None, **options):
    """The segmentation model written for `bank` into a repository under tmp_path (backbone_batch_size 2, `options`)
    and initialized as the python backend does; `instance`: a GPU instance's kind and device id."""
    from engine.export.triton_segment_model import TritonPythonModel

    bank.save(tmp_path / "bank")
    model_dir = write_segment_model(tmp_path / "repo", tmp_path / "bank", BACKBONE_MODEL, backbone_batch_size=2,
                                    **options)
    model = TritonPythonModel()
    model.initialize({"model_config": json.dumps(_as_json(validate_config((model_dir / "config.pbtxt").read_text()))),
                      "model_repository": str(model_dir), "model_version": "1", "model_name": SEGMENT_MODEL,
                      **(instance or {})})
    return model


@pytest.mark.slow
def test_the_model_segments_mixed_sizes_like_the_engine_and_fails_only_bad_requests(voc_bank, tmp_path, pb_utils):
    from engine import Engine

    bank, local, samples = voc_bank
    images = [s.image for s in samples]
    fake = pb_utils
    fake.backbone = local
    model = _initialized_model(bank, tmp_path, max_side=1000)
    assert len({im.shape for im in images[:3]}) > 1  # one execute() over several sizes
    requests = [fake.request(IMAGE=im[None]) for im in images[:3]]
    requests.insert(1, fake.request(IMAGE=images[0][None].astype(np.float32)))
    requests.append(fake.request(IMAGE=np.zeros((1, 40, 1001, 3), np.uint8)))
    responses = model.execute(requests)
    assert responses[1].has_error() and "uint8" in responses[1].error().message()
    assert responses[-1].has_error() and "max_side 1000" in responses[-1].error().message()
    responses = responses[:-1]
    expected = Engine(bank, backbone=local).segment_batch(images[:3])
    for response, result in zip([responses[0], *responses[2:]], expected):
        outputs = {t.name(): t.as_numpy() for t in response.output_tensors}
        assert outputs["LABELS"].dtype == np.uint8 and np.array_equal(outputs["LABELS"][0], result.label_map)
        record = json.loads(outputs["SEGMENTS"][0, 0])
        assert [s["class_id"] for s in record["segments"]] == [s["class_id"] for s in result.segments()]
    assert set(fake.calls) == {BACKBONE_MODEL} and len(fake.calls) >= 2  # two sizes: two BLS calls at least


@pytest.mark.gpu
@pytest.mark.slow
def test_a_gpu_instance_segments_gpu_tensors_like_the_in_process_device_pipeline(voc_bank, tmp_path, pb_utils):
    import torch

    from engine import Engine

    bank, local, samples = voc_bank
    images = [s.image for s in samples]
    fake = pb_utils
    fake.backbone, fake.outputs_on = local, "cuda:0"  # BLS outputs in GPU memory, as a GPU backbone gives them
    model = _initialized_model(bank, tmp_path, {"model_instance_kind": "GPU", "model_instance_device_id": "0"},
                               device="cuda", gpus=[0])
    assert model.engine.device == "cuda:0" and model.engine.backbone.runtime.keeps_outputs_on_device
    requests = [fake.module.InferenceRequest(inputs=[fake.module.Tensor(
        "IMAGE", torch.from_numpy(im[None]).to("cuda:0"), device="cuda:0")]) for im in images[:3]]  # in GPU memory
    responses = model.execute(requests)
    expected = Engine(bank, backbone=local, device="cuda:0").segment_batch(images[:3])
    for response, result in zip(responses, expected):
        assert not response.has_error()
        outputs = {t.name(): t.as_numpy() for t in response.output_tensors}
        assert np.array_equal(outputs["LABELS"][0], result.label_map)
        record = json.loads(outputs["SEGMENTS"][0, 0])
        assert [s["class_id"] for s in record["segments"]] == [s["class_id"] for s in result.segments()]


def _as_json(config) -> dict:
    from google.protobuf import json_format

    return json_format.MessageToDict(config, preserving_proto_field_name=True)


# ------------------------------------------------------------------------------------------ the real server

@pytest.fixture(scope="module")
def segment_server(triton_launcher, voc_bank, tmp_path_factory):
    """tritonserver over the python backbone and the segmentation model with a small VOC bank; a long queue delay so
    that concurrent requests of different sizes are merged (ragged batching)."""
    from engine.export.triton import write_repository
    from engine.models.backbones import model_path
    from engine.serving.server import LocalServer

    bank, _, _ = voc_bank
    root = tmp_path_factory.mktemp("segment_repo")
    bank.save(root / "bank")
    repo = root / "repo"
    write_repository(repo, DEFAULT_BACKBONE, variants=["python"], onnx_path=model_path(DEFAULT_BACKBONE),
                     num_threads=1)
    write_segment_model(repo, root / "bank", BACKBONE_MODEL, queue_delay_us=300_000, num_threads=1)
    server = LocalServer(repo, env_dir=triton_launcher.parents[1], log_path=root / "tritonserver.log")
    server.start(timeout=180)
    yield server
    server.stop()


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_the_whole_pipeline_through_the_server_equals_in_process(segment_server, voc_bank, protocol):
    from engine import Engine
    from engine.remote import RemoteEngine

    bank, local, samples = voc_bank
    images = [s.image for s in samples]
    url = segment_server.http_url if protocol == "http" else segment_server.grpc_url
    expected = Engine(bank, backbone=local).segment_batch(images)
    with RemoteEngine(url, protocol=protocol, concurrency=3) as remote:
        assert remote.class_names == bank.class_names
        served = remote.segment_batch(images)
    for a, b in zip(expected, served):
        assert np.array_equal(a.label_map, b.label_map)
        mine, theirs = a.segments(), b.segments()
        assert [(s["class_id"], s["area"], s["bbox"], s["segmentation"]) for s in mine] == \
               [(s["class_id"], s["area"], s["bbox"], s["segmentation"]) for s in theirs]
        assert np.allclose([s["score"] for s in mine], [s["score"] for s in theirs], atol=1e-5)


@pytest.mark.slow
def test_concurrent_requests_of_mixed_sizes_are_batched_and_bad_ones_skipped(segment_server, voc_bank):
    import tritonclient.http as http

    from engine.batches import Skipped
    from engine.remote import RemoteEngine

    images = [s.image for s in voc_bank[2]]
    client = http.InferenceServerClient(segment_server.http_url)
    before = _counts(client)
    with RemoteEngine(segment_server.http_url, concurrency=6) as remote:
        results = remote.segment_batch([*images, np.zeros((4, 4), np.uint8)], on_error="skip")
        assert isinstance(results[-1], Skipped) and "grayscale" in results[-1].reason
        assert all(r.label_map.shape == im.shape[:2] for r, im in zip(results, images))
        outputs = {}
        threads = [threading.Thread(target=lambda i=i: outputs.__setitem__(i, remote.segment(images[i])))
                   for i in range(len(images))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert sorted(outputs) == list(range(len(images)))
    inferences, executions = (after - first for after, first in zip(_counts(client), before))
    assert inferences == 2 * len(images)
    assert executions < inferences, "the dynamic batcher merged no requests of different sizes"


def _counts(client) -> tuple[int, int]:
    stats = client.get_inference_statistics(SEGMENT_MODEL)["model_stats"][0]
    return int(stats["inference_count"]), int(stats["execution_count"])


def test_a_backbone_model_is_refused_as_a_segmentation_model(triton_server):
    from engine.remote import RemoteEngine

    with pytest.raises(ModelError, match="not a segmentation model"):
        RemoteEngine(triton_server.http_url, model_name=BACKBONE_MODEL, retries=0)


# ------------------------------------------------------------------------------------------------------ CLI

@pytest.mark.slow
def test_the_cli_writes_the_segmentation_model_and_segments_through_a_url(segment_server, voc_bank, voc_root,
                                                                          tmp_path):
    from engine import Engine
    from engine.cli import main
    from engine.data import load_label_map

    bank, local, _ = voc_bank
    bank.save(tmp_path / "bank")
    repo = tmp_path / "repo"
    assert main(["triton-repo", "--out", str(repo), "--variants", "python", "--configs-only", "--bank",
                 str(tmp_path / "bank"), "--segment-instances", "2", "--max-side", "1024"]) == 0
    config = validate_config((repo / SEGMENT_MODEL / "config.pbtxt").read_text(), SEGMENT_MODEL)
    assert config.instance_group[0].count == 2 and config.parameters["max_side"].string_value == "1024"
    assert config.parameters["backbone_model"].string_value == BACKBONE_MODEL
    assert (repo / SEGMENT_MODEL / "1" / "bank" / "manifest.json").is_file()
    with pytest.raises(SystemExit) as usage:  # not the bank's backbone: a usage error
        main(["triton-repo", "--out", str(repo), "--configs-only", "--bank", str(tmp_path / "bank"),
              "--backbone", "effnet-lite2/block19"])
    assert usage.value.code == 2

    images = sorted((voc_root / "JPEGImages").glob("*.jpg"))[:2]
    out = tmp_path / "out"
    assert main(["segment", "--url", f"grpc://{segment_server.grpc_url}", "--protocol", "grpc", "--header",
                 "x-request-source=test", *map(str, images), "--out", str(out)]) == 0
    expected = Engine(bank, backbone=local).segment_batch(images)
    for path, result in zip(images, expected):
        # outputs are named by the input's name, suffix kept (engine.outputs): x.jpg -> x.jpg.png, x.jpg.json
        assert np.array_equal(load_label_map(out / f"{path.name}.png"), result.label_map)
        assert json.loads((out / f"{path.name}.json").read_text())["segments"][0]["class_id"] == \
            result.segments()[0]["class_id"]
    with pytest.raises(SystemExit) as usage:  # one or the other: a usage error
        main(["segment", "--url", segment_server.http_url, "--bank", str(tmp_path / "bank"), str(images[0]),
              "--out", str(out)])
    assert usage.value.code == 2


def test_the_cli_refuses_an_unknown_segment_device(tmp_path, capsys):
    from engine.cli import main

    with pytest.raises(SystemExit) as usage:  # a usage error: argparse's exit code 2
        main(["triton-repo", "--out", str(tmp_path / "repo"), "--bank", str(tmp_path), "--segment-device", "tpu"])
    assert usage.value.code == 2 and "--segment-device" in capsys.readouterr().err


@pytest.mark.slow
def test_the_cli_writes_a_gpu_segmentation_model(voc_bank, tmp_path):
    from engine.cli import main

    bank, _, _ = voc_bank
    bank.save(tmp_path / "bank")
    repo = tmp_path / "repo"
    assert main(["triton-repo", "--out", str(repo), "--variants", "tensorrt", "--configs-only", "--bank",
                 str(tmp_path / "bank"), "--segment-backbone", "tensorrt", "--segment-device", "cuda",
                 "--gpus", "0,1", "--segment-instances", "2"]) == 0
    config = validate_config((repo / SEGMENT_MODEL / "config.pbtxt").read_text(), SEGMENT_MODEL)
    assert config.instance_group[0].kind == 1 and list(config.instance_group[0].gpus) == [0, 1]  # KIND_GPU
    assert config.instance_group[0].count == 2 and config.parameters["device"].string_value == "cuda"
    assert config.parameters["FORCE_CPU_ONLY_INPUT_TENSORS"].string_value == "no"
    assert config.parameters["backbone_model"].string_value == triton_model_name(DEFAULT_BACKBONE, "tensorrt")
    assert main(["triton-repo", "--out", str(repo), "--variants", "python", "--configs-only", "--bank",
                 str(tmp_path / "bank"), "--gpus", "0"]) == 0  # --gpus is for the GPU variants: a CPU model ignores it
    config = validate_config((repo / SEGMENT_MODEL / "config.pbtxt").read_text(), SEGMENT_MODEL)
    assert config.instance_group[0].kind == 2 and "device" not in config.parameters
