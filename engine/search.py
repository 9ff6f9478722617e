"""Top-K inner-product search over a bank's vectors, behind one face whatever runs it.

`SearchIndex.search(queries, k)` takes and returns NumPy arrays — (Q, D) float32 queries in, (Q, k') float32
similarities and int64 bank rows out, best first, k' = min(k, bank size) — and `neighbour_labels(rows)` maps rows to
class ids. Which device searches is a property of the index (as in faiss's torch layer), not a branch in the caller:

- `FlatIndex`: exact search on the CPU: one BLAS matrix product per batch of queries and a partial selection (for
  `Config.index == "Flat"`, the default: on a 2-core CPU it is 3 to 6 times faster than FAISS's flat index on the
  engine's 680-d banks, docs/decisions.md);
- `FaissIndex`: FAISS on the CPU for the approximate index factory strings (`Config.index`: "IVF4096,Flat",
  "IVF16384,PQ64" ...) that large banks need, `Config.nprobe` passed with every search (so indexes are shared, never
  re-tuned in place); `open_ondisk_index` makes one over an on-disk IVF index. An index whose scores come from
  compressed codes (IVF-PQ, scalar quantizers) returns a shortlist of `Config.refine` x k candidates, rescored
  exactly from the bank's (memory-mapped) vectors and cut to k (`rerank`);
- `TorchIndex`: the bank resident on a torch device (a GPU), exact top-K by matrix product (faiss-gpu when the
  installed faiss has it);
- `ExactIndex`: a brute-force NumPy scan sorting every score, the plain reference the others are tested against.

The FAISS indexes themselves, in memory or with their inverted lists on disk for banks larger than memory, are built
by engine.ivf.

Exact ties: FlatIndex, TorchIndex's own scan and the re-rank select with engine.topk (equal similarities: lowest bank
row first), so their results depend neither on chunking nor on threading, and equal ExactIndex's; FAISS's own
searches (FaissIndex's, faiss-gpu's flat index behind TorchIndex) order exactly tied similarities as FAISS's heaps
do, otherwise the results agree.
"""

from __future__ import annotations

import abc
import warnings

import numpy as np

from .arrays import Place, contiguous, host, place, shape_of
from .config import Config
from .deps import check_torch_device, require
from .errors import InputError
from .ivf import make_faiss_index, ondisk_data_file, read_ondisk_index, row_blocks
from .topk import top_k, top_k_reference, topk_inner_product

BACKENDS = ("faiss", "torch", "exact")  # "faiss": FlatIndex for "Flat", FAISS for any other factory string
#: below this many multiply-adds (queries x bank x dim) a FAISS search runs on one thread unless told otherwise
SMALL_SEARCH = 1 << 27
#: candidates (query x shortlist entries) rescored at a time by the re-rank: 16 Ki of 680-d = 45 MB gathered
RERANK_ROWS = 1 << 14


class SearchIndex(abc.ABC):
    """Search over a bank's L2-normalised vectors (M, D) with class ids (M,) and `num_classes` classes.

    offsets: (M,) added to every query's similarity with each vector before the top k (the hubness penalty,
    engine.bank.hubness: `FeatureBank.search_offsets`), or None; the similarities returned include them."""

    backend: str

    def __init__(self, vectors: np.ndarray, labels: np.ndarray, num_classes: int, offsets=None) -> None:
        # `vectors` may also be just their (rows, dim) shape, for an index that keeps no vectors (IVF-PQ)
        self.size, self.dim = (int(n) for n in (vectors.shape if hasattr(vectors, "shape") else vectors))
        self.offsets = None if offsets is None else np.ascontiguousarray(offsets, np.float32).reshape(-1)
        if self.offsets is not None and len(self.offsets) != self.size:
            raise InputError(f"{len(self.offsets)} search offsets for {self.size} bank vectors")
        self.labels = np.asarray(labels, np.int64)
        self.num_classes = int(num_classes)
        self.class_counts = np.bincount(self.labels, minlength=self.num_classes)
        self._device_labels: dict = {}  # Place -> the labels on that device

    def search(self, queries, k: int) -> tuple:
        """Top-k inner products: (Q, k') float32 similarities and int64 rows, k' = min(k, bank size), best first.
        Queries on a CUDA device (torch / CuPy) give results on that device: searched there by an index resident on
        it, else searched on the host and moved back (`_search_device`)."""
        where = place(queries)
        if where.is_cuda:
            if len(shape_of(queries)) != 2 or shape_of(queries)[1] != self.dim:
                raise InputError(f"queries: expected shape (Q, {self.dim}), got {shape_of(queries)}")
            return self._search_device(queries, min(int(k), self.size), where)
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

    def _search_device(self, queries, k: int, where: Place) -> tuple:
        """Device queries, an index on the host: down, searched, results up (small arrays: Q x (D + 2k))."""
        similarities, rows = self.search(host(queries), k)
        return contiguous(similarities, np.float32, where), contiguous(rows, np.int64, where)

    def neighbour_labels(self, rows):
        """Class ids of search result rows; -1 where the search returned no row (FAISS's -1). Rows on a CUDA device
        give labels on that device (the labels are copied there once)."""
        where = place(rows)
        if not where.is_cuda:
            return np.where(rows >= 0, self.labels[np.clip(rows, 0, None)], -1)
        if where not in self._device_labels:
            self._device_labels[where] = contiguous(self.labels, np.int64, where)
        labels = self._device_labels[where]
        if where.library == "cupy":
            import cupy

            return cupy.where(rows >= 0, labels[cupy.clip(rows, 0, None)], -1)
        return labels[rows.clamp(min=0)].masked_fill(rows < 0, -1)

    def describe(self) -> str:
        return self.backend + (", hubness penalty" if self.offsets is not None else "")


