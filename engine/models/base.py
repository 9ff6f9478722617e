"""The interfaces every model plugs into: backbones (dense features), proposers (class-agnostic masks) and
pseudo-mask generators (class masks from image-level labels). Runtimes (onnxruntime, torch, Triton, TensorRT) sit
under the backbones and proposers and only run arrays; the logic around them is shared here."""

from __future__ import annotations

import abc
from typing import Sequence

import numpy as np

from ..arrays import place
from ..errors import InputError, ModelError
from ..regions import Proposals
from ..utils import ceil_div, check_image


class Backbone(abc.ABC):
    """Dense semantic features of images at native resolution.

    Images are zero-padded bottom/right to a multiple of `stride` (no resize); the feature map of an HxW image has
    shape (ceil(H / stride), ceil(W / stride), dim).
    """

    #: identifies model, layer and input handling; a bank records it and refuses another backbone.
    id: str
    dim: int
    stride: int
    #: widths of the layers a multi-layer feature map concatenates, each L2-normalised on its own after pooling
    groups: tuple[int, ...] = ()

    @abc.abstractmethod
    def features(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """(h, w, dim) float32 feature map for each HxWx3 uint8 RGB image."""

    def features_on_device(self, images: Sequence[np.ndarray]) -> list:
        """The feature maps left where the model ran: CUDA tensors for a runtime on a GPU that can keep them there
        (torch, TensorRT), else the host arrays of `features`."""
        return self.features(images)

    def describe(self) -> dict:
        return {"id": self.id, "dim": int(self.dim), "stride": int(self.stride), "groups": list(self.groups),
                "padding": "zero, bottom/right"}


def checked_features(backbone: Backbone, images: Sequence[np.ndarray], names: Sequence[str] | None = None,
                     finite: bool = True, on_device: bool = False) -> list:
    """Any backbone's features of checked images, checked before they reach a bank or an index: one
    (ceil(H/stride), ceil(W/stride), dim) map per image, all finite unless `finite` is False. `names` name the
    images in errors (default images[i]). on_device: leave them where the model ran (Backbone.features_on_device);
    device maps are checked for finiteness with one host synchronisation for the whole batch."""
    if isinstance(images, np.ndarray) and images.ndim == 3:
        raise InputError("images: expected a sequence of HxWx3 images, got a single array; wrap it in a list")
    names = names or [f"images[{i}]" for i in range(len(images))]
    images = [check_image(image, name) for image, name in zip(images, names)]
    features = backbone.features_on_device(images) if on_device else backbone.features(images)
    if len(features) != len(images):
        raise ModelError(f"backbone {backbone.id} returned {len(features)} feature maps for {len(images)} images")
    for f, image, name in zip(features, images, names):
        expected = (ceil_div(image.shape[0], backbone.stride), ceil_div(image.shape[1], backbone.stride),
                    backbone.dim)
        if tuple(np.shape(f)) != expected:
            raise ModelError(f"backbone {backbone.id}: feature map of shape {tuple(np.shape(f))} for {name} "
                             f"({image.shape[0]}x{image.shape[1]}), expected {expected}")
    bad = nonfinite(features) if finite else []
    if bad:
        raise ModelError(f"backbone {backbone.id}: NaN or inf features for {names[bad[0]]}")
    return features


def nonfinite(maps: Sequence) -> list[int]:
    """Indices of the maps holding NaN or inf; device maps are checked on the device and read back once."""
    on_device = [i for i, f in enumerate(maps) if place(f).is_cuda]
    flags = [not np.isfinite(f).all() if i not in on_device else False for i, f in enumerate(maps)]
    if on_device:
        import torch

        found = torch.stack([~torch.isfinite(maps[i]).all() for i in on_device]).cpu()
        for i, flag in zip(on_device, found.tolist()):
            flags[i] = bool(flag)
    return [i for i, flag in enumerate(flags) if flag]


class Proposer(abc.ABC):
    """Class-agnostic mask proposals with objectness scores.

    A proposer with `uses_features = True` takes the engine's backbone features too:
    `propose(images, features=maps, stride=backbone.stride, groups=backbone.groups)`, so that one forward pass serves
    proposals and retrieval.
    """

    name: str
    uses_features: bool = False

    @abc.abstractmethod
    def propose(self, images: Sequence[np.ndarray]) -> list[Proposals]:
        """Proposals for each HxWx3 uint8 RGB image."""


class PseudoMasker(abc.ABC):
    """Class masks from images and their image-level labels (the bank's seeds)."""

    name: str

    @abc.abstractmethod
    def generate(self, images: Sequence[np.ndarray], labels: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """HxW uint8 label map per image: 0 background, class ids from `labels` only, 255 ignore."""
