"""Naming regions by retrieval: top-K neighbours in the bank (engine.search), hierarchical vote, confidence.

The vote, per query, over its K nearest bank vectors:
  1. score per class: the number of neighbours of that class ("count", the paper's vote), that number divided by
     the class's bank size ("balanced", for small banks where background vectors outnumber every class), or the
     summed similarity of the class's neighbours ("weighted": closer neighbours count more);
  2. a tie in score goes to the class with the larger summed similarity;
  3. an exact tie in both goes to the class that appears first in rank order.
Confidence = mean similarity of the winning class's neighbours.
"""

from __future__ import annotations

import numpy as np

from .config import VOTES
from .errors import InputError


def vote(similarities: np.ndarray, neighbour_labels: np.ndarray, num_classes: int, method: str = "count",
         class_counts: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Vote over (Q, K) neighbour similarities and class ids (best first). Returns classes (Q,) int32 and
    confidences (Q,) float32. Neighbour slots with a negative class id (FAISS's "no result") are ignored."""
    similarities = np.asarray(similarities, np.float64)
    neighbour_labels = np.asarray(neighbour_labels)
    if similarities.shape != neighbour_labels.shape or similarities.ndim != 2:
        raise InputError(f"similarities {similarities.shape} and neighbour labels {neighbour_labels.shape} must be "
                         "equal (Q, K) shapes")
    queries, k = similarities.shape
    if queries == 0:
        return np.zeros(0, np.int32), np.zeros(0, np.float32)
    valid = neighbour_labels >= 0
    labels = np.where(valid, neighbour_labels, 0)
    rows = np.repeat(np.arange(queries), k)
    counts = np.zeros((queries, num_classes))
    sums = np.zeros((queries, num_classes))
    np.add.at(counts, (rows, labels.ravel()), valid.ravel())
    np.add.at(sums, (rows, labels.ravel()), np.where(valid, similarities, 0).ravel())
    first_rank = np.full((queries, num_classes), k, np.int64)
    rank = np.broadcast_to(np.arange(k), (queries, k))
    np.minimum.at(first_rank, (rows, labels.ravel()), np.where(valid, rank, k).ravel())

    if method == "count":
        score = counts
    elif method == "balanced":
        if class_counts is None:
            raise InputError("the balanced vote needs the bank's class counts")
        score = counts / np.maximum(np.asarray(class_counts, np.float64), 1)
    elif method == "weighted":
        score = sums
    else:
        raise InputError(f"unknown vote {method!r}; expected one of {VOTES}")

    present = counts > 0
    best_score = np.where(present, score, -np.inf)
    tied = present & (best_score == best_score.max(axis=1, keepdims=True))
    tied_sums = np.where(tied, sums, -np.inf)
    tied &= tied_sums == tied_sums.max(axis=1, keepdims=True)
    winner = np.argmin(np.where(tied, first_rank, k + 1), axis=1).astype(np.int32)
    winner_count = counts[np.arange(queries), winner]
    confidence = sums[np.arange(queries), winner] / np.maximum(winner_count, 1)
    return winner, confidence.astype(np.float32)


def retrieve(index, queries: np.ndarray, top_k: int, method: str = "count") -> tuple[np.ndarray, np.ndarray]:
    """Search `index` (an engine.search.SearchIndex) with all queries at once and vote: classes (Q,) int32 and
    confidences (Q,) float32."""
    similarities, rows = index.search(queries, top_k)
    return vote(similarities, index.neighbour_labels(rows), index.num_classes, method, index.class_counts)