class FaissIndex(SearchIndex):
    """A FAISS index on the CPU. `index`: a built one (a loaded bank's); else made from `config.index`.

    vectors: the bank's vectors (may be memory-mapped), or None for an index alone (an on-disk one). With them, an
    index whose scores are approximate (compressed codes: IVF-PQ, scalar quantizers; not Flat, IVF-Flat or HNSW-Flat)
    searches `config.refine` x k candidates and returns the best k rescored exactly from the vectors (`rerank`: exact
    similarities, ties lowest row first as in FlatIndex), reading memory-mapped vectors through a mapping advised
    random access (`random_access`); `config.refine` 0, or no vectors, returns FAISS's own top k.
    num_threads: OpenMP threads for each search (0 = FAISS's default); FAISS's thread count is per calling thread,
    so other threads are unaffected.
    """

    def __init__(self, vectors, labels, num_classes: int, config: Config, index=None, num_threads: int = 0,
                 offsets=None) -> None:
        if vectors is None and index is None:
            raise InputError("FaissIndex needs the vectors or a built index")
        if offsets is not None and vectors is None:
            raise InputError("search offsets (the hubness penalty) need the bank's vectors, for the exact re-rank")
        super().__init__(vectors if vectors is not None else (index.ntotal, index.d), labels, num_classes, offsets)
        if len(self.labels) != self.size:
            raise InputError(f"{len(self.labels)} labels for an index of {self.size} vectors")
        if index is not None and vectors is not None and (index.ntotal, index.d) != (self.size, self.dim):
            raise InputError(f"an index of {index.ntotal} x {index.d} vectors given {self.size} x {self.dim} vectors")
        self.index = index if index is not None else make_faiss_index(vectors, config)
        self.nprobe = int(config.nprobe)
        self._params = _ivf_parameters(self.index, self.nprobe)
        self.num_threads = int(num_threads)
        # the vectors are kept (never copied: a memory-mapped bank stays on disk) only when the re-rank reads them;
        # FAISS knows nothing of offsets, so with them every index's shortlist is re-ranked
        self.refine = (max(int(config.refine), 1) if offsets is not None else
                       int(config.refine) if vectors is not None and not exact_scores(self.index) else 0)
        self.vectors = random_access(vectors) if self.refine else None
        self.backend = (f"faiss-cpu {config.index}" + (" (on disk)" if ondisk_data_file(self.index) else "") +
                        (f", exact re-rank of {self.refine} x k" if self.refine else ""))

    def _search(self, queries, k):
        if not self.refine:
            return self._faiss_search(queries, k)
        similarities, rows = self._faiss_search(queries, min(k * self.refine, self.size))
        return rerank(queries, similarities, rows, self.vectors, k, self.offsets)

    def _faiss_search(self, queries, k):
        faiss = require("faiss", "the FAISS search")

        # a small search runs on one thread: an OpenMP team's fork and join would cost more than the scan
        threads = self.num_threads or (1 if queries.size * self.size < SMALL_SEARCH else 0)
        if not threads:
            return self.index.search(queries, k, params=self._params)
        before = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(threads)
        try:
            return self.index.search(queries, k, params=self._params)
        finally:
            faiss.omp_set_num_threads(before)


def exact_scores(index) -> bool:
    """Whether a FAISS index scores candidates from the raw vectors (Flat, IVF-Flat, HNSW-Flat, or an index with a
    refinement stage of its own): re-ranking its results would change nothing but the order of exact ties."""
    faiss = require("faiss", "the FAISS search")

    return isinstance(faiss.downcast_index(index),
                      (faiss.IndexFlat, faiss.IndexIVFFlat, faiss.IndexHNSWFlat, faiss.IndexRefine))


