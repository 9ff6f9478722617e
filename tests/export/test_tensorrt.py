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


def test_profile_limits_follow_max_side_and_batch():
    (profile,) = trt_export.default_profiles(32, max_batch_size=4, max_side=600)
    assert profile.max == (4, 608, 608, 3) and profile.opt == (4, 384, 512, 3)
    assert trt_export.profile_limits([profile]) == {"min_side": 32, "max_side": 608, "max_batch": 4}
    (small,) = trt_export.default_profiles(16, max_side=256)
    assert small.opt[1:3] == (256, 256)  # the optimum is kept within the range
    two = [trt_export.ShapeProfile((1, 32, 32, 3), (1, 64, 64, 3), (2, 256, 256, 3)),
           trt_export.ShapeProfile((1, 256, 256, 3), (4, 512, 512, 3), (8, 2048, 2048, 3))]
    assert trt_export.profile_limits(two) == {"min_side": 32, "max_side": 2048, "max_batch": 8}
    with pytest.raises(InputError, match="max_side >= the stride"):
        trt_export.default_profiles(32, max_side=16)


@pytest.mark.parametrize("value, cc", [("8.0", "8.0"), ("86", "8.6"), ("sm_90", "9.0"), ((7, 5), "7.5"),
                                       ("12.0", "12.0"), ("120", "12.0"), ("sm100", "10.0")])
def test_compute_capabilities_and_plan_names(value, cc):
    assert trt_export.normalise_cc(value) == cc
    assert trt_export.plan_filename(value) == f"model.sm{cc.replace('.', '')}.plan"


@pytest.mark.parametrize("bad", ["ampere", "8.10", "", "0.5", "sm_"])
def test_bad_compute_capabilities_are_refused(bad):
    with pytest.raises(InputError, match="expected MAJOR.MINOR"):
        trt_export.normalise_cc(bad)


def test_plan_records(tmp_path):
    plan = tmp_path / "model.sm80.plan"
    assert trt_export.record_path(plan) == tmp_path / "model.sm80.plan.json"
    assert trt_export.read_plan_record(plan) is None
    trt_export.record_path(plan).write_text('{"tensorrt": "10.3.0"}')
    assert trt_export.read_plan_record(plan) == {"tensorrt": "10.3.0"}
    trt_export.record_path(plan).write_text("[1, 2]")
    with pytest.raises(ModelError, match="a JSON object"):
        trt_export.read_plan_record(plan)
