"""The backbone registry: what each backbone is, as data, and the names derived from it (timm's `_registry`).

A leaf module: it imports nothing of the engine but its errors, so the runtimes, the models, the bank and the export
code all read it without import cycles. A model family registers a factory next to its definition
(`register_family("effnet-lite2", ...)` in engine/models/effnet.py); `backbone_spec("effnet-lite2/block19")` asks the
family for the spec of one member.

Every exported backbone graph takes `images`: (B, H, W, 3) uint8 RGB, H and W multiples of the stride (the engine
zero-pads bottom/right, so padding is black before normalisation), and normalises inside the graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import InputError

#: the embedded default: EfficientNet-Lite2's blocks 19, 20 and 14 in one stride-16 map (engine/models/effnet.py)
DEFAULT_BACKBONE = "effnet-lite2/multilayer"
#: bumped whenever an exported graph changes, so that older cached exports are rebuilt (2: uint8 NHWC input,
#: normalisation inside the graph, NHWC features)
EXPORT_VERSION = 2
#: the image input every exported graph takes
INPUT_NAME = "images"
LAYOUTS = ("nhwc", "tokens")
TRITON_VARIANTS = ("python", "onnx", "tensorrt")


@dataclass(frozen=True)
class BackboneSpec:
    """What one backbone is; ModelBackbone does everything else.

    name: "family/member", e.g. "effnet-lite2/block19"; with the padding rule it makes the id a bank records.
    stride: output stride: an HxW image gives a (ceil(H / stride), ceil(W / stride)) feature grid.
    dim: feature width.
    pad_multiple: H and W are zero-padded to a multiple of it (0: the stride); cells of the output beyond the
        (ceil(H / stride), ceil(W / stride)) grid cover only padding and are cut off.
    groups: widths of the layers a multi-layer feature map concatenates (summing to dim), each L2-normalised on its
        own after pooling; () for one layer.
    mean, std: the per-channel RGB normalisation (of pixels in [0, 1]) the graph applies to its uint8 input.
    feature_output: the graph output holding the features.
    layout: "nhwc" for (B, h, w, dim) maps, "tokens" for (B, prefix_tokens + h*w, dim) token sequences.
    prefix_tokens: tokens before the patch tokens (CLS, registers) dropped in the "tokens" layout.
    saliency_output: graph output with a (B, 1, H, W) map in [0, 1] at input resolution, or None.
    build_onnx: writes the ONNX graph to a path and returns facts for the cache sidecar (None: no ONNX export).
    torch_module: builds the equivalent torch module (uint8 images -> feature_output), or None.
    weights: where the weights come from (a hub id or a local path) when the family loads them; recorded in banks.
    """

    name: str
    stride: int
    dim: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    feature_output: str
    layout: str
    build_onnx: Callable[[Path], dict] | None = None
    torch_module: Callable[[], object] | None = None
    prefix_tokens: int = 0
    saliency_output: str | None = None
    weights: str | None = None
    pad_multiple: int = 0
    groups: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise InputError(f"backbone {self.name}: layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.pad_multiple % self.stride or (self.groups and sum(self.groups) != self.dim):
            raise InputError(f"backbone {self.name}: pad_multiple must be a multiple of the stride and groups must sum "
                             f"to dim, got {self.pad_multiple}, {self.groups}")

    @property
    def padding(self) -> int:
        """The multiple H and W are zero-padded to."""
        return self.pad_multiple or self.stride

    @property
    def input_name(self) -> str:
        return INPUT_NAME

    @property
    def weights_label(self) -> str:
        """"@<last part of the weights' path or hub id>" for families that load weights, else ""."""
        return f"@{Path(str(self.weights).rstrip('/')).name}" if self.weights else ""

    @property
    def id(self) -> str:
        # the padding rule is part of what the features mean: a bank built with other padding is another backbone
        return f"{self.name}{self.weights_label}+zeropad{self.padding}"

    @property
    def onnx_file(self) -> str:
        """The exported graph's file name in the model cache (the export version in it: old exports are rebuilt)."""
        return f"{self.name.replace('/', '_')}{self.weights_label}_v{EXPORT_VERSION}.onnx"


@dataclass(frozen=True)
class Family:
    """A registered model family: `spec(member, weights)` gives a member's spec; `members` are the names listed when
    an unknown one is asked for; `needs_weights`: the family loads weights from a local path or hub id."""

    name: str
    spec: Callable[[str, str | None], BackboneSpec]
    members: tuple[str, ...]
    needs_weights: bool = False


_FAMILIES: dict[str, Family] = {}


def register_family(name: str, spec: Callable[[str, str | None], BackboneSpec], members, needs_weights=False) -> None:
    """Register a family's spec factory under `name` (the part of backbone names before "/")."""
    _FAMILIES[name] = Family(name, spec, tuple(members), needs_weights)


def backbone_names() -> tuple[str, ...]:
    """Every listed member of every registered family, e.g. "effnet-lite2/block19"."""
    return tuple(f"{family.name}/{member}" for family in _FAMILIES.values() for member in family.members)


def backbone_spec(name: str, weights: str | None = None) -> BackboneSpec:
    """The spec of backbone `name` ("family/member"); `weights` (a local path or hub id) for families that load
    them. An unknown name is an InputError listing the known ones."""
    family_name, _, member = str(name).partition("/")
    family = _FAMILIES.get(family_name)
    if family is None or not member:
        raise InputError(f"unknown backbone {name!r}; known backbones: {', '.join(backbone_names())}")
    return family.spec(member, weights)


def triton_model_name(backbone: str, variant: str) -> str:
    """The Triton model name of `backbone` served by `variant`, e.g. effnet-lite2_block19_python."""
    if variant not in TRITON_VARIANTS:
        raise InputError(f"unknown Triton variant {variant!r}; known variants: {', '.join(TRITON_VARIANTS)}")
    return f"{backbone.replace('/', '_')}_{variant}"
