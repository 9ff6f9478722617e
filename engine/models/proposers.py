"""Class-agnostic proposers that need no network. `ground_truth_proposals` gives the oracle rows of the paper's
Table 6: connected components of each ground-truth class mask, objectness 1."""

from __future__ import annotations

import cv2
import numpy as np

from ..constants import IGNORE
from ..errors import InputError
from ..regions import Proposals


def ground_truth_proposals(label_map: np.ndarray, include_background: bool = False) -> Proposals:
    """One proposal per 8-connected component of each class in an HxW class-index map (void ignored; class 0
    skipped unless `include_background`). The components are the atoms, so no mask is ever materialised."""
    label_map = np.asarray(label_map)
    if label_map.ndim != 2:
        raise InputError(f"ground-truth label map: expected shape (H, W), got {label_map.shape}")
    components = np.zeros(label_map.shape, np.int32)  # atom 0: void and skipped classes
    proposed = 0
    for class_id in np.unique(label_map):
        if class_id == IGNORE:
            continue
        count, labels = cv2.connectedComponents((label_map == class_id).astype(np.uint8), connectivity=8)
        inside = labels > 0
        components[inside] = labels[inside] + proposed
        proposed += count - 1
    # atoms 1..proposed are the components, in class order; drop the background's unless asked for
    members = np.eye(proposed, proposed + 1, 1, dtype=bool)
    if not include_background and (label_map == 0).any():
        background = np.unique(components[label_map == 0])
        members = np.delete(members, background - 1, axis=0)
    return Proposals(components, members, np.ones(len(members), np.float32))
