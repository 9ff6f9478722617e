"""Dense ViT backbones of the paper family through Hugging Face transformers: DINOv2 (`Dinov2Model`, also
`Dinov2WithRegistersModel`), DINOv3 (`DINOv3ViTModel`) and C-RADIO (the paper's backbone, custom code loaded with
`trust_remote_code`).

Each is a `BackboneSpec` + `ModelBackbone` (engine.models.backbones, which owns checks, zero-padding bottom/right to a
multiple of the patch size, bucketing, normalisation and the CLS/register token dropping) over a torch module that
maps normalised pixels (B, 3, H, W) to tokens (B, prefix + H/patch * W/patch, D); the same module exports to ONNX with
symbolic B, H, W and runs under OnnxRuntime unchanged. The id names model and layer ("dinov2-vits14/layer8+zeropad14",
"dinov2-vits14/final+zeropad14").

Real weights: a local directory saved by `save_pretrained` (config.json + model.safetensors), or a hub id where the
user has hub access (facebook/dinov2-small, facebook/dinov3-vits16-pretrain-lvd1689m, nvidia/C-RADIOv4-*). None can
be downloaded here.

Exercised here (tests/test_adapters.py), with randomly initialised tiny configs of the same classes: DINOv2 (with and
without registers) and DINOv3 feature shapes, token dropping, layer choice, bf16, save/load round trip through a local
directory, and an ONNX export of DINOv2 with dynamic H/W checked against torch with onnxruntime. RADIO: the adapter is
exercised on a stand-in module that follows RADIO's call contract (RGB in [0, 1], returns (summary, patch tokens));
RADIO's own remote code (which needs timm, hence torchvision) is not run here.
"""

from __future__ import annotations

import os

from ..errors import InputError, ModelError
from .backbones import IMAGENET_MEAN, IMAGENET_STD, BackboneSpec, ModelBackbone
from .runtime import TorchRuntime

DTYPES = ("float32", "float16", "bfloat16")


def _require(package: str, pip_name: str):
    try:
        return __import__(package)
    except ImportError as error:
        raise ModelError(f"this adapter needs the {package!r} package: pip install {pip_name}") from error


def _torch_dtype(dtype: str):
    import torch

    if dtype not in DTYPES:
        raise InputError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    return getattr(torch, dtype)


def _load_transformers_model(cls_name: str, path_or_id: str | os.PathLike, dtype: str, **kwargs):
    transformers = _require("transformers", "transformers")
    cls = getattr(transformers, cls_name, None)
    if cls is None:
        raise ModelError(f"transformers {transformers.__version__} has no {cls_name}; upgrade transformers")
    source = os.fspath(path_or_id)
    try:
        return cls.from_pretrained(source, dtype=_torch_dtype(dtype), **kwargs).eval()
    except OSError as error:
        raise ModelError(f"cannot load {cls_name} weights from {source!r} (a local directory with config.json and "
                         f"model.safetensors, or a hub id with hub access): {error}") from error


