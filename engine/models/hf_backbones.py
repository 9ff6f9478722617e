"""Dense ViT backbones of the paper family through Hugging Face transformers: DINOv2 (`Dinov2Model`, also
`Dinov2WithRegistersModel`), DINOv3 (`DINOv3ViTModel`) and C-RADIO (the paper's backbone, custom code loaded with
`trust_remote_code`).

Registered as families that load weights from a local directory (`save_pretrained`: config.json + model.safetensors)
or a hub id where the user has hub access; none can be downloaded here:

    create_backbone("dinov2/layer8", weights="facebook/dinov2-small")     # member "final" or "layer<k>"
    create_backbone("c-radio/final", weights="path/to/C-RADIOv4-SO400M")   # with MODUSEG_TRUST_REMOTE_CODE=1

A bank records the backbone's name and weights, so `Engine(bank_dir)` rebuilds the same backbone. `HFViTBackbone`
and `RadioBackbone` wrap a model already in memory. Either way the backbone is a ModelBackbone over a torch module
that takes uint8 (B, H, W, 3) images, normalises them inside and returns tokens (B, prefix + H/patch * W/patch, D);
the same module exports to ONNX with symbolic B, H, W.

Exercised here (tests/models/test_hf_backbones.py) with randomly initialised tiny configs of the same classes; RADIO
on a stand-in module following RADIO's call contract (RGB in [0, 1], returns (summary, patch tokens)).
"""

from __future__ import annotations

import os

from ..constants import IMAGENET_MEAN, IMAGENET_STD
from ..errors import InputError, ModelError
from ..registry import BackboneSpec, register_family
from .backbones import ModelBackbone
from .runtime import TorchRuntime
from .torch_modules import export_onnx, with_uint8_input
from .transformers_io import load, load_model, require, torch_dtype

VIT_CLASSES = {"dinov2": "Dinov2Model", "dinov2_with_registers": "Dinov2WithRegistersModel",
               "dinov3_vit": "DINOv3ViTModel"}


def _token_module(model, patch: int, layer: int | None, mean, std, radio_step: int = 0):
    """uint8 (B, H, W, 3) -> tokens (B, prefix + (H/patch)*(W/patch), D) float32, normalised inside.

    radio_step > 0: `model` follows RADIO's contract instead (RGB in [0, 1], H and W multiples of radio_step, returns
    (summary, patch tokens without prefix)); the input is zero-padded to radio_step and the extra tokens cut off.
    """
    import torch
    import torch.nn.functional as F

    class TokenViT(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, pixels: torch.Tensor) -> torch.Tensor:
            x = pixels.to(next(self.model.parameters()).dtype)
            if radio_step:
                h, w = x.shape[-2] // patch, x.shape[-1] // patch
                pad_h, pad_w = -x.shape[-2] % radio_step, -x.shape[-1] % radio_step
                tokens = self.model(F.pad(x, (0, pad_w, 0, pad_h)))[1]
                wide = (x.shape[-1] + pad_w) // patch
                tokens = tokens.reshape(tokens.shape[0], -1, wide, tokens.shape[-1])[:, :h, :w]
                return tokens.reshape(tokens.shape[0], h * w, tokens.shape[-1]).float()
            if layer is None:
                return self.model(pixel_values=x).last_hidden_state.float()
            return self.model(pixel_values=x, output_hidden_states=True).hidden_states[layer].float()

    return with_uint8_input(TokenViT().eval(), mean, std, output_layout="tokens")


def _spec(name: str, module, *, stride: int, dim: int, prefix_tokens: int, mean, std,
          weights: str | None = None) -> BackboneSpec:
    return BackboneSpec(name=name, stride=stride, dim=dim, mean=tuple(mean), std=tuple(std),
                        feature_output="tokens", layout="tokens", prefix_tokens=prefix_tokens, weights=weights,
                        build_onnx=lambda path: export_onnx(module(), path, stride, "tokens"), torch_module=module)


def _layer(member: str, depth: int, name: str) -> int | None:
    """"final" -> None (the layer-normed output); "layer<k>" -> k in 1..depth (the raw output of block k)."""
    if member == "final":
        return None
    if member.startswith("layer") and member[5:].isdigit() and 1 <= int(member[5:]) <= depth:
        return int(member[5:])
    raise InputError(f"{name}: the member must be 'final' or 'layer<k>' with k in 1..{depth}, got {member!r}")


def _vit_spec(config, model, family: str, member: str, weights: str | None = None) -> BackboneSpec:
    """The spec of a DINOv2/DINOv3 model from its config; `model()` gives the model (loaded only when the torch
    module is built)."""
    layer = _layer(member, int(config.num_hidden_layers), f"{family}/{member}")
    patch = int(config.patch_size)
    # CLS first, then the register tokens (DINOv2-with-registers, DINOv3), then the patch tokens
    prefix = 1 + int(getattr(config, "num_register_tokens", 0) or 0)
    return _spec(f"{family}/{member}", lambda: _token_module(model().eval(), patch, layer, IMAGENET_MEAN, IMAGENET_STD),
                 stride=patch, dim=int(config.hidden_size), prefix_tokens=prefix, mean=IMAGENET_MEAN,
                 std=IMAGENET_STD, weights=weights)


