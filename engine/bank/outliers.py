"""Outlier rejection: per class, the prototypes farthest from the class mean are dropped before the bank is
searched. `drop_farthest` is shared with the distributed build (engine.distributed), so both break ties alike."""

from __future__ import annotations

import numpy as np

from ..config import Config


def reject_outliers(vectors: np.ndarray, labels: np.ndarray, config: Config,
                    subject: np.ndarray | None = None) -> np.ndarray:
    """Keep-mask: per class, drop the `ratio` fraction (rounded down) of vectors farthest (Euclidean) from the class
    mean; foreground uses `outlier_ratio`, background (class 0) `background_outlier_ratio`. Among equal distances
    the earlier vector is dropped first (`drop_farthest`). `subject`: a boolean mask of the vectors the rule applies
    to (the class prototypes); the others are kept."""
    keep = np.ones(len(vectors), bool)
    subject = np.ones(len(vectors), bool) if subject is None else subject
    for class_id in np.unique(labels[subject]):
        members = np.flatnonzero((labels == class_id) & subject)
        n_drop = outlier_count(int(class_id), len(members), config)
        if n_drop == 0:
            continue
        distance = np.linalg.norm(vectors[members] - vectors[members].mean(axis=0), axis=1)
        keep[drop_farthest(members, distance, n_drop)] = False
    return keep


def outlier_count(class_id: int, n: int, config: Config) -> int:
    """How many of a class's `n` vectors outlier rejection drops: int(n * ratio)."""
    return int(n * (config.background_outlier_ratio if class_id == 0 else config.outlier_ratio))


def drop_farthest(members: np.ndarray, distance: np.ndarray, n_drop: int) -> np.ndarray:
    """The `n_drop` members with the largest distance; a stable sort, so among equal distances the one earlier in
    `members` goes first. Shared by `reject_outliers` and the distributed build, so both break ties alike."""
    return members[np.argsort(-distance, kind="stable")[:n_drop]]