def _token_module(model, patch: int, layer: int | None, radio_step: int = 0):
    """nn.Module: normalised pixels (B, 3, H, W) float32 -> tokens (B, prefix + (H/patch)*(W/patch), D) float32.

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

    return TokenViT().eval()


def _export_onnx(module, stride: int, path, opset: int = 18) -> dict:
    """Export pixels (B, 3, H, W) -> tokens with symbolic B, H, W (multiples of `stride`)."""
    import torch

    if next(module.parameters()).dtype != torch.float32:
        raise ModelError("export a float32 model (convert to fp16 in the ONNX toolchain if needed)")
    example = torch.zeros(2, 3, 2 * stride, 3 * stride)  # batch 2, not 1: export specialises size-1 dimensions
    batch, height, width = torch.export.Dim("batch"), torch.export.Dim("height"), torch.export.Dim("width")
    shapes = {"pixels": {0: batch, 2: stride * height, 3: stride * width}}
    try:
        torch.onnx.export(module, (example,), os.fspath(path), input_names=["pixels"], output_names=["tokens"],
                          dynamic_shapes=shapes, opset_version=opset, dynamo=True, verbose=False)
    except Exception as error:
        raise ModelError(f"ONNX export failed: {error}") from error
    return {"torch": torch.__version__, "opset": opset}


def _spec(name: str, module, *, stride: int, dim: int, prefix_tokens: int, mean, std) -> BackboneSpec:
    return BackboneSpec(name=name, stride=stride, dim=dim, mean=tuple(mean), std=tuple(std), input_name="pixels",
                        feature_output="tokens", layout="tokens", prefix_tokens=prefix_tokens,
                        onnx_file=name.replace("/", "_") + ".onnx",
                        build_onnx=lambda path: _export_onnx(module, stride, path), torch_module=lambda: module)


class HFViTBackbone(ModelBackbone):
    """DINOv2 / DINOv2-with-registers / DINOv3 ViT from transformers, run with torch.

    model: a Dinov2Model, Dinov2WithRegistersModel or DINOv3ViTModel (eval mode, any dtype).
    name: model name recorded in the id ("dinov2-vits14").
    layer: None for the final (layer-normed) output; k in 1..num_hidden_layers for the raw output of block k
        (intermediate layers often retrieve better than the last one).
    device: "cpu" or "cuda". batch_size: images per forward. num_threads: torch threads, 0 leaves them alone.
    `export_onnx(path)` (or `spec.build_onnx`) writes the ONNX graph; `ModelBackbone(spec, OnnxRuntime(path))` runs
    it.
    """

    def __init__(self, model, *, name: str, layer: int | None = None, device: str = "cpu", batch_size: int = 4,
                 num_threads: int = 0) -> None:
        config = model.config
        depth = int(config.num_hidden_layers)
        if layer is not None and not 1 <= layer <= depth:
            raise InputError(f"{name}: layer must be None (final output) or in 1..{depth}, got {layer}")
        patch = int(config.patch_size)
        # CLS first, then the register tokens (DINOv2-with-registers, DINOv3), then the patch tokens
        self.prefix_tokens = 1 + int(getattr(config, "num_register_tokens", 0) or 0)
        self.layer = layer
        self.model = model.eval()
        self.module = _token_module(self.model, patch, layer)
        spec = _spec(f"{name}/{'final' if layer is None else f'layer{layer}'}", self.module, stride=patch,
                     dim=int(config.hidden_size), prefix_tokens=self.prefix_tokens, mean=IMAGENET_MEAN,
                     std=IMAGENET_STD)
        runtime = TorchRuntime(self.module, ["pixels"], ["tokens"], device=device, num_threads=num_threads)
        super().__init__(spec, runtime, batch_size)

    @classmethod
    def from_pretrained(cls, path_or_id: str | os.PathLike, *, name: str | None = None, layer: int | None = None,
                        dtype: str = "float32", **options) -> "HFViTBackbone":
        """Load a DINOv2/DINOv3 checkpoint (local directory or hub id); the class is read from its config.json.
        options: as the constructor's (device, batch_size, num_threads)."""
        transformers = _require("transformers", "transformers")
        source = os.fspath(path_or_id)
        try:
            config = transformers.AutoConfig.from_pretrained(source)
        except OSError as error:
            raise ModelError(f"cannot read a model config from {source!r}: {error}") from error
        classes = {"dinov2": "Dinov2Model", "dinov2_with_registers": "Dinov2WithRegistersModel",
                   "dinov3_vit": "DINOv3ViTModel"}
        if config.model_type not in classes:
            raise ModelError(f"{source!r} is a {config.model_type!r} model; HFViTBackbone takes {sorted(classes)}")
        model = _load_transformers_model(classes[config.model_type], source, dtype)
        return cls(model, name=name or os.path.basename(source.rstrip("/")) or config.model_type, layer=layer,
                   **options)

    def export_onnx(self, path: str | os.PathLike, opset: int = 18) -> str:
        """Write the ONNX graph (pixels -> tokens, symbolic B, H, W) to `path` and return the path."""
        _export_onnx(self.module, self.stride, path, opset)
        return os.fspath(path)


class RadioBackbone(ModelBackbone):
    """C-RADIO (the paper's backbone, NVIDIA's RADIO family) through its own remote code.

    model: the RADIO nn.Module as `AutoModel.from_pretrained(path, trust_remote_code=True)` returns it: takes RGB in
        [0, 1] (it normalises internally), returns (summary, spatial tokens (B, h*w, D)) with CLS/register tokens
        already dropped, and has `patch_size` (and usually `min_resolution_step`, the multiple H and W must be; the
        module pads to it and cuts the extra tokens off).
    name: model name for the id ("c-radiov4-b"). RADIO exposes only its final spatial features: the id says "final".
    """

    def __init__(self, model, *, name: str, device: str = "cpu", batch_size: int = 4, num_threads: int = 0) -> None:
        import torch

        patch = int(getattr(model, "patch_size"))
        step = int(getattr(model, "min_resolution_step", patch) or patch)
        if step % patch:
            raise ModelError(f"{name}: min_resolution_step {step} is not a multiple of patch size {patch}")
        self.model = model.eval()
        self.module = _token_module(self.model, patch, None, radio_step=step)
        with torch.inference_mode():  # RADIO wrappers name their width differently across versions: ask the model
            dim = int(self.module(torch.zeros(1, 3, step, step)).shape[-1])
        spec = _spec(f"{name}/final", self.module, stride=patch, dim=dim, prefix_tokens=0, mean=(0.0, 0.0, 0.0),
                     std=(1.0, 1.0, 1.0))
        runtime = TorchRuntime(self.module, ["pixels"], ["tokens"], device=device, num_threads=num_threads)
        super().__init__(spec, runtime, batch_size)

    @classmethod
    def from_pretrained(cls, path_or_id: str | os.PathLike, *, name: str = "c-radio", dtype: str = "float32",
                        **options) -> "RadioBackbone":
        """Load C-RADIO from a local snapshot of its hub repository (weights and its Python files), or a hub id.
        This runs the repository's own code (trust_remote_code): only use a snapshot you trust."""
        transformers = _require("transformers", "transformers")
        source = os.fspath(path_or_id)
        try:
            model = transformers.AutoModel.from_pretrained(source, trust_remote_code=True, dtype=_torch_dtype(dtype))
        except (OSError, ImportError) as error:
            raise ModelError(f"cannot load C-RADIO from {source!r} (a local snapshot with config.json, the model's "
                             f"Python files and weights; its code needs timm and torchvision): {error}") from error
        return cls(model, name=name, **options)
