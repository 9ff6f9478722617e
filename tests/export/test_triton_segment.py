"""The server-side segmentation model (engine/export/triton_segment*.py) and its client (engine/remote.py): config
text, the model's execute() against a fake python backend, and the whole pipeline through the real local
tritonserver (HTTP and gRPC) against the in-process engine."""

import json
import sys
import threading
import types

import numpy as np
import pytest

from engine.errors import InputError, ModelError
from engine.export.triton import validate_config
from engine.export.triton_segment import SEGMENT_MODEL, render_segment_config, write_segment_model
from engine.registry import DEFAULT_BACKBONE, triton_model_name

pytest.importorskip("tritonclient.grpc", reason="tritonclient[http,grpc] is not installed")
BACKBONE_MODEL = triton_model_name(DEFAULT_BACKBONE, "python")


# ---------------------------------------------------------------------------------------------------- config

def test_the_config_states_ragged_batching_types_and_parameters():
    text = render_segment_config(SEGMENT_MODEL, BACKBONE_MODEL, ["background", "cat"], max_batch_size=6,
                                 instances=2, queue_delay_us=500, num_threads=3, backbone_batch_size=4,
                                 execution_env="$$TRITON_MODEL_DIRECTORY/env.tar.gz")
    config = validate_config(text, SEGMENT_MODEL)
    assert config.backend == "python" and config.max_batch_size == 6
    assert config.input[0].allow_ragged_batch and list(config.input[0].dims) == [-1, -1, 3]
    assert {o.name: o.data_type for o in config.output} == {"LABELS": 2, "SEGMENTS": 13}  # UINT8, STRING
    assert config.dynamic_batching.max_queue_delay_microseconds == 500
    assert config.instance_group[0].count == 2 and config.instance_group[0].kind == 2  # KIND_CPU
    parameters = {key: value.string_value for key, value in config.parameters.items()}
    assert parameters["backbone_model"] == BACKBONE_MODEL and parameters["num_threads"] == "3"
    assert json.loads(parameters["class_names"]) == ["background", "cat"]
    assert parameters["EXECUTION_ENV_PATH"] == "$$TRITON_MODEL_DIRECTORY/env.tar.gz"
    plain = render_segment_config(SEGMENT_MODEL, BACKBONE_MODEL, ["a"])
    assert "EXECUTION_ENV_PATH" not in plain and "max_side" not in plain
    limited = validate_config(render_segment_config(SEGMENT_MODEL, BACKBONE_MODEL, ["a"], max_side=1024))
    assert limited.parameters["max_side"].string_value == "1024"


def test_labels_widen_past_256_classes_and_bad_knobs_are_refused():
    config = validate_config(render_segment_config(SEGMENT_MODEL, "b", [str(i) for i in range(300)]), SEGMENT_MODEL)
    assert {o.name: o.data_type for o in config.output}["LABELS"] == 8  # INT32
    with pytest.raises(InputError, match="max_batch_size"):
        render_segment_config(SEGMENT_MODEL, "b", ["a"], max_batch_size=0)


# ------------------------------------------------------------------------------- the model against a fake backend

class _FakeBackend:
    """The parts of triton_python_backend_utils the segmentation model and BLSRuntime use; BLS calls run a local
    backbone."""

    def __init__(self, backbone):
        self.backbone, self.calls = backbone, []
        backend = self

        class Tensor:
            def __init__(self, name, array):
                self._name, self._array = name, np.asarray(array)

            def name(self):
                return self._name

            def as_numpy(self):
                return self._array

        class Response:
            def __init__(self, output_tensors, error=None):
                self.output_tensors, self.error_value = output_tensors, error

            def has_error(self):
                return self.error_value is not None

            def error(self):
                return self.error_value

        class Error:
            def __init__(self, message):
                self._message = message

            def message(self):
                return self._message

        class Request:
            def __init__(self, model_name, inputs, requested_output_names, **options):
                self.model_name, self.inputs, self.outputs = model_name, inputs, requested_output_names

            def exec(self):
                backend.calls.append(self.model_name)
                arrays = {t.name(): t.as_numpy() for t in self.inputs}
                results = backend.backbone.runtime.run(arrays, self.outputs)
                return Response([Tensor(n, results[n]) for n in self.outputs])

        self.module = types.SimpleNamespace(
            Tensor=Tensor, InferenceResponse=Response, TritonError=Error, InferenceRequest=Request,
            TritonModelException=RuntimeError,
            get_input_tensor_by_name=lambda request, name: next((t for t in request if t.name() == name), None),
            get_output_tensor_by_name=lambda response, name: next(
                (t for t in response.output_tensors if t.name() == name), None),
            triton_string_to_numpy=lambda text: {"TYPE_UINT8": np.uint8, "TYPE_INT32": np.int32}[text])