def random_access(vectors: np.ndarray) -> np.ndarray:
    """`vectors` for reading scattered rows: when they are (a view of) a read-only memory-mapped .npy (a loaded
    bank's), the same bytes through a mapping of the file of their own, advised random access (MADV_RANDOM), so that
    a row not in the page cache costs a read of its own page, not of the kernel's read-around window (8 MiB on the
    machine measured: 1,000 random rows of an uncached 2 GB file read 1.9 GB and took 1.4 s; advised, 4.6 MB and
    42 ms; docs/scaling.md). The bank's own mapping keeps its read-ahead for sequential scans; the page cache is
    shared, so nothing is copied. Any other array is returned as it is."""
    import mmap

    mapped = vectors
    while isinstance(mapped, np.ndarray) and not (isinstance(mapped, np.memmap) and
                                                  isinstance(mapped.base, mmap.mmap)):
        mapped = mapped.base  # a view's base, down to the memmap over the file's mapping
    if (not isinstance(mapped, np.memmap) or mapped.mode != "r" or not hasattr(mmap, "MADV_RANDOM")
            or vectors.dtype != np.float32 or not vectors.flags.c_contiguous or vectors.size == 0):
        return vectors
    start = mapped.offset + (vectors.ctypes.data - mapped.ctypes.data)  # the rows' first byte in the file
    aligned = start - start % mmap.ALLOCATIONGRANULARITY
    with open(mapped.filename, "rb") as handle:
        mapping = mmap.mmap(handle.fileno(), start - aligned + vectors.nbytes, access=mmap.ACCESS_READ,
                            offset=aligned)
    mapping.madvise(mmap.MADV_RANDOM)
    return np.frombuffer(mapping, np.float32, vectors.size, start - aligned).reshape(vectors.shape)


