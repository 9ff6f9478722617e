"""Hubness: how close each bank vector sits to the rest of the bank, so that the search can discount "hubs".

In a nearest-neighbour vote some bank vectors are near to everything (background patches, generic textures, a class
with one blurry prototype) and turn up among the neighbours of queries of every class. A vector's hubness is the mean
similarity to its `neighbours` nearest other bank vectors, in the bank's search space; the search ranks a bank vector
for a query by its similarity minus Config.hub_penalty x its hubness, the bank side of cross-domain similarity local
scaling (CSLS: Conneau, Lample et al., "Word translation without parallel data", 2018). The query side of CSLS
shifts all of one query's similarities alike, so it changes none of the votes and is left out.

The hubness is computed once, when the bank is made (an exact search of the bank against itself: quadratic in its
size), and saved with it; the penalty is an inference knob.
"""

from __future__ import annotations

import numpy as np

from ..topk import topk_inner_product

#: bank rows searched against the whole bank at a time: the (rows, bank) score block stays near 128 MB at 30k vectors
QUERY_ROWS = 1024
#: banks above this many vectors get no hubness (a warning says so): the exact self-search grows with the square of
#: the bank (25 s for 28,687 vectors on 2 cores, so about 8 minutes at this limit)
MAX_ROWS = 1 << 17


def hubness(vectors: np.ndarray, neighbours: int) -> np.ndarray:
    """(M,) float32: each row's mean inner product with its `neighbours` nearest other rows of `vectors` (M, D),
    fewer where the bank holds fewer; 0 for a bank of one vector. A row's own entry is its best match (or tied with
    an identical row's), so the best one of k + 1 is left out."""
    count = len(vectors)
    k = min(int(neighbours), count - 1)
    if k <= 0:
        return np.zeros(count, np.float32)
    out = np.empty(count, np.float32)
    for start in range(0, count, QUERY_ROWS):
        block = np.ascontiguousarray(vectors[start:start + QUERY_ROWS], np.float32)
        similarities, _ = topk_inner_product(block, vectors, k + 1)
        out[start:start + len(block)] = similarities[:, 1:].mean(axis=1, dtype=np.float64)
    return out
