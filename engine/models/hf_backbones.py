"""Dense ViT backbones of the paper family through Hugging Face transformers: DINOv2 (`Dinov2Model`, also
`Dinov2WithRegistersModel`), DINOv3 (`DINOv3ViTModel`) and C-RADIO (the paper's backbone, custom code loaded with
`trust_remote_code`).

Each turns an image into patch tokens, drops the CLS and register tokens and reshapes the rest to an
(H/patch, W/patch, D) map; the stride is the patch size, images are zero-padded bottom/right to a multiple of it (no
resize) and the id names model and layer ("dinov2-vits14/layer8", "dinov2-vits14/final").

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
from typing import Sequence

import numpy as np

from ..errors import InputError, ModelError
from ..utils import bucket_by_size, check_image, pad_to_multiple, padded_size
from .base import Backbone

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
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


def _dense_module(model, patch: int, prefix_tokens: int, layer: int | None, call: str = "hf"):
    """An nn.Module: normalised pixels (B, 3, H, W) float32 -> (B, H/patch, W/patch, D) float32 patch features."""
    import torch

    class DenseViT(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, pixels: torch.Tensor) -> torch.Tensor:
            h, w = pixels.shape[-2] // patch, pixels.shape[-1] // patch
            dtype = next(self.model.parameters()).dtype
            x = pixels.to(dtype)
            if call == "radio":
                # RADIO's contract: RGB in [0, 1]; returns (summary, spatial tokens (B, h*w, D)), prefix tokens dropped
                tokens = self.model(x)[1]
            elif layer is None:
                tokens = self.model(pixel_values=x).last_hidden_state
            else:
                tokens = self.model(pixel_values=x, output_hidden_states=True).hidden_states[layer]
            tokens = tokens[:, prefix_tokens:]
            return tokens.reshape(tokens.shape[0], h, w, tokens.shape[-1]).float()

    return DenseViT().eval()


class RuntimeBackbone(Backbone):
    """A backbone from a runtime that maps normalised pixels (B, 3, H, W) float32 ("pixels") to patch features
    (B, H/stride, W/stride, dim) float32 ("features").

    runtime: an engine.models.runtime.Runtime (TorchRuntime over the dense module, or OnnxRuntime over its export).
    id / dim / stride: as Backbone; mean, std: per-channel normalisation of RGB in [0, 1].
    batch_size: images per runtime call, after bucketing by padded size.
    """

    def __init__(self, runtime, *, id: str, dim: int, stride: int, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD, batch_size: int = 4) -> None:
        if batch_size < 1:
            raise InputError(f"batch_size must be >= 1, got {batch_size}")
        self.runtime = runtime
        self.id, self.dim, self.stride = id, int(dim), int(stride)
        self.mean = np.asarray(mean, np.float32).reshape(1, 3, 1, 1)
        self.std = np.asarray(std, np.float32).reshape(1, 3, 1, 1)
        self.batch_size = int(batch_size)

    def preprocess(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Equal-size uint8 HxWx3 images -> zero-padded, normalised (B, 3, H', W') float32."""
        batch = np.stack([pad_to_multiple(image, self.stride) for image in images]).astype(np.float32)
        return (batch.transpose(0, 3, 1, 2) / 255.0 - self.mean) / self.std

    def features(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        images = [check_image(image, f"images[{i}]") for i, image in enumerate(images)]
        sizes = [padded_size(*image.shape[:2], self.stride) for image in images]
        out: list[np.ndarray | None] = [None] * len(images)
        for batch in bucket_by_size(sizes, self.batch_size):
            pixels = self.preprocess([images[i] for i in batch])
            features = self.runtime.run({"pixels": pixels})["features"]
            expected = (len(batch), pixels.shape[2] // self.stride, pixels.shape[3] // self.stride, self.dim)
            if features.shape != expected:
                raise ModelError(f"backbone {self.id}: runtime returned features {features.shape}, expected {expected}")
            for j, index in enumerate(batch):
                out[index] = np.ascontiguousarray(features[j], dtype=np.float32)
        return out  # type: ignore[return-value]

    def describe(self) -> dict:
        return {**super().describe(), "runtime": self.runtime.describe()}


class HFViTBackbone(RuntimeBackbone):
    """DINOv2 / DINOv2-with-registers / DINOv3 ViT from transformers, run with torch.

    model: a Dinov2Model, Dinov2WithRegistersModel or DINOv3ViTModel (eval mode, any dtype).
    name: model name recorded in the id ("dinov2-vits14").
    layer: None for the final (layer-normed) output; k in 1..num_hidden_layers for the raw output of block k
        (intermediate layers often retrieve better than the last one).
    device: "cpu" or "cuda". batch_size: images per forward.
    """

    def __init__(self, model, *, name: str, layer: int | None = None, device: str = "cpu",
                 batch_size: int = 4) -> None:
        from .runtime import TorchRuntime

        config = model.config
        depth = int(config.num_hidden_layers)
        if layer is not None and not 1 <= layer <= depth:
            raise InputError(f"{name}: layer must be None (final output) or in 1..{depth}, got {layer}")
        patch = int(config.patch_size)
        # CLS first, then the register tokens (DINOv2-with-registers, DINOv3), then the patch tokens
        self.prefix_tokens = 1 + int(getattr(config, "num_register_tokens", 0) or 0)
        self.layer = layer
        self.model = model.eval()
        self.module = _dense_module(self.model, patch, self.prefix_tokens, layer)
        super().__init__(TorchRuntime(self.module, ["pixels"], ["features"], device=device),
                         id=f"{name}/{'final' if layer is None else f'layer{layer}'}", dim=int(config.hidden_size),
                         stride=patch, mean=IMAGENET_MEAN, std=IMAGENET_STD, batch_size=batch_size)

    @classmethod
    def from_pretrained(cls, path_or_id: str | os.PathLike, *, name: str | None = None, layer: int | None = None,
                        dtype: str = "float32", device: str = "cpu", batch_size: int = 4) -> "HFViTBackbone":
        """Load a DINOv2/DINOv3 checkpoint (local directory or hub id); the class is read from its config.json."""
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
                   device=device, batch_size=batch_size)

    def export_onnx(self, path: str | os.PathLike, opset: int = 18) -> str:
        """Export pixels (B, 3, H, W) -> features (B, H/patch, W/patch, D) with symbolic B, H, W (multiples of the
        patch size); run it with OnnxRuntime inside a RuntimeBackbone of the same id, stride, dim, mean and std."""
        import torch

        if next(self.model.parameters()).dtype != torch.float32:
            raise ModelError(f"{self.id}: export a float32 model (convert to fp16 in the ONNX toolchain if needed)")
        example = torch.zeros(2, 3, 2 * self.stride, 3 * self.stride)  # 2, not 1: export specialises size 1
        batch, height, width = torch.export.Dim("batch"), torch.export.Dim("height"), torch.export.Dim("width")
        shapes = {"pixels": {0: batch, 2: self.stride * height, 3: self.stride * width}}
        try:
            torch.onnx.export(self.module, (example,), os.fspath(path), input_names=["pixels"],
                              output_names=["features"], dynamic_shapes=shapes, opset_version=opset, dynamo=True)
        except Exception as error:
            raise ModelError(f"ONNX export of {self.id} failed: {error}") from error
        return os.fspath(path)


class RadioBackbone(RuntimeBackbone):
    """C-RADIO (the paper's backbone, NVIDIA's RADIO family) through its own remote code.

    model: the RADIO nn.Module as `AutoModel.from_pretrained(path, trust_remote_code=True)` returns it: takes RGB in
        [0, 1] (it normalises internally), returns (summary, spatial tokens (B, h*w, D)) with CLS/register tokens
        already dropped, and has `patch_size` (and usually `min_resolution_step`, the multiple H and W must be).
    name: model name for the id ("c-radiov4-b"). RADIO exposes only its final spatial features, so the id ends in
        "/final".
    """

    def __init__(self, model, *, name: str, dim: int | None = None, device: str = "cpu", batch_size: int = 4) -> None:
        from .runtime import TorchRuntime

        patch = int(getattr(model, "patch_size"))
        step = int(getattr(model, "min_resolution_step", patch) or patch)
        if step % patch:
            raise ModelError(f"{name}: min_resolution_step {step} is not a multiple of patch size {patch}")
        self.model = model.eval()
        self.module = _dense_module(self.model, patch, 0, None, call="radio")
        if dim is None:  # RADIO wrappers name their width differently across versions: ask the model
            import torch

            with torch.inference_mode():
                dim = int(self.module(torch.zeros(1, 3, step, step)).shape[-1])
        super().__init__(TorchRuntime(self.module, ["pixels"], ["features"], device=device), id=f"{name}/final",
                         dim=dim, stride=patch, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), batch_size=batch_size)
        self.pad_multiple = step

    def preprocess(self, images: Sequence[np.ndarray]) -> np.ndarray:
        # RADIO wants H, W multiples of min_resolution_step (may exceed the patch size): pad further; the features
        # are then cropped back to ceil(H / patch) x ceil(W / patch) in features()
        batch = np.stack([pad_to_multiple(image, self.pad_multiple) for image in images]).astype(np.float32)
        return batch.transpose(0, 3, 1, 2) / 255.0

    def features(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        if self.pad_multiple == self.stride:
            return super().features(images)
        images = [check_image(image, f"images[{i}]") for i, image in enumerate(images)]
        out = []
        for image in images:
            pixels = self.preprocess([image])
            features = self.runtime.run({"pixels": pixels})["features"][0]
            h, w = padded_size(*image.shape[:2], self.stride)
            out.append(np.ascontiguousarray(features[:h // self.stride, :w // self.stride], dtype=np.float32))
        return out

    @classmethod
    def from_pretrained(cls, path_or_id: str | os.PathLike, *, name: str = "c-radio", dtype: str = "float32",
                        device: str = "cpu", batch_size: int = 4) -> "RadioBackbone":
        """Load C-RADIO from a local snapshot of its hub repository (weights and its Python files), or a hub id.
        This runs the repository's own code (trust_remote_code): only use a snapshot you trust."""
        transformers = _require("transformers", "transformers")
        source = os.fspath(path_or_id)
        try:
            model = transformers.AutoModel.from_pretrained(source, trust_remote_code=True, dtype=_torch_dtype(dtype))
        except (OSError, ImportError) as error:
            raise ModelError(f"cannot load C-RADIO from {source!r} (a local snapshot with config.json, the model's "
                             f"Python files and weights; its code needs timm and torchvision): {error}") from error
        return cls(model, name=name, device=device, batch_size=batch_size)
