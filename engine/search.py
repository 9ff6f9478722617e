"""Top-K inner-product search over a bank's vectors, behind one face whatever runs it.

`SearchIndex.search(queries, k)` takes and returns NumPy arrays — (Q, D) float32 queries in, (Q, k') float32
similarities and int64 bank rows out, best first, k' = min(k, bank size) — and `neighbour_labels(rows)` maps rows to
class ids. Which device searches is a property of the index (as in faiss's torch layer), not a branch in the caller:

- `FlatIndex`: exact search on the CPU: one BLAS matrix product per batch of queries and a partial selection (for
  `Config.index == "Flat"`, the default: on a 2-core CPU it is 3 to 6 times faster than FAISS's flat index on the
  engine's 680-d banks, docs/decisions.md);
- `FaissIndex`: FAISS on the CPU for the approximate index factory strings (`Config.index`: "IVF4096,Flat" ...) that
  large banks need;
- `TorchIndex`: the bank resident on a torch device (a GPU), exact top-K by matrix product (faiss-gpu when the
  installed faiss has it);
- `ExactIndex`: a brute-force NumPy scan sorting every score, the plain reference the others are tested against.

Exact ties: the NumPy and torch scans keep the lowest bank rows first, so their results depend neither on chunking
nor on threading; FAISS's flat heaps order exactly tied similarities by insertion, otherwise the results agree.
"""

from __future__ import annotations

import abc

import numpy as np

from .config import Config
from .deps import check_torch_device, require
from .errors import InputError

BACKENDS = ("faiss", "torch", "exact")  # "faiss": FlatIndex for "Flat", FAISS for any other factory string
#: below this many multiply-adds (queries x bank x dim) a FAISS search runs on one thread unless told otherwise
SMALL_SEARCH = 1 << 27


