"""Class-agnostic proposers that need no network. `ground_truth_proposals` gives the oracle rows of the paper's
Table 6: connected components of each ground-truth class mask, objectness 1."""

from __future__ import annotations

import cv2
import numpy as np

from ..errors import InputError
from .base import Proposals

IGNORE = 255


def ground_truth_proposals(label_map: np.ndarray, include_background: bool = False) -> Proposals:
    """One proposal per 8-connected component of each class in an HxW class-index map (255 ignored; class 0
    skipped unless `include_background`)."""
    label_map = np.asarray(label_map)
    if label_map.ndim != 2:
        raise InputError(f"ground-truth label map: expected shape (H, W), got {label_map.shape}")
    masks = []
    for class_id in np.unique(label_map):
        if class_id == IGNORE or (class_id == 0 and not include_background):
            continue
        count, components = cv2.connectedComponents((label_map == class_id).astype(np.uint8), connectivity=8)
        masks.extend(components == c for c in range(1, count))
    if not masks:
        return Proposals.empty(*label_map.shape)
    return Proposals(np.stack(masks), np.ones(len(masks), np.float32))
