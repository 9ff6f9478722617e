"""Centring: a bank's vectors, and the queries searched in it, moved off the bank's mean before the cosine.

Pooled features share a large common direction (every region looks a little like every other region), so raw
cosines crowd into a narrow band and the vote's nearest neighbours are decided by what all regions share. Subtracting
the mean of the bank's vectors and normalising again, each layer's part and then the whole as SMFA does, leaves what
tells the vectors apart (the "CL2N" normalisation of nearest-neighbour few-shot classification: SimpleShot, Wang et
al. 2019). The bank stores its vectors centred and the mean beside them (FeatureBank.center, Config.center_bank); the
engine centres each query on that mean before the search, wherever the query lives (NumPy, torch or CuPy: the
transform is written in products and element-wise operations that all three share).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..arrays import contiguous, place
from ..errors import InputError
from ..ivf import row_blocks


def bank_center(vectors: np.ndarray) -> np.ndarray:
    """The mean of a bank's vectors (M, D), summed in float64 a block of rows at a time; float32 (D,)."""
    total = np.zeros(vectors.shape[1], np.float64)
    for _, block in row_blocks(vectors):
        total += block.sum(axis=0, dtype=np.float64)
    return (total / max(len(vectors), 1)).astype(np.float32)


def group_matrix(dim: int, groups: Sequence[int] = ()) -> np.ndarray:
    """(D, G) float32 indicator of which layer (feature group) each dimension belongs to; one group without groups."""
    widths = list(groups) or [dim]
    if sum(widths) != dim:
        raise InputError(f"feature groups {widths} do not sum to the vectors' width {dim}")
    matrix = np.zeros((dim, len(widths)), np.float32)
    for g, (start, width) in enumerate(zip(np.cumsum([0] + widths[:-1]), widths)):
        matrix[start:start + width, g] = 1.0
    return matrix


def centered(vectors, center: np.ndarray, groups: Sequence[int] = ()):
    """`vectors` (N, D) minus `center` (D,), each group's part then the whole row L2-normalised (a part or row that
    is exactly zero stays zero), in float32, as the same library on the same device as `vectors`."""
    where = place(vectors)
    indicator = contiguous(group_matrix(len(center), groups), np.float32, where)
    moved = vectors - contiguous(center, np.float32, where)[None, :]
    moved = moved * (_inverse_norms((moved * moved) @ indicator) @ indicator.T)
    return moved * _inverse_norms((moved * moved).sum(1)[:, None])


def _inverse_norms(squares):
    """1 / sqrt of summed squares, 1 where the sum is 0 (a zero part stays zero)."""
    return (squares + (squares == 0)) ** -0.5
