"""Class-agnostic mask proposals from a SAM-family model (Segment Anything through Hugging Face transformers'
`SamModel`), the automatic way: a regular grid of point prompts, three masks per point, filtered by the model's
predicted IoU and by stability, de-duplicated by box NMS, returned at the image's resolution with objectness = the
predicted IoU.

Real weights: a local directory saved by `save_pretrained` (config.json + model.safetensors), or a hub id where the
user has hub access (facebook/sam-vit-base, -large, -huge). None can be downloaded here. The paper's proposer is
EntitySeg (see mask2former_proposer.py); SAM is the common alternative.

Exercised here (tests/models/test_sam_proposer.py) with a randomly initialised tiny SamConfig: preprocessing (longest side
resized to the model's input size, padded square), batched point prompts, both filters, NMS, mask shapes and dtypes at
the native resolution, objectness range; the NMS and stability helpers are also tested alone. Not exercised: mask
quality (random weights predict noise), the crop layers and small-region clean-up of the original generator (not
implemented: the engine drops small regions itself).
"""

from __future__ import annotations

import os
from typing import Sequence

import cv2
import numpy as np

from ..errors import InputError
from ..utils import check_image
from ..regions import Proposals
from .base import Proposer

# SAM normalises RGB in 0..255 with ImageNet statistics
PIXEL_MEAN = np.array([123.675, 116.28, 103.53], np.float32)
PIXEL_STD = np.array([58.395, 57.12, 57.375], np.float32)


def point_grid(points_per_side: int) -> np.ndarray:
    """(n*n, 2) points (x, y) in [0, 1], centred in an n x n grid of equal cells."""
    offset = 1.0 / (2 * points_per_side)
    side = np.linspace(offset, 1 - offset, points_per_side, dtype=np.float32)
    xs, ys = np.meshgrid(side, side)
    return np.stack([xs.reshape(-1), ys.reshape(-1)], axis=1)


def stability_score(logits: np.ndarray, threshold: float, offset: float) -> np.ndarray:
    """IoU between each mask binarised at threshold + offset and at threshold - offset (the first is inside the
    second, so IoU = area ratio). logits: (N, H, W). A mask whose area barely moves with the threshold is stable."""
    flat = logits.reshape(len(logits), -1)
    inner = (flat > threshold + offset).sum(1, dtype=np.int64)
    outer = (flat > threshold - offset).sum(1, dtype=np.int64)
    return np.where(outer > 0, inner / np.maximum(outer, 1), 0.0).astype(np.float32)


def mask_boxes(masks: np.ndarray) -> np.ndarray:
    """(N, 4) float32 boxes (x0, y0, x1, y1), inclusive pixel bounds, of (N, H, W) bool masks; empty masks give
    zeros."""
    boxes = np.zeros((len(masks), 4), np.float32)
    rows, cols = masks.any(2), masks.any(1)
    for i in range(len(masks)):
        ys, xs = np.flatnonzero(rows[i]), np.flatnonzero(cols[i])
        if len(ys):
            boxes[i] = (xs[0], ys[0], xs[-1], ys[-1])
    return boxes


def box_nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Indices of the boxes kept by greedy NMS, best score first: a box is dropped when its IoU with a kept,
    higher-scoring box exceeds `iou_threshold`. Boxes are inclusive pixel bounds (x0, y0, x1, y1)."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
    areas = (boxes[:, 2] - boxes[:, 0] + 1) * (boxes[:, 3] - boxes[:, 1] + 1)
    keep = []
    while len(order):
        best, rest = order[0], order[1:]
        keep.append(best)
        width = np.minimum(boxes[best, 2], boxes[rest, 2]) - np.maximum(boxes[best, 0], boxes[rest, 0]) + 1
        height = np.minimum(boxes[best, 3], boxes[rest, 3]) - np.maximum(boxes[best, 1], boxes[rest, 1]) + 1
        inter = np.clip(width, 0, None) * np.clip(height, 0, None)
        iou = inter / (areas[best] + areas[rest] - inter)
        order = rest[iou <= iou_threshold]
    return np.asarray(keep, np.int64)