def _radio_spec(model, family: str, weights: str | None = None) -> BackboneSpec:
    """The spec of a RADIO model in memory (RADIO exposes only its final spatial features: member "final")."""
    import torch

    patch = int(getattr(model, "patch_size"))
    step = int(getattr(model, "min_resolution_step", patch) or patch)
    if step % patch:
        raise ModelError(f"{family}: min_resolution_step {step} is not a multiple of patch size {patch}")
    # RADIO takes RGB in [0, 1] and normalises inside: the uint8 stage only scales
    module = _token_module(model.eval(), patch, None, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), radio_step=step)
    with torch.inference_mode():  # RADIO wrappers name their width differently across versions: ask the model
        dim = int(module(torch.zeros(1, step, step, 3, dtype=torch.uint8)).shape[-1])
    return _spec(f"{family}/final", lambda: module, stride=patch, dim=dim, prefix_tokens=0, mean=(0.0, 0.0, 0.0),
                 std=(1.0, 1.0, 1.0), weights=weights)


def _vit_config(weights: str):
    transformers = require("transformers", "transformers")
    config = load(transformers.AutoConfig.from_pretrained, weights, "a model config")
    if config.model_type not in VIT_CLASSES:
        raise ModelError(f"{weights!r} is a {config.model_type!r} model; the ViT families take {sorted(VIT_CLASSES)}")
    return config


def _load_vit(weights: str, config, dtype: str = "float32"):
    transformers = require("transformers", "transformers")
    cls = getattr(transformers, VIT_CLASSES[config.model_type], None)
    if cls is None:
        raise ModelError(f"transformers {transformers.__version__} has no {VIT_CLASSES[config.model_type]}")
    return load(cls.from_pretrained, weights, VIT_CLASSES[config.model_type], dtype=torch_dtype(dtype)).eval()


def _vit_family(family: str, default_weights: str):
    def spec(member: str, weights: str | None) -> BackboneSpec:
        source = os.fspath(weights or default_weights)
        config = _vit_config(source)
        return _vit_spec(config, lambda: _load_vit(source, config), family, member, source)

    return spec


def _radio_family(member: str, weights: str | None) -> BackboneSpec:
    if member != "final":
        raise InputError(f"c-radio exposes its final features only: member 'final', got {member!r}")
    if weights is None:
        raise InputError("c-radio/final needs weights=: a local snapshot of a C-RADIO hub repository (weights and its "
                         "Python files)")
    return _radio_spec(load_radio(weights), "c-radio", os.fspath(weights))


def load_radio(path_or_id: str | os.PathLike, dtype: str = "float32", trust_remote_code: bool = False):
    """C-RADIO from a local snapshot of its hub repository (weights and its Python files), or a hub id. This runs the
    repository's own code: `trust_remote_code=True` says you trust that snapshot (else set MODUSEG_TRUST_REMOTE_CODE=1
    for registered loads)."""
    transformers = require("transformers", "transformers")
    trusted = trust_remote_code or os.environ.get("MODUSEG_TRUST_REMOTE_CODE") == "1"
    if not trusted:
        raise ModelError(f"C-RADIO from {os.fspath(path_or_id)!r} runs the repository's own Python code: pass "
                         "trust_remote_code=True (or set MODUSEG_TRUST_REMOTE_CODE=1) if you trust that snapshot")
    return load(transformers.AutoModel.from_pretrained, os.fspath(path_or_id), "C-RADIO (its code needs timm and "
                 "torchvision)", trust_remote_code=True, dtype=torch_dtype(dtype)).eval()


register_family("dinov2", _vit_family("dinov2", "facebook/dinov2-small"), ["final", "layer8"], needs_weights=True)
register_family("dinov3", _vit_family("dinov3", "facebook/dinov3-vits16-pretrain-lvd1689m"), ["final", "layer8"],
                needs_weights=True)
register_family("c-radio", _radio_family, ["final"], needs_weights=True)


class HFViTBackbone(ModelBackbone):
    """A DINOv2 / DINOv2-with-registers / DINOv3 model already in memory, run with torch.

    model: a Dinov2Model, Dinov2WithRegistersModel or DINOv3ViTModel (any dtype). family: the name's first part
    ("dinov2"). layer: None for the final (layer-normed) output; k in 1..num_hidden_layers for the raw output of
    block k (intermediate layers often retrieve better than the last one). weights: where the model came from (recorded
    in banks; None for a model made in memory). device, batch_size, num_threads: as create_backbone's.
    """

    def __init__(self, model, *, family: str = "dinov2", layer: int | None = None, weights: str | None = None,
                 device: str = "cpu", batch_size: int = 4, num_threads: int = 0) -> None:
        spec = _vit_spec(model.config, lambda: model, family, "final" if layer is None else f"layer{layer}", weights)
        super().__init__(spec, TorchRuntime(spec.torch_module(), [spec.input_name], [spec.feature_output],
                                            device=device, num_threads=num_threads), batch_size)


class RadioBackbone(ModelBackbone):
    """A C-RADIO model already in memory (`load_radio`, or any module with RADIO's call contract: RGB in [0, 1], H and W
    multiples of `min_resolution_step`, returns (summary, spatial tokens (B, h*w, D)), and a `patch_size`)."""

    def __init__(self, model, *, family: str = "c-radio", weights: str | None = None, device: str = "cpu",
                 batch_size: int = 4, num_threads: int = 0) -> None:
        spec = _radio_spec(model, family, weights)
        super().__init__(spec, TorchRuntime(spec.torch_module(), [spec.input_name], [spec.feature_output],
                                            device=device, num_threads=num_threads), batch_size)
