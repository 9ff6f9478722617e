"""engine.models.runtime: the runtimes' common face (named numpy arrays in and out, request checks), onnxruntime on
the exported default backbone and on in-memory graphs, torch on a small module, the device and provider checks,
and TensorRT refusing clearly where it cannot run."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

from engine.errors import InputError, ModelError
from engine.models.backbones import model_path
from engine.models.runtime import (OnnxRuntime, TensorRTRuntime, TorchRuntime, gpu_unavailable_reason,
                                   onnxruntime_providers, tensorrt_unavailable_reason)
from engine.registry import DEFAULT_BACKBONE


def tiny_graph() -> bytes:
    """images (B, H, W, 3) uint8 -> doubled (B, H, W, 3) float and summed (B, H, W, 1) float."""
    graph = helper.make_graph(
        [helper.make_node("Cast", ["images"], ["x"], to=TensorProto.FLOAT),
         helper.make_node("Add", ["x", "x"], ["doubled"]),
         helper.make_node("ReduceSum", ["x", "axes"], ["summed"], keepdims=1)], "tiny",
        [helper.make_tensor_value_info("images", TensorProto.UINT8, ["B", "H", "W", 3])],
        [helper.make_tensor_value_info("doubled", TensorProto.FLOAT, ["B", "H", "W", 3]),
         helper.make_tensor_value_info("summed", TensorProto.FLOAT, ["B", "H", "W", 1])],
        [helper.make_tensor("axes", TensorProto.INT64, [1], [3])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]).SerializeToString()


def test_onnxruntime_face_on_the_default_backbone():
    runtime = OnnxRuntime(model_path(DEFAULT_BACKBONE), num_threads=1)
    assert runtime.input_names == ["images"] and runtime.output_names == ["features"]
    out = runtime.run({"images": np.zeros((2, 64, 96, 3), np.uint8)})
    assert out["features"].shape == (2, 4, 6, 680) and out["features"].dtype == np.float32
    described = runtime.describe()
    assert described["runtime"] == "onnxruntime" and described["providers"] == ["CPUExecutionProvider"]
    with pytest.raises(InputError, match="missing inputs"):
        runtime.run({"pixels": np.zeros((1, 32, 32, 3), np.uint8)})
    with pytest.raises(InputError, match="unknown outputs"):
        runtime.run({"images": np.zeros((1, 32, 32, 3), np.uint8)}, ["logits"])
    with pytest.raises(ModelError, match="onnxruntime failed"):
        runtime.run({"images": np.zeros((1, 32, 32, 4), np.uint8)})  # 4 channels
    with pytest.raises(ModelError, match="onnxruntime failed"):
        runtime.run({"images": np.zeros((1, 32, 32, 3), np.float32)})  # the graph takes uint8


def test_onnxruntime_from_bytes_and_requested_outputs(rng):
    runtime = OnnxRuntime(tiny_graph())
    images = rng.integers(0, 256, (2, 5, 7, 3), dtype=np.uint8)
    both = runtime.run({"images": images})
    assert list(both) == ["doubled", "summed"]
    np.testing.assert_array_equal(both["doubled"], 2 * images.astype(np.float32))
    only = runtime.run({"images": images}, ["summed"])
    assert list(only) == ["summed"]
    np.testing.assert_array_equal(only["summed"], images.astype(np.float32).sum(-1, keepdims=True))
    with pytest.raises(InputError, match="num_threads must be >= 0"):
        OnnxRuntime(tiny_graph(), num_threads=-1)


def test_corrupt_onnx_is_a_model_error(tmp_path):
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a protobuf")
    with pytest.raises(ModelError, match="cannot load"):
        OnnxRuntime(broken)
    with pytest.raises(ModelError, match="cannot load model bytes"):
        OnnxRuntime(b"not a protobuf either")


def test_onnxruntime_providers():
    import onnxruntime

    assert onnxruntime_providers("cpu") == ["CPUExecutionProvider"]
    for bad in ("tpu", "cuda:x"):
        with pytest.raises(InputError, match="device must be one of"):
            onnxruntime_providers(bad)
    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        assert onnxruntime_providers("cuda:1")[0] == ("CUDAExecutionProvider", {"device_id": 1})
    else:
        with pytest.raises(ModelError, match="onnxruntime-gpu"):
            onnxruntime_providers("cuda")
        with pytest.raises(ModelError, match="onnxruntime-gpu"):
            OnnxRuntime(tiny_graph(), device="cuda")


def test_torch_runtime(rng):
    torch = pytest.importorskip("torch")

    class Pair(torch.nn.Module):
        def forward(self, images, scale):
            x = images.float()
            return x * scale, x.sum(-1)

    runtime = TorchRuntime(Pair(), ["images", "scale"], ["scaled", "summed"])
    images = rng.integers(0, 256, (2, 4, 5, 3), dtype=np.uint8)
    out = runtime.run({"images": images, "scale": np.float32(0.5)}, ["summed"])
    assert list(out) == ["summed"] and out["summed"].dtype == np.float32
    np.testing.assert_array_equal(out["summed"], images.astype(np.float32).sum(-1))
    assert runtime.describe() == {"runtime": "torch", "inputs": ["images", "scale"],
                                  "outputs": ["scaled", "summed"], "device": "cpu"}
    with pytest.raises(InputError, match="missing inputs"):
        runtime.run({"images": images})
    wrong = TorchRuntime(Pair(), ["images", "scale"], ["only"])
    with pytest.raises(ModelError, match="returned 2 outputs, expected 1"):
        wrong.run({"images": images, "scale": np.float32(1)})
    with pytest.raises(InputError, match="'cpu' or 'cuda'"):
        TorchRuntime(Pair(), ["images"], ["x"], device="tpu")
    with pytest.raises(InputError, match="num_threads must be >= 0"):
        TorchRuntime(Pair(), ["images"], ["x"], num_threads=-1)
    if not torch.cuda.is_available():
        with pytest.raises(ModelError, match="sees no CUDA GPU"):
            TorchRuntime(Pair(), ["images"], ["x"], device="cuda")


def test_gpu_and_tensorrt_say_why_they_cannot_run_here(tmp_path):
    reason = tensorrt_unavailable_reason()
    if reason is None:
        pytest.skip("TensorRT and a GPU are available here: tests/test_gpu.py covers them")
    assert "TensorRT" in reason or "tensorrt" in reason
    gpu = gpu_unavailable_reason()
    assert gpu is None or isinstance(gpu, str) and gpu
    with pytest.raises(ModelError, match="TensorRT|tensorrt"):
        TensorRTRuntime(tmp_path / "model.plan")