class SearchIndex(abc.ABC):
    """Search over a bank's L2-normalised vectors (M, D) with class ids (M,) and `num_classes` classes."""

    backend: str

    def __init__(self, vectors: np.ndarray, labels: np.ndarray, num_classes: int) -> None:
        self.dim = int(vectors.shape[1])
        self.size = int(vectors.shape[0])
        self.labels = np.asarray(labels, np.int64)
        self.num_classes = int(num_classes)
        self.class_counts = np.bincount(self.labels, minlength=self.num_classes)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k inner products: (Q, k') float32 similarities and int64 rows, k' = min(k, bank size), best first."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise InputError(f"queries: expected shape (Q, {self.dim}), got {queries.shape}")
        k = min(int(k), self.size)
        if len(queries) == 0 or k <= 0:
            return np.zeros((len(queries), max(k, 0)), np.float32), np.zeros((len(queries), max(k, 0)), np.int64)
        similarities, rows = self._search(queries, k)
        return np.asarray(similarities, np.float32), np.asarray(rows, np.int64)

    @abc.abstractmethod
    def _search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The backend's search on checked, non-empty input."""

    def neighbour_labels(self, rows: np.ndarray) -> np.ndarray:
        """Class ids of search result rows; -1 where the search returned no row (FAISS's -1)."""
        return np.where(rows >= 0, self.labels[np.clip(rows, 0, None)], -1)

    def describe(self) -> str:
        return self.backend


class FaissIndex(SearchIndex):
    """A FAISS index on the CPU. `index`: a built one (a loaded bank's); else made from `config.index`.

    num_threads: OpenMP threads for each search (0 = FAISS's default); FAISS's thread count is per calling thread,
    so other threads are unaffected.
    """

    def __init__(self, vectors, labels, num_classes: int, config: Config, index=None, num_threads: int = 0) -> None:
        super().__init__(vectors, labels, num_classes)
        self.index = index if index is not None else make_faiss_index(vectors, config)
        self.num_threads = int(num_threads)
        self.backend = f"faiss-cpu {config.index}"

    def _search(self, queries, k):
        faiss = require("faiss", "the FAISS search")

        # a small search runs on one thread: an OpenMP team's fork and join would cost more than the scan
        threads = self.num_threads or (1 if queries.size * self.size < SMALL_SEARCH else 0)
        if not threads:
            return self.index.search(queries, k)
        before = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(threads)
        try:
            return self.index.search(queries, k)
        finally:
            faiss.omp_set_num_threads(before)


class ExactIndex(SearchIndex):
    """Brute-force NumPy inner products: the reference search."""

    backend = "numpy-exact"

    def __init__(self, vectors, labels, num_classes: int) -> None:
        super().__init__(vectors, labels, num_classes)
        self.vectors = np.ascontiguousarray(vectors, np.float32)

    def _search(self, queries, k):
        scores = queries @ self.vectors.T
        columns = np.broadcast_to(np.arange(scores.shape[1]), scores.shape)
        rows = np.lexsort((columns, -scores), axis=1)[:, :k]  # equal scores: lowest row first
        return np.take_along_axis(scores, rows, axis=1), rows


class FlatIndex(ExactIndex):
    """Exact inner-product search by one BLAS product per query batch, then the top k of each row by a partial
    selection: the same rows and order as ExactIndex (equal scores: lowest row first), without sorting every score.
    `chunk_rows` bank rows are scored at a time, so the (Q, chunk) score block stays small for big banks."""

    backend = "numpy-flat (BLAS)"

    def __init__(self, vectors, labels, num_classes: int, chunk_rows: int = 1 << 16) -> None:
        super().__init__(vectors, labels, num_classes)
        if chunk_rows < 1:
            raise InputError(f"chunk_rows must be >= 1, got {chunk_rows}")
        self.chunk_rows = int(chunk_rows)

    def _search(self, queries, k):
        best_scores = best_rows = None
        for start in range(0, self.size, self.chunk_rows):
            scores = queries @ self.vectors[start:start + self.chunk_rows].T
            block_scores, block_rows = _top_k(scores, min(k, scores.shape[1]))
            block_rows += start
            if best_scores is not None:
                merged = np.concatenate([best_scores, block_scores], 1), np.concatenate([best_rows, block_rows], 1)
                best_scores, best_rows = _top_k_of(*merged, min(k, merged[0].shape[1]))
            else:
                best_scores, best_rows = block_scores, block_rows
        return best_scores, best_rows


def _top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best columns of each row of a score block, best first, equal scores lowest column first: everything
    above each row's k-th value, plus the lowest columns equal to it."""
    kth = -np.partition(-scores, k - 1, axis=1)[:, k - 1:k]
    rows, columns = np.nonzero(scores >= kth)
    return _top_k_of(scores[rows, columns], columns, k, rows, len(scores))


def _top_k_of(values: np.ndarray, columns: np.ndarray, k: int, rows: np.ndarray | None = None,
              count: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The k best (value desc, column asc) of each row's candidates, given as (Q, n) arrays or as flat
    (value, column, row) triples for `count` rows with at least k candidates each."""
    if rows is None:
        count, width = values.shape
        rows = np.repeat(np.arange(count), width)
        values, columns = values.ravel(), columns.ravel()
    order = np.lexsort((columns, -values, rows))
    starts = np.searchsorted(rows[order], np.arange(count))
    take = order[starts[:, None] + np.arange(k)]
    return values[take].astype(np.float32), columns[take].astype(np.int64)


class TorchIndex(SearchIndex):
    """The bank resident on a torch device: exact top-K by chunked matrix products (`chunk_rows` bank rows at a time,
    so the (Q, chunk) score block stays small for big banks), or faiss-gpu's flat index when the installed faiss has
    GPU support. Queries go up and results come back as NumPy arrays; `search_tensors` keeps them on the device."""

    def __init__(self, vectors, labels, num_classes: int, device: str = "cuda", chunk_rows: int = 1 << 18) -> None:
        import torch

        super().__init__(vectors, labels, num_classes)
        check_torch_device(device)  # no GPU, or no kernel image for it: ModelError naming both
        if chunk_rows < 1:
            raise InputError(f"chunk_rows must be >= 1, got {chunk_rows}")
        self.device = torch.device(device)
        self.chunk_rows = int(chunk_rows)
        self.vectors = torch.from_numpy(np.ascontiguousarray(vectors, np.float32)).to(self.device)
        self.faiss_index = _faiss_gpu_index(vectors, self.device)
        self.backend = f"{'faiss-gpu' if self.faiss_index is not None else 'torch-topk'} on {self.device}"

    def _search(self, queries, k):
        import torch

        similarities, rows = self.search_tensors(torch.from_numpy(queries).to(self.device), k)
        return similarities.cpu().numpy(), rows.cpu().numpy()

    def search_tensors(self, queries, k: int):
        """(Q, k) similarities and int64 rows as tensors on the index's device (k <= bank size, Q >= 1)."""
        import torch

        if self.faiss_index is not None:
            similarities, rows = self.faiss_index.search(queries.contiguous(), k)  # faiss.contrib.torch_utils
            return similarities, rows.to(torch.int64)
        return topk_inner_product(queries.to(torch.float32), self.vectors, k, self.chunk_rows)


def create_index(bank, config: Config, backend: str = "faiss", device: str = "cuda",
                 num_threads: int = 0) -> SearchIndex:
    """The search index over `bank` for a backend of BACKENDS ("torch" on `device`)."""
    if backend == "faiss" and config.index == "Flat":
        return FlatIndex(bank.vectors, bank.labels, len(bank.class_names))
    if backend == "faiss":
        # the bank's own index serves when it was made with the same index knobs; other knobs get their own index
        same = (config.index, config.nprobe) == (bank.config.index, bank.config.nprobe)
        return FaissIndex(bank.vectors, bank.labels, len(bank.class_names), config, bank.index if same else None,
                          num_threads)
    if backend == "torch":
        return TorchIndex(bank.vectors, bank.labels, len(bank.class_names), device)
    if backend == "exact":
        return ExactIndex(bank.vectors, bank.labels, len(bank.class_names))
    raise InputError(f"unknown search backend {backend!r}; known backends: {BACKENDS}")


def make_faiss_index(vectors: np.ndarray, config: Config):
    """A FAISS inner-product index from the factory string `config.index` ("Flat" exact; "IVFn,Flat" trained here on
    at most `config.index_train_size` vectors, a fixed random sample)."""
    faiss = require("faiss", "the FAISS index")

    vectors = np.ascontiguousarray(vectors, np.float32)
    try:
        index = faiss.index_factory(vectors.shape[1], config.index, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as error:
        raise InputError(f"Config.index {config.index!r} is not a FAISS index factory string: {error}") from error
    if not index.is_trained:
        sample = vectors
        if len(vectors) > config.index_train_size:
            rows = np.random.default_rng(0).choice(len(vectors), config.index_train_size, replace=False)
            sample = vectors[np.sort(rows)]
        index.train(sample)
    if hasattr(index, "nprobe"):
        index.nprobe = config.nprobe
    index.add(vectors)
    return index


# ----------------------------------------------------------------------------------------------- torch exact top-K


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
    """Exact top-k of `queries` (Q, D) @ `vectors` (M, D).T with torch tensors on any device, `chunk_rows` bank rows
    at a time. k <= M. Returns (Q, k) float32 similarities and int64 rows on the tensors' device, best first."""
    import torch

    best_values = best_rows = None
    for start in range(0, int(vectors.shape[0]), chunk_rows):
        block = queries @ vectors[start:start + chunk_rows].T
        values, rows = _block_topk(torch, block, min(k, block.shape[1]))
        rows = rows + start
        if best_values is not None:
            values, rows = _best(torch, torch.cat([best_values, values], 1), torch.cat([best_rows, rows], 1), k)
        best_values, best_rows = values, rows
    return best_values, best_rows


def _faiss_gpu_index(vectors: np.ndarray, device):
    """A faiss-gpu flat inner-product index on `device`, or None (not a CUDA device, or faiss without GPU support:
    faiss-cpu, the usual install)."""
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
    options = faiss.GpuIndexFlatConfig()
    options.device = device.index if device.index is not None else 0
    index = faiss.GpuIndexFlatIP(resources, int(vectors.shape[1]), options)
    index.add(np.ascontiguousarray(vectors, np.float32))
    index._moduseg_resources = resources  # keep the resources alive as long as the index
    return index
