"""Exact top-k selection, with the one tie rule every exact search of the engine keeps: highest score first, equal
scores lowest id (bank row) first. A result then depends neither on how the bank is cut into chunks nor on
threading, and every exact path returns the same rows in the same order.

- `top_k`: NumPy, for the merge of FlatIndex's blocks and for the re-rank of an approximate index's shortlist (each
  block's own selection is the compiled engine.ops.top_k, one pass a row, when engine._C is built);
- `top_k_torch`: the same rule for torch tensors on any device (TorchIndex);
- `topk_inner_product`: the exact top-k of queries against a bank, a chunk of bank rows at a time, with either;
- `top_k_reference`: the plain full sort the others are tested against (ExactIndex searches with it).

FAISS's own searches (faiss-gpu's flat index behind TorchIndex, FaissIndex) are not routed through here: they order
exactly tied similarities as FAISS's heaps do, otherwise their results agree.
"""

from __future__ import annotations

import numpy as np


def top_k_reference(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best columns of each row of `scores` (Q, n) by sorting the whole row: (Q, k) scores and int64 columns,
    best first, equal scores lowest column first."""
    columns = np.broadcast_to(np.arange(scores.shape[1]), scores.shape)
    order = np.lexsort((columns, -scores), axis=1)[:, :k]
    return np.take_along_axis(scores, order, axis=1), order.astype(np.int64)


def top_k(scores: np.ndarray, k: int, ids: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The k best entries of each row of `scores` (Q, n): (Q, min(k, n)) float32 scores and int64 ids, best first,
    equal scores lowest id first. ids: each entry's id (Q, n); None: its column.

    Only the entries not below each row's k-th value can be among the best (a partial selection finds it), so only
    those are sorted; NaN scores go last, as in `top_k_reference`."""
    count, width = scores.shape
    k = min(int(k), width)
    if k <= 0:
        return np.zeros((count, 0), np.float32), np.zeros((count, 0), np.int64)
    ids = np.broadcast_to(np.arange(width), scores.shape) if ids is None else ids
    kth = -np.partition(-scores, k - 1, axis=1)[:, k - 1:k]
    rows, columns = np.nonzero(~(scores < kth))  # at least k a row, also where the k-th value is NaN
    values, candidates = scores[rows, columns], ids[rows, columns]
    order = np.lexsort((candidates, -values, rows))
    starts = np.searchsorted(rows[order], np.arange(count))
    take = order[starts[:, None] + np.arange(k)]
    return values[take].astype(np.float32), candidates[take].astype(np.int64)


def top_k_torch(scores, k: int, ids=None):
    """`top_k` for torch tensors on any device: (Q, min(k, n)) scores and int64 ids, best first, equal scores lowest
    id first. torch.topk picks among equal values arbitrarily, so the candidates are everything above each row's
    k-th value plus the k lowest ids equal to it, then sorted by the rule."""
    import torch

    k = min(int(k), scores.shape[1])
    if ids is None:
        ids = torch.arange(scores.shape[1], device=scores.device).expand(scores.shape)
    if k <= 0:
        return scores[:, :0], ids[:, :0]
    top = torch.topk(scores, k, dim=1, sorted=False)
    threshold = top.values.min(dim=1, keepdim=True).values
    sentinel = torch.iinfo(torch.int64).max  # above every real id (a constant: no synchronisation with the device)
    tied = -torch.topk(-torch.where(scores == threshold, ids, sentinel), k, dim=1).values
    above = top.values > threshold
    values = torch.cat([torch.where(above, top.values, -torch.inf),
                        torch.where(tied < sentinel, threshold, -torch.inf)], 1)
    candidates = torch.cat([torch.where(above, torch.gather(ids, 1, top.indices), sentinel), tied], 1)
    by_id = torch.sort(candidates, dim=1, stable=True)  # then a stable sort by score keeps equal scores by id
    values = torch.gather(values, 1, by_id.indices)
    order = torch.sort(-values, dim=1, stable=True).indices[:, :k]
    return torch.gather(values, 1, order), torch.gather(by_id.values, 1, order)


def topk_inner_product(queries, vectors, k: int, chunk_rows: int = 1 << 18, offsets=None):
    """Exact top-k of `queries` (Q, D) @ `vectors` (M, D).T, `chunk_rows` bank rows at a time (the (Q, chunk)
    score block stays small for big banks), each chunk's best merged with the best so far. NumPy arrays (one BLAS
    product a chunk; `vectors` may be memory-mapped) or torch tensors on any device; returns (Q, min(k, M))
    float32 scores and int64 rows of the same kind, best first, equal scores lowest row first. offsets: (M,) added
    to every query's score of each row (engine.bank.hubness), of the same kind, or None."""
    if isinstance(queries, np.ndarray):
        select, concatenate, first = top_k, np.concatenate, _top_k_host
    else:
        import torch

        select, concatenate, first = top_k_torch, torch.cat, _top_k_offset
    best = select(queries @ vectors[:0].T, 0)  # the answer for an empty bank
    for start in range(0, int(vectors.shape[0]), chunk_rows):
        values, rows = first(queries @ vectors[start:start + chunk_rows].T, k,
                             None if offsets is None else offsets[start:start + chunk_rows], select)
        if start:
            values, rows = select(concatenate([best[0], values], 1), k, concatenate([best[1], rows + start], 1))
        best = values, rows
    return best


def _top_k_offset(scores, k: int, offsets, select):
    """`select` (top_k or top_k_torch) of `scores` plus `offsets` (one per column) when given."""
    return select(scores if offsets is None else scores + offsets[None, :], k)


def _top_k_host(scores: np.ndarray, k: int, offsets, select):
    """top_k of host scores plus offsets: the compiled selection (engine.ops.top_k, one pass a row, the offsets
    added on the way) when engine._C is built, else NumPy's partial selection."""
    from . import ops

    if ops._C is None:
        return _top_k_offset(scores, k, offsets, select)
    return ops.top_k(scores, k, offsets)
