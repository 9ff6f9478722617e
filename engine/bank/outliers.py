"""Outlier rejection: per class, the prototypes farthest from the class mean are dropped before the bank is
searched. Written once over bank parts and an injected map (`reject_outliers_parts`): per part the class sums, then
per part the distances to the class means; engine.distributed runs the same steps as Ray tasks."""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from ..config import Config
from .parts import KINDS, BankPart


def reject_outliers(vectors: np.ndarray, labels: np.ndarray, config: Config,
                    subject: np.ndarray | None = None) -> np.ndarray:
    """Keep-mask: per class, drop the `ratio` fraction (rounded down) of vectors farthest (Euclidean) from the class
    mean; foreground uses `outlier_ratio`, background (class 0) `background_outlier_ratio`. Among equal distances
    the earlier vector is dropped first (`drop_farthest`). `subject`: a boolean mask of the vectors the rule applies
    to (the class prototypes); the others are kept."""
    subject = np.ones(len(labels), bool) if subject is None else np.asarray(subject, bool)
    kinds = np.where(subject, KINDS.index("class"), KINDS.index("region"))
    return reject_outliers_parts([BankPart(vectors, labels, kinds, [""] * len(labels))], config)


def outlier_count(class_id: int, n: int, config: Config) -> int:
    """How many of a class's `n` vectors outlier rejection drops: int(n * ratio)."""
    return int(n * (config.background_outlier_ratio if class_id == 0 else config.outlier_ratio))


def drop_farthest(members: np.ndarray, distance: np.ndarray, n_drop: int) -> np.ndarray:
    """The `n_drop` members with the largest distance; a stable sort, so among equal distances the one earlier in
    `members` goes first. Shared by `reject_outliers` and the distributed build, so both break ties alike."""
    return members[np.argsort(-distance, kind="stable")[:n_drop]]


def reject_outliers_parts(parts: Sequence[BankPart], config: Config, map_parts: Callable | None = None) -> np.ndarray:
    """The keep-mask of `reject_outliers` over the concatenation of `parts` (class prototypes only), as a per-class
    aggregate over parts: per part and class, the count and float64 sum of its prototypes; their sums (in part
    order) over the counts, the class means; per part, each prototype's distance to its class mean; then per class
    the `int(n * ratio)` farthest dropped, ties dropping the earlier row first (`drop_farthest`).

    map_parts(step, **state) returns step(part, **state) for every part, in part order: `local_map(parts)` (the
    default) runs the steps here, engine.distributed.reject_outliers_ray as Ray tasks. One algorithm, wherever its
    steps run: a bank built locally and one built on Ray keep the same vectors."""
    map_parts = map_parts or local_map(parts)
    offsets = np.concatenate([[0], np.cumsum([len(p) for p in parts])]).astype(np.int64)
    keep = np.ones(int(offsets[-1]), bool)
    if not len(keep):
        return keep
    sums: dict[int, np.ndarray] = {}
    counts: dict[int, int] = {}
    for per_class in map_parts(class_sums):
        for label, (count, total) in per_class.items():
            sums[label] = sums.get(label, 0.0) + total
            counts[label] = counts.get(label, 0) + count
    means = {label: sums[label] / counts[label] for label in sums}
    found = map_parts(class_distances, means=means)
    positions = np.concatenate([offset + rows for offset, (rows, _, _) in zip(offsets, found)])
    labels = np.concatenate([labels for _, labels, _ in found])
    distances = np.concatenate([distances for _, _, distances in found])
    for label in np.unique(labels):
        members = labels == label
        n_drop = outlier_count(int(label), int(members.sum()), config)
        if n_drop:
            keep[drop_farthest(positions[members], distances[members], n_drop)] = False
    return keep


def local_map(parts: Sequence[BankPart]) -> Callable:
    """The map_parts of `reject_outliers_mapped` that runs each step here, part by part."""
    return lambda step, **state: [step(part, **state) for part in parts]


def class_sums(part: BankPart) -> dict:
    """Per class, the number and float64 sum of the part's class prototypes."""
    subject = part.kinds == KINDS.index("class")
    out = {}
    for class_id in np.unique(part.labels[subject]):
        rows = subject & (part.labels == class_id)
        out[int(class_id)] = (int(rows.sum()), part.vectors[rows].astype(np.float64).sum(axis=0))
    return out


def class_distances(part: BankPart, means: dict) -> tuple:
    """(rows, classes, distances): each class prototype of the part, its class and its distance to the class mean."""
    rows = np.flatnonzero(part.kinds == KINDS.index("class"))
    labels = part.labels[rows].astype(np.int64)
    distances = [float(np.linalg.norm(part.vectors[row] - means[int(label)])) for row, label in zip(rows, labels)]
    return rows.astype(np.int64), labels, np.asarray(distances, np.float64)
