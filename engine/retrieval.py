"""Naming proposals by retrieval: top-K neighbours in the bank, hierarchical vote, confidence.

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


def retrieve(bank, queries: np.ndarray, top_k: int, method: str = "count") -> tuple[np.ndarray, np.ndarray]:
    """Search the bank with all queries at once and vote: classes (Q,) and confidences (Q,)."""
    similarities, rows = bank.search(queries, top_k)
    return vote(similarities, bank.neighbour_labels(rows), len(bank.class_names), method, bank.class_counts())


# --------------------------------------------------------------------------------------------------------------------
# Exact search without FAISS: NumPy (the reference path) and torch (the GPU path; any torch device)
#
# Exact ties are resolved by bank order: among equal similarities the lowest bank rows are kept and listed first, so
# the result depends neither on chunking nor on threading. (FAISS's flat indexes resolve exact ties through their heaps,
# in an order that depends on insertion; apart from exactly tied similarities the results are the same.)


def exact_search_numpy(queries: np.ndarray, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force top-k inner products in NumPy: (Q, k') similarities float32 and rows int64, k' = min(k, M)."""
    queries = np.asarray(queries, np.float32)
    vectors = np.asarray(vectors, np.float32)
    k = min(int(k), len(vectors))
    if len(queries) == 0 or k == 0:
        return np.zeros((len(queries), k), np.float32), np.zeros((len(queries), k), np.int64)
    scores = queries @ vectors.T
    columns = np.broadcast_to(np.arange(scores.shape[1]), scores.shape)
    rows = np.lexsort((columns, -scores), axis=1)[:, :k]
    return np.take_along_axis(scores, rows, axis=1), rows.astype(np.int64)


def _best(torch, values, rows, k: int):
    """Best k of (Q, n) candidates, similarity descending, equal similarities lowest row first."""
    by_row = torch.sort(rows, dim=1, stable=True)
    values = torch.gather(values, 1, by_row.indices)
    order = torch.sort(-values, dim=1, stable=True).indices[:, :k]
    return torch.gather(values, 1, order), torch.gather(by_row.values, 1, order)


def _block_topk(torch, block, k: int):
    """Top k of each row of a (Q, n) score block with the tie rule above (torch.topk picks among ties arbitrarily):
    everything above the k-th value, plus the k lowest columns equal to it."""
    top = torch.topk(block, k, dim=1, sorted=False)
    threshold = top.values.min(dim=1, keepdim=True).values
    columns = torch.arange(block.shape[1], device=block.device)
    sentinel = block.shape[1]
    tied = -torch.topk(-torch.where(block == threshold, columns, sentinel), k, dim=1).values
    above = top.values > threshold
    values = torch.cat([torch.where(above, top.values, -torch.inf),
                        torch.where(tied < sentinel, threshold, -torch.inf)], 1)
    rows = torch.cat([torch.where(above, top.indices, sentinel), tied], 1)
    return _best(torch, values, rows, k)


def topk_inner_product(queries, vectors, k: int, chunk_rows: int = 1 << 18):
    """Exact top-k inner products with torch tensors (CPU or CUDA): `queries` (Q, D) @ `vectors` (M, D).T, computed
    `chunk_rows` bank rows at a time so that the (Q, chunk) score block stays small for big banks.
    Returns (Q, k') float32 similarities and int64 rows, k' = min(k, M), on the tensors' device, best first."""
    import torch

    if queries.ndim != 2 or vectors.ndim != 2 or queries.shape[1] != vectors.shape[1]:
        raise InputError(f"queries {tuple(queries.shape)} and bank vectors {tuple(vectors.shape)}: expected "
                         "(Q, D) and (M, D)")
    if chunk_rows < 1:
        raise InputError(f"chunk_rows must be >= 1, got {chunk_rows}")
    total = int(vectors.shape[0])
    k = min(int(k), total)
    if queries.shape[0] == 0 or k == 0:
        return (torch.zeros((queries.shape[0], k), dtype=torch.float32, device=queries.device),
                torch.zeros((queries.shape[0], k), dtype=torch.int64, device=queries.device))
    queries = queries.to(torch.float32)
    best_values = best_rows = None
    for start in range(0, total, chunk_rows):
        block = queries @ vectors[start:start + chunk_rows].T
        values, rows = _block_topk(torch, block, min(k, block.shape[1]))
        rows = rows + start
        if best_values is not None:
            values, rows = _best(torch, torch.cat([best_values, values], 1), torch.cat([best_rows, rows], 1), k)
        best_values, best_rows = values, rows
    return best_values, best_rows


