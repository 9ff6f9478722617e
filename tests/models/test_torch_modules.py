"""engine.models.torch_modules: the uint8 input stage every torch backbone module wears (the model owns its
normalisation) and the ONNX export with dynamic batch, height and width, verified against torch."""

from __future__ import annotations

import numpy as np
import pytest

from engine.errors import ModelError
from engine.models.runtime import OnnxRuntime
from engine.models.torch_modules import EXPORT_TOLERANCE, export_onnx, with_uint8_input

torch = pytest.importorskip("torch")

MEAN, STD = (0.1, 0.5, 0.9), (0.2, 0.25, 0.5)


def patchify(stride=8, channels=4):
    torch.manual_seed(0)
    return torch.nn.Conv2d(3, channels, stride, stride)


@pytest.mark.parametrize("layout", ["nchw", "tokens"])
def test_uint8_stage_normalises_then_runs_the_module(rng, layout):
    inner = patchify()
    if layout == "tokens":
        class Tokens(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.conv = inner

            def forward(self, x):
                return self.conv(x).flatten(2).transpose(1, 2)

        wrapped = with_uint8_input(Tokens(), MEAN, STD, output_layout="tokens")
    else:
        wrapped = with_uint8_input(inner, MEAN, STD)
    images = rng.integers(0, 256, (2, 16, 24, 3), dtype=np.uint8)
    pixels = (images.astype(np.float32) / 255.0 - np.array(MEAN, np.float32)) / np.array(STD, np.float32)
    with torch.inference_mode():
        got = wrapped(torch.from_numpy(images)).numpy()
        want = inner(torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy())).numpy()
    if layout == "nchw":
        np.testing.assert_allclose(got, want.transpose(0, 2, 3, 1), atol=1e-5)  # (B, h, w, C)
    else:
        np.testing.assert_allclose(got, want.reshape(2, 4, -1).transpose(0, 2, 1), atol=1e-5)
    assert not wrapped.training and dict(wrapped.named_buffers()).keys() >= {"mean", "std"}


def test_export_has_dynamic_batch_height_width_and_is_verified(rng, tmp_path):
    module = with_uint8_input(patchify(), MEAN, STD)
    facts = export_onnx(module, tmp_path / "m.onnx", multiple=8, output="features")
    assert facts["max_abs_diff"] <= facts["tolerance"] == EXPORT_TOLERANCE and facts["opset"] == 18
    runtime = OnnxRuntime(tmp_path / "m.onnx")
    assert runtime.input_names == ["images"] and runtime.output_names == ["features"]
    for shape in [(1, 8, 8, 3), (5, 40, 16, 3)]:  # sizes and batches other than the export's example
        images = rng.integers(0, 256, shape, dtype=np.uint8)
        with torch.inference_mode():
            want = module(torch.from_numpy(images)).numpy()
        np.testing.assert_allclose(runtime.run({"images": images})["features"], want, atol=1e-5)


def test_export_refuses_a_half_precision_model(tmp_path):
    with pytest.raises(ModelError, match="float32"):
        export_onnx(with_uint8_input(patchify().half(), MEAN, STD), tmp_path / "m.onnx", 8, "features")
