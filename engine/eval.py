"""Segmentation metrics: one confusion matrix over a whole split, IoU per class, mIoU, Markdown tables."""

from __future__ import annotations

import numpy as np

from .constants import IGNORE
from .errors import InputError


class ConfusionMatrix:
    """Accumulates a (C, C) confusion matrix (rows = ground truth, columns = prediction); 255 is ignored."""

    def __init__(self, class_names):
        self.class_names = tuple(class_names)
        self.num_classes = len(self.class_names)
        self.matrix = np.zeros((self.num_classes, self.num_classes), np.int64)
        self.images = 0

    def update(self, prediction: np.ndarray, target: np.ndarray) -> None:
        if prediction.shape != target.shape:
            raise InputError(f"prediction shape {prediction.shape} differs from ground truth shape {target.shape}")
        valid = target != IGNORE
        truth = target[valid].astype(np.int64)
        predicted = prediction[valid].astype(np.int64)
        if truth.size and (truth.max() >= self.num_classes or predicted.max() >= self.num_classes):
            raise InputError(f"class index out of range for {self.num_classes} classes")
        self.matrix += np.bincount(truth * self.num_classes + predicted,
                                   minlength=self.num_classes ** 2).reshape(self.num_classes, self.num_classes)
        self.images += 1

    def iou(self) -> np.ndarray:
        """IoU per class; NaN for a class absent from the ground truth of everything seen (CamVid's background, say):
        such a class is left out of the mean, while pixels wrongly given to it still lower the true class's IoU."""
        true_positive = np.diag(self.matrix).astype(np.float64)
        in_truth = self.matrix.sum(1)
        union = self.matrix.sum(0) + in_truth - true_positive
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(in_truth > 0, true_positive / np.maximum(union, 1), np.nan)

    def summary(self) -> dict:
        """{"miou": percent over classes present in the ground truth, "per_class": {name: percent or None}, ...}."""
        iou = self.iou()
        defined = ~np.isnan(iou)
        return {
            "miou": float(100 * iou[defined].mean()) if defined.any() else 0.0,
            "per_class": {name: (float(100 * v) if not np.isnan(v) else None) for name, v in zip(self.class_names, iou)},
            "pixel_accuracy": float(100 * np.trace(self.matrix) / max(self.matrix.sum(), 1)),
            "images": self.images,
        }


def markdown_table(summary: dict) -> str:
    """Per-class IoU and mIoU as a Markdown table."""
    lines = ["| class | IoU |", "|---|---|"]
    for name, value in summary["per_class"].items():
        lines.append(f"| {name} | {'-' if value is None else f'{value:.1f}'} |")
    lines.append(f"| **mIoU** | **{summary['miou']:.1f}** |")
    return "\n".join(lines)


def proposals_ceiling(proposals, truth: np.ndarray, num_classes: int, min_area: int = 300) -> np.ndarray:
    """The label map of perfectly named proposals: each of at least `min_area` pixels named by its ground-truth
    majority, the purest painting first (no NMS), unpainted pixels background. The best the proposals allow the
    method's assembly: the diagnostic that splits a result's loss into proposals vs naming."""
    from .ops import mask_nms_raster

    classes, purity = proposals.majority(truth, num_classes)
    named = (classes != 0) & (proposals.areas() >= min_area)
    label_map = mask_nms_raster(proposals.atoms, proposals.members[named], classes[named], purity[named],
                                iou_threshold=1.0)[1]
    return label_map.astype(truth.dtype)


def atoms_ceiling(proposals, truth: np.ndarray, num_classes: int) -> np.ndarray:
    """The label map of perfectly named atoms (the embedded proposer's superpixels): each atom its ground-truth
    majority. The best any union of these atoms allows."""
    return proposals.atom_histogram(truth, num_classes).argmax(axis=1)[proposals.atoms].astype(truth.dtype)
