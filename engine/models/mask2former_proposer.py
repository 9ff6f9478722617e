"""Class-agnostic mask proposals from a Mask2Former-architecture model (Hugging Face transformers'
`Mask2FormerForUniversalSegmentation`): the paper's proposer, EntitySeg, is a Mask2Former trained class-agnostically
(one "entity" class plus no-object). Each query gives a mask (logits at 1/4 resolution, upsampled to the image) and
objectness = 1 - p(no-object), which for a multi-class checkpoint is the summed probability of all real classes.

Real weights: a local directory saved by `save_pretrained` (config.json + model.safetensors) or a hub id with hub
access. EntitySeg's own checkpoints are detectron2 files: they must first be converted to this layout (a key map, not
written here); any Mask2Former checkpoint on the hub (e.g. facebook/mask2former-swin-*-coco-panoptic) loads as is and
gives class-agnostic proposals the same way.

Exercised here (tests/models/test_mask2former_proposer.py) with a randomly initialised tiny Mask2FormerConfig (tiny Swin backbone):
resizing and padding, batching of equal-size inputs, masks at the native resolution, objectness in [0, 1], the
threshold and max_proposals knobs. Not exercised: proposal quality (random weights), the EntitySeg key conversion.
"""

from __future__ import annotations

import os
from typing import Sequence

import cv2
import numpy as np

from ..errors import InputError
from ..utils import bucket_by_size, check_image, padded_size
from ..regions import Proposals
from .base import Proposer
from .sam_proposer import PIXEL_MEAN, PIXEL_STD


class Mask2FormerProposer(Proposer):
    """Mask2Former / EntitySeg class-agnostic proposals.

    model: a transformers Mask2FormerForUniversalSegmentation (eval mode).
    short_side, max_size: images are resized so the short side is `short_side`, unless the long side would then
        exceed `max_size` (detectron2's test-time resize); larger inputs find smaller entities and cost more.
    size_divisor: the resized image is zero-padded bottom/right to a multiple of this (the backbone's total stride).
    mask_threshold: sigmoid probability at which a query's mask is binarised.
    score_threshold: queries with objectness below this are dropped (the engine applies its own threshold later;
        this only saves upsampling work).
    max_proposals: at most this many queries, highest objectness first, are kept per image.
    mask_quality: if True, objectness is multiplied by the mean mask probability inside the binary mask (the score
        of Mask2Former's instance inference), which demotes queries with vague masks.
    batch_size: images per forward, after bucketing by resized size. device: "cpu" or "cuda".
    """

    name = "mask2former"

    def __init__(self, model, *, short_side: int = 800, max_size: int = 1333, size_divisor: int = 32,
                 mask_threshold: float = 0.5, score_threshold: float = 0.0, max_proposals: int = 100,
                 mask_quality: bool = False, batch_size: int = 1, device: str = "cpu") -> None:
        if short_side < 1 or max_size < short_side or size_divisor < 1 or max_proposals < 1 or batch_size < 1:
            raise InputError(f"Mask2FormerProposer: need 1 <= short_side <= max_size, size_divisor, max_proposals, "
                             f"batch_size >= 1; got {short_side}, {max_size}, {size_divisor}, {max_proposals}, "
                             f"{batch_size}")
        for knob, value in (("mask_threshold", mask_threshold), ("score_threshold", score_threshold)):
            if not 0.0 <= value <= 1.0:
                raise InputError(f"Mask2FormerProposer: {knob} must be in [0, 1], got {value}")
        self.model = model.eval().to(device)
        self.device = device
        self.short_side, self.max_size, self.size_divisor = int(short_side), int(max_size), int(size_divisor)
        self.mask_threshold, self.score_threshold = float(mask_threshold), float(score_threshold)
        self.max_proposals, self.mask_quality, self.batch_size = int(max_proposals), bool(mask_quality), int(batch_size)

    @classmethod
    def from_pretrained(cls, path_or_id: str | os.PathLike, *, dtype: str = "float32", device: str = "cpu",
                        **knobs) -> "Mask2FormerProposer":
        """Load a Mask2FormerForUniversalSegmentation from a local directory (or a hub id with hub access)."""
        from .transformers_io import load_model

        model = load_model("Mask2FormerForUniversalSegmentation", path_or_id, dtype)
        return cls(model, device=device, **knobs)

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        scale = self.short_side / min(height, width)
        if max(height, width) * scale > self.max_size:
            scale = self.max_size / max(height, width)
        return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))

    def propose(self, images: Sequence[np.ndarray]) -> list[Proposals]:
        import torch

        images = [check_image(image, f"images[{i}]") for i, image in enumerate(images)]
        resized = [self.resized_size(*image.shape[:2]) for image in images]
        padded = [padded_size(h, w, self.size_divisor) for h, w in resized]
        out: list[Proposals | None] = [None] * len(images)
        dtype = next(self.model.parameters()).dtype
        for batch in bucket_by_size(padded, self.batch_size):
            pad_h, pad_w = padded[batch[0]]
            pixels = np.zeros((len(batch), pad_h, pad_w, 3), np.float32)
            for j, index in enumerate(batch):
                new_h, new_w = resized[index]
                image = cv2.resize(images[index], (new_w, new_h), interpolation=cv2.INTER_LINEAR)
                pixels[j, :new_h, :new_w] = (image.astype(np.float32) - PIXEL_MEAN) / PIXEL_STD
            with torch.inference_mode():
                result = self.model(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2)).to(self.device, dtype))
            for j, index in enumerate(batch):
                out[index] = self._postprocess(result.class_queries_logits[j].float(),
                                               result.masks_queries_logits[j].float(), (pad_h, pad_w),
                                               resized[index], images[index].shape[:2])
        return out  # type: ignore[return-value]

    def _postprocess(self, class_logits, mask_logits, padded: tuple[int, int], resized: tuple[int, int],
                     native: tuple[int, int]) -> Proposals:
        import torch
        import torch.nn.functional as F

        objectness = 1.0 - class_logits.softmax(-1)[:, -1]  # the last class is "no object"
        order = torch.argsort(objectness, descending=True)[:self.max_proposals]
        order = order[objectness[order] >= self.score_threshold]
        if not len(order):
            return Proposals.empty(*native)
        # 1/4-resolution logits -> padded input frame -> resized image -> native resolution
        logits = F.interpolate(mask_logits[order][None], size=padded, mode="bilinear", align_corners=False)
        logits = logits[:, :, :resized[0], :resized[1]]
        probs = F.interpolate(logits, size=tuple(native), mode="bilinear", align_corners=False)[0].sigmoid()
        masks = probs > self.mask_threshold
        scores = objectness[order]
        if self.mask_quality:
            area = masks.flatten(1).sum(1)
            scores = scores * (probs * masks).flatten(1).sum(1) / area.clamp(min=1)
        nonempty = masks.flatten(1).any(1)
        return Proposals.from_masks(masks[nonempty].cpu().numpy(), scores[nonempty].clamp(0, 1).cpu().numpy())

    def describe(self) -> dict:
        return {"name": self.name, "short_side": self.short_side, "max_size": self.max_size,
                "num_queries": int(self.model.config.num_queries), "mask_threshold": self.mask_threshold,
                "mask_quality": self.mask_quality}
