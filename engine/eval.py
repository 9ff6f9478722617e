"""Segmentation metrics: one confusion matrix over a whole split (`evaluate`: an engine over a data set), IoU per
class, mIoU, Markdown tables."""

from __future__ import annotations

from typing import Callable, Sequence

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


def evaluate(engine, samples, class_names: Sequence[str], proposals="auto", batch_size: int = 1,
             on_result: Callable | None = None, confusion=None, progress: bool = False, desc: str = "eval"):
    """The confusion matrix of `engine` over `samples` (with `.image` and `.mask`; a list or a VOCDataset, read in
    order) against their masks: the one loop over a data set that `moduseg eval`, `moduseg report` and
    bench/defaults.py run.

    proposals: "auto" (the engine's proposer), "gt" (each mask's connected components: the oracle proposals) or a
    sequence holding each sample's Proposals (computed once for many rows). batch_size: images per segment_batch
    call. on_result(sample, label_map) is called for each, in order. confusion: a ConfusionMatrix to add to (the
    held-out folds of bench/defaults.py), else a new one."""
    from tqdm.auto import tqdm

    from .models import ground_truth_proposals

    confusion = confusion if confusion is not None else ConfusionMatrix(class_names)
    given = None if isinstance(proposals, str) else iter(proposals)
    if isinstance(proposals, str) and proposals not in ("auto", "gt"):
        raise InputError(f"proposals must be 'auto', 'gt' or one Proposals per sample, got {proposals!r}")
    total = len(samples) if hasattr(samples, "__len__") else None
    with tqdm(total=total, desc=desc, unit="img", disable=not progress) as bar:
        for batch in _batches(samples, batch_size):
            if proposals == "gt":
                batch_proposals = [ground_truth_proposals(s.mask) for s in batch]
            else:
                batch_proposals = None if given is None else [next(given) for _ in batch]
            for sample, result in zip(batch, engine.segment_batch([s.image for s in batch], batch_proposals)):
                confusion.update(result.label_map, sample.mask)
                if on_result is not None:
                    on_result(sample, result.label_map)
            bar.update(len(batch))
    return confusion


def _batches(items, size: int):
    """Lists of `size` items (the last one shorter) from any iterable, read as they are needed."""
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
