"""FAISS indexes built from a bank's vectors: trained and filled in memory (`make_faiss_index`), or, for banks larger
than memory (docs/scaling.md), an IVF index whose inverted lists live in a file of their own.

`build_ondisk_index` trains an IVF index (IVF-PQ: codes, not vectors) on a sample of the vectors, fills it shard by
shard (each shard an IVF index sharing the trained quantizer, written to disk), merges the shards' inverted lists
into one file beside the index (FAISS's `OnDiskInvertedLists`), and `read_ondisk_index` maps that file into memory
instead of reading it: only the lists a query probes are paged in. engine.search.open_ondisk_index is the engine's
search face over such an index.

The vectors may be a memory-mapped array: everything here reads them a block of rows at a time (`row_blocks`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np

from .config import Config
from .deps import require
from .errors import InputError

#: rows read from a (memory-mapped) vector array at a time: 64 Ki rows of 680-d = 178 MB
BLOCK_ROWS = 1 << 16
#: the suffix of the file beside an on-disk IVF index that holds its inverted lists (codes and row ids)
ONDISK_SUFFIX = ".ivfdata"


def row_blocks(vectors: np.ndarray, rows: int = BLOCK_ROWS) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, block) of (M, D) `vectors`, `rows` rows at a time, each block contiguous float32: a memory-mapped
    array is paged in block by block, never read whole."""
    for start in range(0, len(vectors), rows):
        yield start, np.ascontiguousarray(vectors[start:start + rows], np.float32)


def make_faiss_index(vectors: np.ndarray, config: Config):
    """A FAISS inner-product index in memory from the factory string `config.index` ("Flat" exact; "IVFn,Flat",
    "IVFn,PQm" trained here on at most `config.index_train_size` vectors, a fixed random sample). `vectors` may be
    memory-mapped: they are added a block of rows at a time."""
    index = train_index(vectors, config)
    for _, block in row_blocks(vectors):
        index.add(block)
    return index


