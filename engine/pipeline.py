"""The inference engine: images → proposals → backbone features → SMFA queries → one batched bank search → vote →
class-specific mask NMS → confidence-priority rasterisation."""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from . import ops
from .bank import FeatureBank
from .config import Config
from .errors import InputError
from .models.base import Proposals
from .retrieval import retrieve
from .utils import check_image, check_masks


@dataclass
class Result:
    """Segmentation of one image.

    label_map: (H, W) uint8 class ids; 0 = background (every pixel no kept proposal painted).
    classes, confidences, proposal_ids: one entry per proposal that survived the filters, the vote (not
        background) and NMS, in painting order (most confident first): its class id, its confidence (mean
        similarity of the winning class's neighbours) and its index in the image's input proposals.
    owner: (H, W) int32, the input-proposal index that painted each pixel, -1 where none did.
    num_proposals: proposals given for the image; num_candidates: those passing objectness and area filters.
    note: empty, or why the image is all background (e.g. no proposals).
    """

    label_map: np.ndarray
    classes: np.ndarray
    confidences: np.ndarray
    proposal_ids: np.ndarray
    owner: np.ndarray
    num_proposals: int
    num_candidates: int
    class_names: tuple[str, ...] = field(repr=False, default=())
    note: str = ""

    def class_summary(self) -> dict[str, float]:
        """Pixel fraction of each predicted class name."""
        counts = np.bincount(self.label_map.ravel(), minlength=len(self.class_names))
        total = max(self.label_map.size, 1)
        return {name: counts[i] / total for i, name in enumerate(self.class_names) if counts[i]}


class StageTimes:
    """Seconds spent per pipeline stage, accumulated over calls (bench/throughput.py reads it)."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, stage: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] += time.perf_counter() - start

    def reset(self) -> None:
        self.seconds.clear()


class Engine:
    """Segments images with a feature bank, a backbone and a proposer.

    bank: a FeatureBank or the path of a saved one.
    backbone: defaults to the backbone named in the bank (created through engine.models.create_backbone); a bank
        built with another backbone is refused.
    proposer: class-agnostic proposer used when `segment_batch` is given no proposals.
    config: inference knobs; defaults to the bank's config.
    """

    def __init__(self, bank, backbone=None, proposer=None, config: Config | None = None):
        if not isinstance(bank, FeatureBank):
            bank = FeatureBank.load(bank)
        self.bank = bank
        self.config = config or bank.config
        if backbone is None:
            from .models import create_backbone

            # the bank records the registry name as "model" (its "id" also names the padding rule)
            backbone = create_backbone(bank.backbone.get("model", bank.backbone["id"]), batch_size=self.config.batch_size,
                                       num_threads=self.config.num_threads)
        bank.check_backbone(backbone)
        self.backbone = backbone
        self.proposer = proposer
        self.times = StageTimes()

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.bank.class_names

    def segment(self, image: np.ndarray, proposals: Proposals | None = None) -> Result:
        return self.segment_batch([image], None if proposals is None else [proposals])[0]

    def segment_batch(self, images: Sequence[np.ndarray], proposals: Sequence[Proposals] | None = None) -> list[Result]:
        """Segment HxWx3 uint8 RGB images; `proposals` (one Proposals per image) replaces the engine's proposer."""
        config, times = self.config, self.times
        with times("decode"):
            images = [check_image(image, f"images[{i}]") for i, image in enumerate(images)]
        if not images:
            return []
        with times("proposer"):
            proposals = self._proposals(images, proposals)
        with times("filter"):
            candidates = [self._candidates(p) for p in proposals]
        with times("backbone"):
            features = self.backbone.features(images)
        with times("smfa"):
            queries = [ops.soft_mask_pool(f, proposals[i].masks[c], self.backbone.stride, eps=config.smfa_eps,
                                          num_threads=config.num_threads)
                       for i, (f, c) in enumerate(zip(features, candidates))]
        with times("search_vote"):
            classes, confidences = retrieve(self.bank, np.concatenate(queries), config.top_k, config.vote)
        results = []
        with times("nms_raster"):
            offsets = np.cumsum([0] + [len(c) for c in candidates])
            for i, image in enumerate(images):
                part = slice(offsets[i], offsets[i + 1])
                results.append(self._assemble(image, proposals[i], candidates[i], classes[part], confidences[part]))
        return results

    def _proposals(self, images, proposals) -> list[Proposals]:
        if proposals is None:
            if self.proposer is None:
                raise InputError("no proposals given and this engine has no proposer: pass proposals=[...] or "
                                 "construct the Engine with a proposer")
            proposals = self.proposer.propose(images)
        if len(proposals) != len(images):
            raise InputError(f"got {len(proposals)} proposal sets for {len(images)} images")
        checked = []
        for i, (image, p) in enumerate(zip(images, proposals)):
            masks = check_masks(p.masks, *image.shape[:2], name=f"proposals[{i}].masks")
            checked.append(Proposals(masks, p.objectness))
        return checked

    def _candidates(self, proposals: Proposals) -> np.ndarray:
        """Indices of proposals with objectness >= tau_obj and area >= min_area."""
        area = proposals.masks.sum(axis=(1, 2))
        keep = (proposals.objectness >= self.config.objectness_threshold) & (area >= self.config.min_area)
        return np.flatnonzero(keep)

    def _assemble(self, image, proposals, candidates, classes, confidences) -> Result:
        height, width = image.shape[:2]
        foreground = classes != 0
        ids = candidates[foreground]
        keep, label_map, owner = ops.mask_nms_raster(proposals.masks[ids], classes[foreground],
                                                     confidences[foreground], self.config.nms_iou_threshold,
                                                     num_threads=self.config.num_threads)
        order = np.argsort(-confidences[foreground][keep].astype(np.float64), kind="stable")
        owner = np.where(owner >= 0, ids[np.clip(owner, 0, None)] if len(ids) else -1, -1).astype(np.int32)
        note = ""
        if len(proposals) == 0:
            note = "no proposals: all background"
        elif len(candidates) == 0:
            note = "no proposal passed the objectness and area filters: all background"
        elif not keep.any():
            note = "every proposal was voted background: all background"
        return Result(
            label_map=label_map.astype(np.uint8),
            classes=classes[foreground][keep][order].astype(np.int32),
            confidences=confidences[foreground][keep][order].astype(np.float32),
            proposal_ids=ids[keep][order].astype(np.int64),
            owner=owner,
            num_proposals=len(proposals),
            num_candidates=len(candidates),
            class_names=self.class_names,
            note=note,
        )


_ENGINES: dict = {}


def segment_batch(images: Sequence[np.ndarray], bank, proposals: Sequence[Proposals] | None = None,
                  proposer=None, config: Config | None = None) -> list[Result]:
    """One-call segmentation. `bank` is a FeatureBank or a bank directory; engines built from a directory are kept
    (per path, proposer and config) so repeated calls do not reload models."""
    if isinstance(bank, FeatureBank):
        engine = Engine(bank, proposer=proposer, config=config)
    else:
        key = (str(bank), id(proposer), repr(config))
        if key not in _ENGINES:
            _ENGINES[key] = Engine(bank, proposer=proposer, config=config)
        engine = _ENGINES[key]
    return engine.segment_batch(images, proposals)
