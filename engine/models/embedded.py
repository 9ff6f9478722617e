"""The embedded class-agnostic proposer: mask proposals from the backbone's own features and the image's structure,
with no model of its own.

Watershed superpixels → adjacent superpixels merged closest first by the similarity of their pooled backbone
features, colour and size (engine.ops.merge_regions) → every region of several cuts of the merge tree is a proposal,
so proposals overlap across granularities; objectness = the region's feature coherence. The engine hands the
proposer the feature maps it computes for retrieval anyway, so proposals cost no second forward pass.
"""

from __future__ import annotations

import threading
from typing import Sequence

import numpy as np

from .. import ops
from ..config import Config
from ..errors import InputError
from ..regions import Proposals
from ..registry import DEFAULT_BACKBONE
from ..utils import check_image
from .backbones import create_backbone
from .base import Proposer, checked_features
from .superpixels import slic_graph, superpixel_graph


class EmbeddedProposer(Proposer):
    """Superpixels → agglomerative merging by backbone features and colour → proposals at several granularities.

    backbone: the backbone whose features drive the merging when `propose` is given none (the engine gives its own);
        created on first use (the embedded default).
    n_superpixels: leaves of the hierarchy; more gives finer boundaries (thin things) and costs merging time.
    superpixel_scale: the superpixels are computed on the image resized by this factor (0.5: a quarter of the cost,
        boundaries to two pixels).
    levels: region counts at which the merge tree is cut; every region of every cut is a proposal (a region present
        in several cuts is emitted once).
    colour_weight, size_weight: terms of the merge distance (engine.ops.merge_regions).
    merge_group: which feature group (layer) of the backbone drives the merging: -1, the last (the finest layer of
        effnet-lite2/multilayer, block 14); None, every feature.
    min_area: regions smaller than this many pixels are not emitted.
    num_threads: threads for the pooling kernel (0 = OpenMP's default).
    superpixels: "watershed" (OpenCV, host) or "slic" (engine.ops.slic_superpixels, one kernel for CPU and GPU, with
        slic_compactness and slic_iterations).
    merging: "greedy" (engine.ops.merge_regions, closest pair first, CPU) or "rac" (engine.ops.merge_regions_rac,
        rounds of mutual nearest pairs, one kernel for CPU and GPU).
    The defaults are measured on VOC and CamVid together (docs/decisions.md).
    """

    name = "embedded"
    uses_features = True

    def __init__(self, backbone=None, n_superpixels: int = 400, superpixel_scale: float = 0.5,
                 levels: Sequence[int] = (100, 50), colour_weight: float = 1.0, size_weight: float = 3.0,
                 merge_group: int | None = -1, min_area: int = 300, num_threads: int = 1,
                 superpixels: str = "watershed", merging: str = "greedy", slic_compactness: float = 10.0,
                 slic_iterations: int = 10) -> None:
        if superpixels not in ("watershed", "slic") or merging not in ("greedy", "rac"):
            raise InputError(f"superpixels must be 'watershed' or 'slic' and merging 'greedy' or 'rac', got "
                             f"{superpixels!r} and {merging!r}")
        self._backbone = backbone
        self._lock = threading.Lock()
        self.n_superpixels = int(n_superpixels)
        self.superpixel_scale = float(superpixel_scale)
        self.levels = tuple(sorted({int(k) for k in levels}, reverse=True))
        self.colour_weight = float(colour_weight)
        self.size_weight = float(size_weight)
        self.merge_group = merge_group
        self.min_area = int(min_area)
        self.num_threads = int(num_threads)
        self.superpixels, self.merging = superpixels, merging
        self.slic_compactness, self.slic_iterations = float(slic_compactness), int(slic_iterations)

    @property
    def backbone(self):
        with self._lock:  # made once, whichever thread asks first
            if self._backbone is None:
                self._backbone = create_backbone(DEFAULT_BACKBONE)
        return self._backbone

    def propose(self, images: Sequence[np.ndarray], features: Sequence[np.ndarray] | None = None,
                stride: int | None = None, groups: Sequence[int] = ()) -> list[Proposals]:
        """Proposals for each HxWx3 uint8 RGB image; `features` (one (ceil(H/stride), ceil(W/stride), D) map per
        image, with their `stride` and feature `groups`) are the backbone's, computed here when not given."""
        images = [check_image(image, f"images[{i}]") for i, image in enumerate(images)]
        if features is None:
            features = checked_features(self.backbone, images)
            stride, groups = self.backbone.stride, self.backbone.groups
        return [self.propose_one(image, feature_map, stride, groups) for image, feature_map in zip(images, features)]

    def propose_one(self, image: np.ndarray, features: np.ndarray, stride: int,
                    groups: Sequence[int] = ()) -> Proposals:
        """Proposals of one image from its feature map."""
        if self.superpixels == "slic":
            labels, edges, colour = slic_graph(image, self.n_superpixels, self.superpixel_scale,
                                               self.slic_compactness, self.slic_iterations, self.num_threads)
        else:
            labels, edges, colour = superpixel_graph(image, self.n_superpixels, self.superpixel_scale)
        count = int(labels.max()) + 1
        leaf_features = ops.soft_mask_pool(self.merge_features(features, groups), labels,
                                           np.eye(count, dtype=bool), stride, num_threads=self.num_threads)
        merge = ops.merge_regions_rac if self.merging == "rac" else ops.merge_regions
        tree = merge(edges, np.bincount(labels.ravel(), minlength=count), leaf_features, colour,
                                 self.levels, self.colour_weight, self.size_weight)
        rows, nodes = [], []
        seen = set()
        for snapshot in tree.snapshots:  # finest cut first
            for node in np.unique(snapshot):
                if node in seen or tree.area[node] < self.min_area:
                    continue
                seen.add(int(node))
                nodes.append(int(node))
                rows.append(snapshot == node)
        if not rows:
            return Proposals.empty(*image.shape[:2])
        return Proposals(labels, np.stack(rows), tree.coherence[nodes].astype(np.float32))

    @property
    def runs_on_device(self) -> bool:
        """Whether `propose_on_device` can make this proposer's proposals: its superpixels and merging are the
        kernels the GPU runs (SLIC and RAC)."""
        return self.superpixels == "slic" and self.merging == "rac"

    def propose_on_device(self, images: Sequence[np.ndarray], features: Sequence, stride: int,
                          groups: Sequence[int] = ()) -> list[Proposals]:
        """`propose` where the feature maps are (torch tensors, e.g. on the GPU that ran the backbone): the images go
        up once and the proposals' arrays stay there (engine.models.embedded_device)."""
        if not self.runs_on_device:
            raise InputError(f"propose_on_device needs superpixels 'slic' and merging 'rac', got "
                             f"{self.superpixels!r} and {self.merging!r}")
        from . import embedded_device

        images = [check_image(image, f"images[{i}]") for i, image in enumerate(images)]
        return embedded_device.propose(self, images, features, stride, groups)

    def merge_features(self, features: np.ndarray, groups: Sequence[int]) -> np.ndarray:
        """The part of a feature map that drives the merging (`merge_group`)."""
        if self.merge_group is None or not len(groups):
            return features
        bounds = np.concatenate([[0], np.cumsum(groups)])
        group = range(len(groups))[self.merge_group]
        part = features[..., bounds[group]:bounds[group + 1]]
        return part.contiguous() if hasattr(part, "contiguous") else np.ascontiguousarray(part)  # torch or NumPy


#: the embedded proposer's knobs on a GPU engine with Config.gpu_proposer: the kernels that run there
DEVICE_PROPOSER = dict(superpixels="slic", merging="rac")


def create_proposer(config: Config | None = None, on_device: bool = False, **options) -> EmbeddedProposer:
    """The embedded class-agnostic proposer with the engine's min_area and thread count; `on_device` (a GPU engine
    whose Config.gpu_proposer is set): the one that runs on the device (DEVICE_PROPOSER)."""
    config = config or Config()
    if on_device and config.gpu_proposer:
        options = {**DEVICE_PROPOSER, **options}
    options.setdefault("min_area", config.min_area)
    options.setdefault("num_threads", config.num_threads or 1)
    return EmbeddedProposer(**options)


def resolve_proposer(proposer, config: Config | None = None, on_device: bool = False):
    """A proposer argument as the engine and the bank take it: "embedded" -> the embedded proposer (create_proposer's,
    `on_device` for a GPU engine); None or a proposer object -> itself."""
    if isinstance(proposer, str):
        if proposer != "embedded":
            raise InputError(f"unknown proposer {proposer!r}; pass 'embedded', a Proposer or None")
        return create_proposer(config, on_device)
    return proposer