def train_index(vectors: np.ndarray, config: Config):
    """An empty FAISS inner-product index from `config.index`, trained (when it needs training: IVF centroids, PQ
    codebooks) on at most `config.index_train_size` of `vectors`, a fixed random sample, so the same vectors and
    config always give the same index. An IVF index gets `config.nprobe` as its default."""
    faiss = require("faiss", "the FAISS index")

    try:
        index = faiss.index_factory(int(vectors.shape[1]), config.index, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as error:
        raise InputError(f"Config.index {config.index!r} is not a FAISS index factory string: {error}") from error
    ivf = faiss.try_extract_index_ivf(index)
    pq = faiss.downcast_index(ivf) if ivf is not None else index  # the IndexIVFPQ behind the base-class proxy
    if getattr(pq, "do_polysemous_training", False):
        # polysemous codes serve Hamming-filtered search, which the engine never uses; training them (a permutation
        # search after the codebooks) takes 30x the codebooks' own time
        pq.do_polysemous_training = False
    if not index.is_trained:
        rows = np.arange(len(vectors))
        if len(vectors) > config.index_train_size:
            rows = np.sort(np.random.default_rng(0).choice(len(vectors), config.index_train_size, replace=False))
        # sorted rows read a memory-mapped array front to back; only the sample is ever in memory
        index.train(np.ascontiguousarray(vectors[rows], np.float32))
    if ivf is not None:
        ivf.nprobe = config.nprobe
    return index


# ---------------------------------------------------------------------------------------- on-disk IVF (IVF-PQ)


def build_ondisk_index(vectors: np.ndarray, config: Config, index_path, shard_rows: int = 1 << 20,
                       progress=None):
    """Build an IVF index from `config.index` (an IVF factory string; "IVFn,PQm" keeps m bytes a vector) over
    `vectors` (M, D), possibly memory-mapped and larger than memory, with its inverted lists on disk:

    1. train on `config.index_train_size` sampled vectors (train_index);
    2. fill shards of `shard_rows` vectors, each an empty copy of the trained index with the rows as FAISS ids,
       written to a temporary directory beside `index_path` (add_shards);
    3. merge the shards' lists into `index_path` with ONDISK_SUFFIX and write the index (merge_shards).

    Memory: the training sample, one shard's codes and one block of vectors at a time. Returns the merged index,
    read back memory-mapped (read_ondisk_index). `progress(stage, seconds)` is called after each stage ("train",
    "add", "merge") when given."""
    import time

    faiss = require("faiss", "the on-disk FAISS index")
    index_path = Path(index_path)
    start = time.perf_counter()
    trained = train_index(vectors, config)
    if faiss.try_extract_index_ivf(trained) is None:
        raise InputError(f"an on-disk index needs an IVF factory string (\"IVF16384,PQ64\"), got {config.index!r}")
    if progress:
        progress("train", time.perf_counter() - start)
    with tempfile.TemporaryDirectory(prefix=".shards.", dir=index_path.parent) as directory:
        start = time.perf_counter()
        shards = add_shards(trained, vectors, directory, shard_rows)
        if progress:
            progress("add", time.perf_counter() - start)
        start = time.perf_counter()
        merge_shards(trained, shards, index_path)
        if progress:
            progress("merge", time.perf_counter() - start)
    return read_ondisk_index(index_path)


def add_shards(trained, vectors: np.ndarray, directory, shard_rows: int = 1 << 20, first_id: int = 0) -> list[Path]:
    """Add `vectors` (M, D) to copies of the trained, empty IVF index `trained`, `shard_rows` vectors each, with ids
    `first_id + row`, and write each to `directory/shardNNNNN.faiss`. Returns the shard paths in row order."""
    faiss = require("faiss", "the on-disk FAISS index")

    if shard_rows < 1:
        raise InputError(f"shard_rows must be >= 1, got {shard_rows}")
    if trained.ntotal:
        raise InputError(f"the trained index must be empty, it holds {trained.ntotal} vectors")
    paths = []
    for number, start in enumerate(range(0, len(vectors), shard_rows)):
        shard = faiss.clone_index(trained)
        for offset, block in row_blocks(vectors[start:start + shard_rows]):
            first = first_id + start + offset
            shard.add_with_ids(block, np.arange(first, first + len(block), dtype=np.int64))
        paths.append(Path(directory) / f"shard{number:05d}.faiss")
        faiss.write_index(shard, str(paths[-1]))
        del shard
    return paths


def merge_shards(trained, shard_paths, index_path) -> None:
    """Merge the inverted lists of shard indexes (add_shards) into one `OnDiskInvertedLists` file beside
    `index_path` (its suffix replaced by ONDISK_SUFFIX) and write the index, a copy of the trained, empty `trained`
    pointing at that file, to `index_path`. The shards are read memory-mapped, so neither they nor the merged lists
    need to fit in memory. Each list holds the shards' entries in shard order, so rows ascending."""
    faiss = require("faiss", "the on-disk FAISS index")

    index_path = Path(index_path).absolute()
    index = faiss.clone_index(trained)
    ivf = faiss.extract_index_ivf(index)
    shards = [faiss.read_index(str(p), faiss.IO_FLAG_MMAP) for p in shard_paths]  # alive until merged
    pointers = faiss.InvertedListsPtrVector()
    for path, shard in zip(shard_paths, shards):
        lists = faiss.extract_index_ivf(shard)
        if (shard.d, lists.nlist, lists.code_size) != (index.d, ivf.nlist, ivf.code_size):
            raise InputError(f"shard {path}: {shard.d}-d, {lists.nlist} lists of {lists.code_size}-byte codes; the "
                             f"trained index is {index.d}-d, {ivf.nlist} lists of {ivf.code_size}-byte codes")
        pointers.push_back(lists.invlists)
    merged = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, str(index_path.with_suffix(ONDISK_SUFFIX)))
    total = merged.merge_from_multiple(pointers.data(), pointers.size(), False)
    index.ntotal = ivf.ntotal = total
    ivf.replace_invlists(merged, True)
    merged.this.disown()  # the index owns the lists now
    faiss.write_index(index, str(index_path))
    del index, shards


def read_ondisk_index(index_path):
    """An on-disk IVF index (merge_shards) read with its inverted lists memory-mapped read-only from the
    ONDISK_SUFFIX file in the same directory (wherever the pair was moved to): the quantizer and codebooks are read,
    the lists are paged in as searches probe them."""
    faiss = require("faiss", "the on-disk FAISS index")

    index_path = Path(index_path).absolute()
    return faiss.read_index(str(index_path), faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY)


def ondisk_data_file(index) -> Path | None:
    """The file holding an on-disk IVF index's inverted lists; None for an index in memory."""
    faiss = require("faiss", "the FAISS index")

    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None:
        return None
    lists = faiss.downcast_InvertedLists(ivf.invlists)
    return Path(lists.filename) if isinstance(lists, faiss.OnDiskInvertedLists) else None


def write_ondisk_index(index, index_path, recorded=None) -> None:
    """Write an on-disk IVF index to `index_path` and copy its inverted lists file beside it (ONDISK_SUFFIX; not
    copied when it is there already). `recorded`: the path the index file will have when it is read (it is moved
    there after writing), so that reading it there finds the lists without a note from FAISS on the way."""
    faiss = require("faiss", "the on-disk FAISS index")

    index_path = Path(index_path).absolute()
    source, target = ondisk_data_file(index), index_path.with_suffix(ONDISK_SUFFIX)
    if source is None:
        raise InputError("write_ondisk_index: the index keeps its inverted lists in memory")
    if not (target.exists() and os.path.samefile(source, target)):
        shutil.copyfile(source, target)
    lists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(index).invlists)
    # recorded in the index file; read_ondisk_index looks for that name in the index's own directory
    lists.filename = str(Path(recorded or index_path).absolute().with_suffix(ONDISK_SUFFIX))
    try:
        faiss.write_index(index, str(index_path))
    finally:
        lists.filename = str(source)