def vote_torch(similarities, neighbour_labels, num_classes: int, method: str = "count", class_counts=None):
    """`vote` on torch tensors (any device; the GPU path's vote, so no host round trip): the same rules and float64
    accumulation. Returns classes (Q,) int64 and confidences (Q,) float32 on the inputs' device."""
    import torch

    if tuple(similarities.shape) != tuple(neighbour_labels.shape) or similarities.ndim != 2:
        raise InputError(f"similarities {tuple(similarities.shape)} and neighbour labels "
                         f"{tuple(neighbour_labels.shape)} must be equal (Q, K) shapes")
    device = similarities.device
    queries, k = similarities.shape
    if queries == 0:
        return torch.zeros(0, dtype=torch.int64, device=device), torch.zeros(0, dtype=torch.float32, device=device)
    if method not in VOTES:
        raise InputError(f"unknown vote {method!r}; expected one of {VOTES}")
    if method == "balanced" and class_counts is None:
        raise InputError("the balanced vote needs the bank's class counts")
    valid = neighbour_labels >= 0
    labels = torch.where(valid, neighbour_labels, torch.zeros_like(neighbour_labels)).to(torch.int64)
    counts = torch.zeros((queries, num_classes), dtype=torch.float64, device=device)
    counts.scatter_add_(1, labels, valid.to(torch.float64))
    sums = torch.zeros((queries, num_classes), dtype=torch.float64, device=device)
    sums.scatter_add_(1, labels, torch.where(valid, similarities.to(torch.float64), 0.0))
    rank = torch.arange(k, device=device).expand(queries, k)
    first_rank = torch.full((queries, num_classes), k, dtype=torch.int64, device=device)
    first_rank.scatter_reduce_(1, labels, torch.where(valid, rank, k), reduce="amin")
    if method == "count":
        score = counts
    elif method == "weighted":
        score = sums
    else:
        bank_counts = torch.as_tensor(class_counts, dtype=torch.float64, device=device).clamp(min=1)
        score = counts / bank_counts
    present = counts > 0
    best_score = torch.where(present, score, -torch.inf)
    tied = present & (best_score == best_score.max(dim=1, keepdim=True).values)
    tied_sums = torch.where(tied, sums, -torch.inf)
    tied &= tied_sums == tied_sums.max(dim=1, keepdim=True).values
    winner = torch.argmin(torch.where(tied, first_rank, k + 1), dim=1)
    winner_count = counts.gather(1, winner[:, None])[:, 0]
    confidence = sums.gather(1, winner[:, None])[:, 0] / winner_count.clamp(min=1)
    return winner, confidence.to(torch.float32)


class DeviceIndex:
    """The bank resident on a torch device for the GPU path: exact inner-product top-K (faiss-gpu when the installed
    faiss has GPU support and the device is CUDA, else `topk_inner_product` chunked over `chunk_rows` bank rows) and
    the vote, all on the device.

    The exact search ignores `Config.index`: on a GPU a brute-force scan of a million 208-d vectors costs about a
    millisecond per batch, and it never loses recall.
    """

    def __init__(self, bank, device, chunk_rows: int = 1 << 18) -> None:
        import torch

        self.device = torch.device(device)
        self.chunk_rows = int(chunk_rows)
        self.num_classes = len(bank.class_names)
        self.vectors = torch.from_numpy(bank.vectors).to(self.device)
        self.labels = torch.from_numpy(bank.labels.astype(np.int64)).to(self.device)
        self.class_counts = torch.from_numpy(bank.class_counts().astype(np.float64)).to(self.device)
        self.faiss_index = _faiss_gpu_index(bank, self.device)
        self.backend = "faiss-gpu" if self.faiss_index is not None else "torch-topk"

    def search(self, queries, k: int):
        """(Q, k') similarities and int64 rows on the device, best first."""
        if self.faiss_index is not None and queries.shape[0] and min(k, len(self.vectors)):
            k = min(int(k), len(self.vectors))
            import torch

            similarities, rows = self.faiss_index.search(queries.contiguous(), k)  # faiss.contrib.torch_utils
            return similarities, rows.to(torch.int64)
        return topk_inner_product(queries, self.vectors, k, self.chunk_rows)

    def neighbour_labels(self, rows):
        """Class ids of search result rows; -1 where the search returned no row."""
        import torch

        return torch.where(rows >= 0, self.labels[rows.clamp(min=0)], -1)

    def retrieve(self, queries, top_k: int, method: str = "count"):
        """Classes (Q,) int64 and confidences (Q,) float32 tensors for (Q, D) query tensors on the device."""
        similarities, rows = self.search(queries, top_k)
        return vote_torch(similarities, self.neighbour_labels(rows), self.num_classes, method, self.class_counts)


def _faiss_gpu_index(bank, device):
    """A faiss-gpu flat inner-product index over the bank on `device`, or None (no CUDA device, or faiss without GPU
    support — faiss-cpu, the usual install)."""
    if device.type != "cuda":
        return None
    try:
        import faiss
    except ImportError:
        return None
    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() < 1:
        return None
    import faiss.contrib.torch_utils  # noqa: F401  (lets faiss indexes take torch tensors, CUDA ones included)

    resources = faiss.StandardGpuResources()
    config = faiss.GpuIndexFlatConfig()
    config.device = device.index if device.index is not None else 0
    index = faiss.GpuIndexFlatIP(resources, bank.dim, config)
    index.add(bank.vectors)
    index._moduseg_resources = resources  # keep the resources alive as long as the index
    return index
