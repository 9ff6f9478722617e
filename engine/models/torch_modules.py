"""Torch-side pieces shared by the backbones that have a torch module: the uint8 input stage (the model owns its
preprocessing, as segment-anything's `Sam.preprocess`) and the ONNX export with dynamic batch, height and width,
verified against torch.

    module = with_uint8_input(trunk, mean, std, layout="nchw")   # (B, H, W, 3) uint8 -> features
    facts = export_onnx(module, path, multiple=32, output="features")
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings

import numpy as np

from ..errors import ModelError
from ..registry import INPUT_NAME
from .cache import verify_onnx

#: max |onnxruntime - torch| accepted for an export, relative to the output's scale: the bound is
#: EXPORT_TOLERANCE * max(1, max |torch output|) (float32 rounding grows with the magnitude)
EXPORT_TOLERANCE = 1e-5


def torch_or_error():
    try:
        import torch
    except ImportError as error:
        raise ModelError("this backbone's torch module needs torch (pip install 'moduseg-engine[export]')") from error
    return torch


def with_uint8_input(module, mean, std, output_layout: str = "nchw"):
    """`module` (normalised float (B, 3, H, W) -> features) behind a stage that takes (B, H, W, 3) uint8 RGB, scales
    to [0, 1] and normalises with `mean` / `std`; an "nchw" output is returned as (B, h, w, C), a token output as
    is."""
    torch = torch_or_error()

    class Uint8Input(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = module
            self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

        def forward(self, images):
            pixels = images.permute(0, 3, 1, 2).float() * (1.0 / 255.0)
            pixels = (pixels - self.mean) / self.std
            out = self.inner(pixels)
            return out.permute(0, 2, 3, 1) if output_layout == "nchw" else out

    return Uint8Input().eval()


def export_onnx(module, path, multiple: int, output: str, opset: int = 18,
                tolerance: float = EXPORT_TOLERANCE) -> dict:
    """Export `module` ((B, H, W, 3) uint8 -> one output) to `path` with batch, H and W (multiples of `multiple`)
    dynamic, then check it against torch on random images of two sizes and batch sizes. Returns facts for the model
    cache's sidecar."""
    torch = torch_or_error()
    from torch.export import Dim

    if any(p.dtype != torch.float32 for p in module.parameters()):
        raise ModelError("export a float32 model (convert to fp16 in the ONNX toolchain if needed)")
    sample = torch.zeros(2, 2 * multiple, 3 * multiple, 3, dtype=torch.uint8)  # batch 2: export specialises size-1 dims
    height, width = Dim("height", min=1, max=4096 // multiple), Dim("width", min=1, max=4096 // multiple)
    dynamic = {"images": {0: Dim("batch", min=1, max=4096), 1: multiple * height, 2: multiple * width}}
    quiet = logging.getLogger("torch.onnx._internal.exporter._registration")  # "torchvision is not installed"
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(module, (sample,), os.fspath(path), input_names=[INPUT_NAME], output_names=[output],
                              dynamo=True, dynamic_shapes=dynamic, opset_version=opset, external_data=False,
                              verbose=False)
        except Exception as error:
            raise ModelError(f"ONNX export failed: {error}") from error
        finally:
            quiet.setLevel(level)
    rng = np.random.default_rng(0)
    samples = [rng.integers(0, 256, (1, 12 * multiple, 16 * multiple, 3), dtype=np.uint8),
               rng.integers(0, 256, (3, 5 * multiple, 3 * multiple, 3), dtype=np.uint8)]
    diff = verify_onnx(path, module, INPUT_NAME, samples, tolerance)
    return {"max_abs_diff": diff, "tolerance": tolerance, "verified_shapes": [list(s.shape) for s in samples],
            "opset": opset, "torch": torch.__version__}
