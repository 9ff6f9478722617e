"""engine.export.tensorrt: optimisation profiles of the uint8 (B, H, W, 3) input and the refusal, with the reason,
where TensorRT or a GPU is missing (the plan's parity with onnxruntime is in tests/test_gpu.py)."""

from __future__ import annotations

import pytest

from engine.errors import InputError, ModelError
from engine.export import tensorrt as trt_export
from engine.models.runtime import tensorrt_unavailable_reason


def test_default_profiles_cover_padded_sizes_up_to_1024():
    (profile,) = trt_export.default_profiles(32)
    assert profile.min == (1, 32, 32, 3) and profile.opt == (4, 384, 512, 3) and profile.max == (8, 1024, 1024, 3)
    (fourteen,) = trt_export.default_profiles(14, max_batch_size=2)
    assert fourteen.max == (2, 1036, 1036, 3) and fourteen.opt == (2, 392, 518, 3)
    assert all(d % 14 == 0 for d in fourteen.min[1:3] + fourteen.opt[1:3] + fourteen.max[1:3])


@pytest.mark.parametrize("shapes", [
    ((1, 64, 64, 3), (1, 32, 32, 3), (1, 128, 128, 3)),  # opt below min
    ((1, 32, 32, 3), (1, 64, 64, 3), (1, 48, 48, 3)),  # max below opt
    ((0, 32, 32, 3), (1, 32, 32, 3), (1, 32, 32, 3)),  # empty batch
    ((1, 32, 32), (1, 32, 32), (1, 32, 32)),  # not (B, H, W, 3)
])
def test_shape_profiles_are_checked(shapes):
    with pytest.raises(InputError, match="shape profile needs"):
        trt_export.ShapeProfile(*shapes)


def test_build_engine_says_why_it_cannot_run_here(tmp_path):
    reason = tensorrt_unavailable_reason()
    if reason is None:
        pytest.skip("TensorRT and a GPU are available here: tests/test_gpu.py builds a plan")
    with pytest.raises(ModelError, match="TensorRT") as error:
        trt_export.build_engine(tmp_path / "missing.onnx", tmp_path / "model.plan")
    assert reason in str(error.value)
    assert not (tmp_path / "model.plan").exists()
