"""The interfaces every model plugs into: backbones (dense features), proposers (class-agnostic masks) and
pseudo-mask generators (class masks from image-level labels). Runtimes (onnxruntime, torch, Triton, TensorRT) sit
under the backbones and proposers and only run arrays; the logic around them is shared here."""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass
class Proposals:
    """Class-agnostic mask proposals of one image.

    masks: (N, H, W) bool, at the image's native resolution.
    objectness: (N,) float32 in [0, 1]; proposals below Config.objectness_threshold are dropped.
    """

    masks: np.ndarray
    objectness: np.ndarray

    def __post_init__(self) -> None:
        self.masks = np.asarray(self.masks, dtype=bool)
        self.objectness = np.asarray(self.objectness, dtype=np.float32).reshape(-1)
        if self.masks.ndim != 3 or len(self.masks) != len(self.objectness):
            raise ValueError(f"Proposals: masks {self.masks.shape} and objectness {self.objectness.shape} disagree")

    def __len__(self) -> int:
        return len(self.masks)

    def filter(self, keep: np.ndarray) -> "Proposals":
        return Proposals(self.masks[keep], self.objectness[keep])

    @classmethod
    def empty(cls, height: int, width: int) -> "Proposals":
        return cls(np.zeros((0, height, width), bool), np.zeros(0, np.float32))


class Backbone(abc.ABC):
    """Dense semantic features of images at native resolution.

    Images are zero-padded bottom/right to a multiple of `stride` (no resize); the feature map of an HxW image has
    shape (ceil(H / stride), ceil(W / stride), dim).
    """

    #: identifies model, layer and input handling; a bank records it and refuses another backbone.
    id: str
    dim: int
    stride: int

    @abc.abstractmethod
    def features(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """(h, w, dim) float32 feature map for each HxWx3 uint8 RGB image."""

    def describe(self) -> dict:
        return {"id": self.id, "dim": int(self.dim), "stride": int(self.stride), "padding": "zero, bottom/right"}


class Proposer(abc.ABC):
    """Class-agnostic mask proposals with objectness scores."""

    name: str

    @abc.abstractmethod
    def propose(self, images: Sequence[np.ndarray]) -> list[Proposals]:
        """Proposals for each HxWx3 uint8 RGB image."""


class PseudoMasker(abc.ABC):
    """Class masks from images and their image-level labels (the bank's seeds)."""

    name: str

    @abc.abstractmethod
    def generate(self, images: Sequence[np.ndarray], labels: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """HxW uint8 label map per image: 0 background, class ids from `labels` only, 255 ignore."""