@pytest.fixture(scope="module")
def voc_bank(voc_root, backbone_factory):
    from engine import FeatureBank
    from engine.data import VOCDataset

    train = VOCDataset(voc_root, "train")
    local = backbone_factory(DEFAULT_BACKBONE)
    bank = FeatureBank.build([train[i] for i in range(12)], local, train.class_names, progress=False)
    val = VOCDataset(voc_root, "val")
    return bank, local, [val[i].image for i in range(6)]


@pytest.mark.slow
def test_the_model_segments_mixed_sizes_like_the_engine_and_fails_only_bad_requests(voc_bank, tmp_path,
                                                                                     monkeypatch):
    from engine import Engine
    from engine.export import triton_segment_model

    bank, local, images = voc_bank
    bank.save(tmp_path / "bank")
    model_dir = write_segment_model(tmp_path / "repo", tmp_path / "bank", BACKBONE_MODEL, backbone_batch_size=2,
                                    max_side=1000)
    fake = _FakeBackend(local)
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", fake.module)
    model = triton_segment_model.TritonPythonModel()
    model.initialize({"model_config": json.dumps(_as_json(validate_config((model_dir / "config.pbtxt").read_text()))),
                      "model_repository": str(model_dir), "model_version": "1", "model_name": SEGMENT_MODEL})
    assert len({im.shape for im in images[:3]}) > 1  # one execute() over several sizes
    requests = [[fake.module.Tensor("IMAGE", im[None])] for im in images[:3]]
    requests.insert(1, [fake.module.Tensor("IMAGE", images[0][None].astype(np.float32))])
    requests.append([fake.module.Tensor("IMAGE", np.zeros((1, 40, 1001, 3), np.uint8))])
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


def _as_json(config) -> dict:
    from google.protobuf import json_format

    return json_format.MessageToDict(config, preserving_proto_field_name=True)


# ------------------------------------------------------------------------------------------ the real server

@pytest.fixture(scope="module")
def segment_server(triton_launcher, voc_bank, tmp_path_factory):
    """tritonserver over the python backbone and the segmentation model with a small VOC bank; a long queue delay so
    that concurrent requests of different sizes are merged (ragged batching)."""
    from engine.export import triton as tx
    from engine.models.backbones import model_path

    bank, _, _ = voc_bank
    root = tmp_path_factory.mktemp("segment_repo")
    bank.save(root / "bank")
    repo = root / "repo"
    tx.write_repository(repo, DEFAULT_BACKBONE, variants=["python"], onnx_path=model_path(DEFAULT_BACKBONE),
                        num_threads=1)
    write_segment_model(repo, root / "bank", BACKBONE_MODEL, queue_delay_us=300_000, num_threads=1)
    server = tx.LocalServer(repo, env_dir=triton_launcher.parents[1], log_path=root / "tritonserver.log")
    server.start(timeout=180)
    yield server
    server.stop()


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_the_whole_pipeline_through_the_server_equals_in_process(segment_server, voc_bank, protocol):
    from engine import Engine
    from engine.remote import RemoteEngine

    bank, local, images = voc_bank
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

    from engine.pipeline import Skipped
    from engine.remote import RemoteEngine

    _, _, images = voc_bank
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
    assert main(["triton-repo", "--out", str(repo), "--configs-only", "--bank", str(tmp_path / "bank"),
                 "--backbone", "effnet-lite2/block19"]) == 1  # not the bank's backbone

    images = sorted((voc_root / "JPEGImages").glob("*.jpg"))[:2]
    out = tmp_path / "out"
    assert main(["segment", "--url", f"grpc://{segment_server.grpc_url}", "--protocol", "grpc", "--header",
                 "x-request-source=test", *map(str, images), "--out", str(out)]) == 0
    expected = Engine(bank, backbone=local).segment_batch(images)
    for path, result in zip(images, expected):
        assert np.array_equal(load_label_map(out / f"{path.stem}.png"), result.label_map)
        assert json.loads((out / f"{path.stem}.json").read_text())["segments"][0]["class_id"] == \
            result.segments()[0]["class_id"]
    assert main(["segment", "--url", segment_server.http_url, "--bank", str(tmp_path / "bank"), str(images[0]),
                 "--out", str(out)]) == 1  # one or the other