class SamProposer(Proposer):
    """SAM automatic mask proposals.

    model: a transformers SamModel (eval mode).
    points_per_side: the prompt grid is points_per_side^2 points over the image; more points find smaller objects
        and cost one mask-decoder pass per point.
    points_per_batch: points sent through the mask decoder at once; bounds memory (3 masks per point are upsampled).
    pred_iou_thresh: masks whose predicted IoU is below this are dropped (the model's own quality estimate).
    stability_score_thresh: masks whose stability score (see `stability_score`) is below this are dropped.
    stability_score_offset: how far the threshold is moved, in logits, to measure stability.
    box_nms_thresh: box IoU above which the less confident of two masks is dropped.
    mask_threshold: logit at which masks are binarised.
    device: "cpu" or "cuda".
    """

    name = "sam"

    def __init__(self, model, *, points_per_side: int = 32, points_per_batch: int = 64,
                 pred_iou_thresh: float = 0.88, stability_score_thresh: float = 0.95,
                 stability_score_offset: float = 1.0, box_nms_thresh: float = 0.7, mask_threshold: float = 0.0,
                 device: str = "cpu") -> None:
        if points_per_side < 1 or points_per_batch < 1:
            raise InputError(f"points_per_side and points_per_batch must be >= 1, got {points_per_side}, "
                             f"{points_per_batch}")
        for knob, value in (("pred_iou_thresh", pred_iou_thresh), ("stability_score_thresh", stability_score_thresh),
                            ("box_nms_thresh", box_nms_thresh)):
            if not 0.0 <= value <= 1.0:
                raise InputError(f"SamProposer: {knob} must be in [0, 1], got {value}")
        self.model = model.eval().to(device)
        self.device = device
        self.input_size = int(model.config.vision_config.image_size)
        self.points_per_side = int(points_per_side)
        self.points_per_batch = int(points_per_batch)
        self.pred_iou_thresh = float(pred_iou_thresh)
        self.stability_score_thresh = float(stability_score_thresh)
        self.stability_score_offset = float(stability_score_offset)
        self.box_nms_thresh = float(box_nms_thresh)
        self.mask_threshold = float(mask_threshold)

    @classmethod
    def from_pretrained(cls, path_or_id: str | os.PathLike, *, dtype: str = "float32", device: str = "cpu",
                        **knobs) -> "SamProposer":
        """Load a SamModel from a local directory (or a hub id with hub access); `knobs` as the constructor's."""
        from .transformers_io import load_model

        return cls(load_model("SamModel", path_or_id, dtype), device=device, **knobs)

    def preprocess(self, image: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
        """(1, 3, S, S) float32 input (longest side resized to S, zero-padded bottom/right after normalising, as SAM)
        and the resized (height, width)."""
        height, width = image.shape[:2]
        scale = self.input_size / max(height, width)
        new_h, new_w = max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))
        resized = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR).astype(np.float32)
        pixels = np.zeros((self.input_size, self.input_size, 3), np.float32)
        pixels[:new_h, :new_w] = (resized - PIXEL_MEAN) / PIXEL_STD
        return pixels.transpose(2, 0, 1)[None], (new_h, new_w)

    def propose(self, images: Sequence[np.ndarray]) -> list[Proposals]:
        return [self._propose_one(check_image(image, f"images[{i}]")) for i, image in enumerate(images)]

    def _propose_one(self, image: np.ndarray) -> Proposals:
        import torch
        import torch.nn.functional as F

        height, width = image.shape[:2]
        pixels, (new_h, new_w) = self.preprocess(image)
        dtype = next(self.model.parameters()).dtype
        points = point_grid(self.points_per_side) * np.array([new_w, new_h], np.float32)
        kept_masks, kept_scores = [], []
        with torch.inference_mode():
            embeddings = self.model.get_image_embeddings(torch.from_numpy(pixels).to(self.device, dtype))
            for start in range(0, len(points), self.points_per_batch):
                batch = torch.from_numpy(points[start:start + self.points_per_batch]).to(self.device, dtype)
                out = self.model(image_embeddings=embeddings, input_points=batch[None, :, None, :],
                                 input_labels=torch.ones(1, len(batch), 1, dtype=torch.long, device=self.device),
                                 multimask_output=True)
                scores = out.iou_scores[0].reshape(-1).float()
                logits = out.pred_masks[0].reshape(-1, *out.pred_masks.shape[-2:]).float()
                keep = scores >= self.pred_iou_thresh
                if not bool(keep.any()):
                    continue
                # low-res logits -> padded input frame -> unpadded resized image -> native resolution
                logits = F.interpolate(logits[keep][:, None], size=(self.input_size, self.input_size),
                                       mode="bilinear", align_corners=False)[:, :, :new_h, :new_w]
                logits = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)[:, 0]
                logits = logits.cpu().numpy()
                scores = scores[keep].cpu().numpy()
                stable = stability_score(logits, self.mask_threshold, self.stability_score_offset)
                good = stable >= self.stability_score_thresh
                masks = logits[good] > self.mask_threshold
                nonempty = masks.reshape(len(masks), -1).any(1)
                kept_masks.append(masks[nonempty])
                kept_scores.append(scores[good][nonempty])
        if not kept_masks or not sum(len(m) for m in kept_masks):
            return Proposals.empty(height, width)
        masks, scores = np.concatenate(kept_masks), np.concatenate(kept_scores)
        keep = box_nms(mask_boxes(masks), scores, self.box_nms_thresh)
        return Proposals.from_masks(masks[keep], np.clip(scores[keep], 0.0, 1.0))

    def describe(self) -> dict:
        return {"name": self.name, "input_size": self.input_size, "points_per_side": self.points_per_side,
                "pred_iou_thresh": self.pred_iou_thresh, "stability_score_thresh": self.stability_score_thresh,
                "box_nms_thresh": self.box_nms_thresh}
