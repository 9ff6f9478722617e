"""Centring: a bank's vectors, and the queries searched in it, moved off the bank's mean before the cosine.

Pooled features share a large common direction (every region looks a little like every other region), so raw
cosines crowd into a narrow band and the vote's nearest neighbours are decided by what all regions share. Subtracting
the mean of the bank's vectors and normalising again, each layer's part and then the whole as SMFA does, leaves what
tells the vectors apart (the "CL2N" normalisation of nearest-neighbour few-shot classification: SimpleShot, Wang et
al. 2019). The bank stores its vectors centred and the mean beside them (FeatureBank.center, Config.center_bank); the
engine centres each query on that mean before the search, wherever the query lives (NumPy, torch or CuPy: the
transform is written in slices, sums and element-wise operations that all three share).
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


def group_bounds(dim: int, groups: Sequence[int] = ()) -> list[tuple[int, int]]:
    """(start, stop) of each layer's part (feature group) of a dim-wide vector; one part without groups."""
    widths = list(groups) or [dim]
    if sum(widths) != dim:
        raise InputError(f"feature groups {widths} do not sum to the vectors' width {dim}")
    ends = np.cumsum([0] + widths).tolist()
    return list(zip(ends[:-1], ends[1:]))


def centered(vectors, center: np.ndarray, groups: Sequence[int] = ()):
    """`vectors` (N, D) minus `center` (D,), each group's part then the whole row L2-normalised (a part or row that
    is exactly zero stays zero), in float32, as the same library on the same device as `vectors`."""
    where = place(vectors)
    moved = contiguous(vectors, np.float32, where) - contiguous(center, np.float32, where)[None, :]  # a new array
    for start, stop in group_bounds(len(center), groups):
        part = moved[:, start:stop]  # a view: scaled in place
        part *= _inverse_norms((part * part).sum(1)[:, None])
    return moved * _inverse_norms((moved * moved).sum(1)[:, None])


def _inverse_norms(squares):
    """1 / sqrt of summed squares, 1 where the sum is 0 (a zero part stays zero)."""
    return (squares + (squares == 0)) ** -0.5