def rerank(queries: np.ndarray, similarities: np.ndarray, rows: np.ndarray, vectors: np.ndarray,
           k: int, offsets: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The best k of each query's shortlist `rows` (Q, n), n >= k, rescored exactly: the inner products of
    `queries` (Q, D) with those rows of `vectors` (M, D), possibly memory-mapped, plus their `offsets` (M,) when
    given. Rows -1 (FAISS found fewer than n candidates) keep their `similarities` (FAISS's lowest float) and stay
    last. Ties: lowest row first (engine.topk, as FlatIndex). Up to RERANK_ROWS candidates at a time; each group's
    distinct rows are read once, in ascending order (a memory-mapped bank is read front to back, each page once)."""
    step = max(1, RERANK_ROWS // rows.shape[1])
    best_values, best_rows = [], []
    for start in range(0, len(queries), step):
        block, scores = rows[start:start + step], np.array(similarities[start:start + step], np.float32)
        found = block >= 0
        unique, position = np.unique(block[found], return_inverse=True)
        gathered = np.ascontiguousarray(vectors[unique], np.float32)
        which = np.nonzero(found)[0] + start  # each found candidate's query
        scores[found] = np.einsum("id,id->i", queries[which], gathered[position.ravel()])
        if offsets is not None:
            scores[found] += offsets[unique][position.ravel()]
        values, best = top_k(scores, k, block)
        best_values.append(values)
        best_rows.append(best)
    return np.concatenate(best_values), np.concatenate(best_rows)


def _ivf_parameters(index, nprobe: int):
    """Search parameters giving an IVF index (bare, or behind a pre-transform such as OPQ) `nprobe`; None for an
    index without inverted lists."""
    faiss = require("faiss", "the FAISS search")

    if faiss.try_extract_index_ivf(index) is None:
        return None
    params = faiss.SearchParametersIVF(nprobe=nprobe)
    if isinstance(index, faiss.IndexPreTransform):
        wrapper = faiss.SearchParametersPreTransform(index_params=params)
        wrapper._moduseg_inner = params  # the wrapper holds a raw pointer: keep the inner parameters alive
        return wrapper
    return params


class ExactIndex(SearchIndex):
    """Brute-force NumPy inner products, every score sorted (engine.topk.top_k_reference): the reference search."""

    backend = "numpy-exact"

    def __init__(self, vectors, labels, num_classes: int, offsets=None) -> None:
        super().__init__(vectors, labels, num_classes, offsets)
        self.vectors = np.ascontiguousarray(vectors, np.float32)

    def _search(self, queries, k):
        scores = queries @ self.vectors.T
        return top_k_reference(scores if self.offsets is None else scores + self.offsets[None, :], k)


class FlatIndex(ExactIndex):
    """Exact inner-product search by one BLAS product per query batch, then the top k of each row by a partial
    selection (engine.topk.topk_inner_product): the same rows and order as ExactIndex (equal scores: lowest row
    first), without sorting every score. `chunk_rows` bank rows are scored at a time, so the (Q, chunk) score block
    stays small for big banks."""

    backend = "numpy-flat (BLAS)"

    def __init__(self, vectors, labels, num_classes: int, chunk_rows: int = 1 << 16, offsets=None) -> None:
        super().__init__(vectors, labels, num_classes, offsets)
        if chunk_rows < 1:
            raise InputError(f"chunk_rows must be >= 1, got {chunk_rows}")
        self.chunk_rows = int(chunk_rows)

    def _search(self, queries, k):
        return topk_inner_product(queries, self.vectors, k, self.chunk_rows, self.offsets)


class TorchIndex(SearchIndex):
    """The bank resident on a torch device: exact top-K by chunked matrix products (engine.topk.topk_inner_product,
    `chunk_rows` bank rows at a time, so the (Q, chunk) score block stays small for big banks), or faiss-gpu's flat
    index when the installed faiss has GPU support (its order of exactly tied similarities is FAISS's). Queries go
    up and results come back as NumPy arrays; `search_tensors` keeps them on the device.

    The vectors are on the device once: in faiss-gpu's index, or else in `self.vectors` (None with faiss-gpu). They
    go up a block of rows at a time, so a memory-mapped bank is never copied whole into host memory; on the CPU
    device `self.vectors` shares the NumPy array's memory."""

    def __init__(self, vectors, labels, num_classes: int, device: str = "cuda", chunk_rows: int = 1 << 18,
                 offsets=None) -> None:
        import torch

        super().__init__(vectors, labels, num_classes, offsets)
        check_torch_device(device)  # no GPU, or no kernel image for it: ModelError naming both
        if chunk_rows < 1:
            raise InputError(f"chunk_rows must be >= 1, got {chunk_rows}")
        self.device = torch.device(device)
        self.chunk_rows = int(chunk_rows)
        # faiss-gpu's flat index cannot add offsets: with them the torch scan searches
        self.faiss_index = _faiss_gpu_index(vectors, self.device) if offsets is None else None
        self.vectors = None if self.faiss_index is not None else _to_device(torch, vectors, self.device)
        self.device_offsets = None if offsets is None else torch.from_numpy(self.offsets).to(self.device)
        self.backend = f"{'faiss-gpu' if self.faiss_index is not None else 'torch-topk'} on {self.device}"

    def _search(self, queries, k):
        import torch

        similarities, rows = self.search_tensors(torch.from_numpy(queries).to(self.device), k)
        return similarities.cpu().numpy(), rows.cpu().numpy()

    def _search_device(self, queries, k, where):
        """Device queries searched where the bank lives, without leaving the device (CuPy arrays through DLPack)."""
        import torch

        if k <= 0 or shape_of(queries)[0] == 0:
            return super()._search_device(queries, k, where)
        tensor = queries if isinstance(queries, torch.Tensor) else torch.from_dlpack(queries)
        similarities, rows = self.search_tensors(tensor.to(self.device, torch.float32), k)
        if where.library == "cupy":
            import cupy

            return cupy.from_dlpack(similarities), cupy.from_dlpack(rows)
        return similarities, rows

    def search_tensors(self, queries, k: int):
        """(Q, k) similarities and int64 rows as tensors on the index's device (k <= bank size, Q >= 1)."""
        import torch

        if self.faiss_index is not None:
            similarities, rows = self.faiss_index.search(queries.contiguous(), k)  # faiss.contrib.torch_utils
            return similarities, rows.to(torch.int64)
        return topk_inner_product(queries.to(torch.float32), self.vectors, k, self.chunk_rows, self.device_offsets)


def _to_device(torch, vectors: np.ndarray, device):
    """(M, D) float32 vectors as one tensor on `device`, copied up a block of rows at a time (a memory-mapped array
    is paged in block by block, never whole in host memory); on the CPU, the array's own memory when it can be."""
    vectors = np.asarray(vectors)
    if device.type == "cpu" and vectors.dtype == np.float32 and vectors.flags.c_contiguous:
        with warnings.catch_warnings():  # a read-only (memory-mapped) array: the tensor is never written
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(vectors)
    out = torch.empty(tuple(vectors.shape), dtype=torch.float32, device=device)
    for start, block in row_blocks(vectors):
        out[start:start + len(block)].copy_(torch.from_numpy(block))
    return out


def create_index(bank, config: Config, backend: str = "faiss", device: str = "cuda",
                 num_threads: int = 0) -> SearchIndex:
    """The search index over `bank` for a backend of BACKENDS ("torch" on `device`), with the bank's hubness
    penalty under `config` (FeatureBank.search_offsets)."""
    offsets = bank.search_offsets(config)
    if backend == "faiss" and config.index == "Flat":
        return FlatIndex(bank.vectors, bank.labels, len(bank.class_names), offsets=offsets)
    if backend == "faiss":
        # the bank's own index (an on-disk one included) serves when it was made from the same factory string, with
        # this config's nprobe; another factory string gets an index of its own, built from the bank's vectors
        same = config.index == bank.config.index
        return FaissIndex(bank.vectors, bank.labels, len(bank.class_names), config, bank.index if same else None,
                          num_threads, offsets)
    if backend == "torch":
        # Config.index holds on the device too: Flat is the bank resident on the GPU (exact GEMM + top-k); an
        # approximate index is the bank's own moved to the GPU by faiss-gpu, or else stays on the CPU (warned)
        if config.index == "Flat":
            return TorchIndex(bank.vectors, bank.labels, len(bank.class_names), device, offsets=offsets)
        index = create_index(bank, config, "faiss", device, num_threads)
        gpu = _faiss_index_to_gpu(index.index, device)
        if gpu is None:
            warnings.warn(f"Config.index {config.index!r}: the installed faiss has no GPU support, so the bank is "
                          f"searched on the CPU (queries go down from {device}, results back up); install "
                          "faiss-gpu for a GPU search, or use Config.index='Flat' to hold the raw bank on the GPU",
                          stacklevel=3)
            return index
        index.index, index.backend = gpu, index.backend.replace("faiss-cpu", f"faiss-gpu on {device}")
        return index
    if backend == "exact":
        return ExactIndex(bank.vectors, bank.labels, len(bank.class_names), offsets)
    raise InputError(f"unknown search backend {backend!r}; known backends: {BACKENDS}")


def open_ondisk_index(index_path, labels: np.ndarray, num_classes: int, config: Config,
                      num_threads: int = 0, vectors: np.ndarray | None = None) -> FaissIndex:
    """The engine's search face over an on-disk IVF index (engine.ivf.read_ondisk_index) whose ids are the rows of
    `labels` (as engine.ivf.add_shards gives them), visiting `config.nprobe` lists per query. `vectors`: the bank's
    vectors (a memory-mapped array: np.load(..., mmap_mode="r")), for the exact re-rank of `config.refine` x k
    candidates; without them FAISS's own top k from the codes."""
    return FaissIndex(vectors, labels, num_classes, config, read_ondisk_index(index_path), num_threads)


def _faiss_with_gpus():
    """The faiss module when it has GPU support and sees a GPU (faiss-gpu), else None (faiss-cpu, or no faiss)."""
    try:
        import faiss
    except ImportError:
        return None
    return faiss if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0 else None


def _faiss_index_to_gpu(index, device: str):
    """faiss-gpu's copy of a CPU index on `device` (index_cpu_to_gpu), or None when faiss has no GPU support or the
    index kind has no GPU version (an on-disk index, HNSW)."""
    faiss = _faiss_with_gpus()
    if faiss is None:
        return None
    resources = faiss.StandardGpuResources()
    try:
        gpu = faiss.index_cpu_to_gpu(resources, int(str(device).partition(":")[2] or 0), index)
    except RuntimeError as error:
        warnings.warn(f"faiss-gpu cannot hold this index ({error}); it is searched on the CPU", stacklevel=4)
        return None
    gpu._moduseg_resources = resources  # keep the resources alive as long as the index
    return gpu


def _faiss_gpu_index(vectors: np.ndarray, device):
    """A faiss-gpu flat inner-product index on `device`, or None (not a CUDA device, or faiss without GPU support:
    faiss-cpu, the usual install)."""
    faiss = _faiss_with_gpus() if device.type == "cuda" else None
    if faiss is None:
        return None
    import faiss.contrib.torch_utils  # noqa: F401  (lets faiss indexes take torch tensors, CUDA ones included)

    resources = faiss.StandardGpuResources()
    options = faiss.GpuIndexFlatConfig()
    options.device = device.index if device.index is not None else 0
    index = faiss.GpuIndexFlatIP(resources, int(vectors.shape[1]), options)
    for _, block in row_blocks(vectors):  # a block at a time: a memory-mapped bank is paged in by parts
        index.add(block)
    index._moduseg_resources = resources  # keep the resources alive as long as the index
    return index
