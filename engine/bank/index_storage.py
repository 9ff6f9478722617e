"""How a bank stores its search index beside its vectors, which are never stored twice (INDEX_STORAGE), and how
that index is written into a bank directory and read back from it. `bank` below is a FeatureBank (its public face:
vectors, config, index, built_index)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..deps import require
from ..errors import BankError, InputError
from ..ivf import (ONDISK_SUFFIX, build_ondisk_index, make_faiss_index, ondisk_data_file, read_ondisk_index, row_blocks,
                   write_ondisk_index)

#: how a bank stores its search index (manifest "index_storage"), and the files that adds to the vectors, labels,
#: kinds and sources every bank holds. The vectors are never stored twice:
#: "exact": Config.index "Flat", searched from vectors.npy (engine.search.FlatIndex), nothing more stored;
#: "ivf-lists": an IVF-Flat index, whose codes would be the vectors again: the trained index without its lists, and
#:     each vector's list (8 bytes a vector); load refills the lists from vectors.npy, no training or assignment;
#: "codes": any other FAISS index (IVF-PQ, scalar quantizers...), written whole: codes, not vectors (an HNSW,Flat
#:     or other index keeping raw vectors would hold a second copy);
#: "ondisk": an IVF index (IVF-PQ) whose inverted lists are a file of their own, memory-mapped at load
#:     (FeatureBank.save(ondisk=True), for banks larger than memory).
INDEX_STORAGE = {"exact": (), "ivf-lists": ("index.faiss", "ivf_lists.npy"), "codes": ("index.faiss",),
                 "ondisk": ("index.faiss", "index" + ONDISK_SUFFIX)}


def choose_storage(bank, ondisk: bool | None) -> str:
    """How FeatureBank.save stores `bank`'s index (a key of INDEX_STORAGE). ondisk: as FeatureBank.save takes it
    (None: on disk when the bank's index is)."""
    if bank.config.index == "Flat":
        if ondisk:
            raise InputError("ondisk=True needs an IVF index (Config.index \"IVF16384,PQ64\"), not \"Flat\"")
        return "exact"
    if ondisk is None:
        ondisk = bank.built_index is not None and ondisk_data_file(bank.built_index) is not None
    if ondisk:
        return "ondisk"
    faiss = require("faiss", "the bank's FAISS index")
    ivf = faiss.try_extract_index_ivf(bank.index)
    return "ivf-lists" if ivf is not None and isinstance(faiss.downcast_index(bank.index), faiss.IndexIVFFlat) \
        else "codes"


def write_index(bank, staging: Path, final: Path, storage: str, shard_rows: int) -> None:
    """The index files of `storage` into `staging` (renamed to `final` afterwards); an on-disk index is built from
    the vectors, `shard_rows` a shard (engine.ivf.build_ondisk_index), unless the bank's index is one already."""
    if storage == "exact":
        return
    faiss = require("faiss", "the bank's FAISS index")
    # an on-disk bank is built here from the vectors, never first in memory
    index = bank.built_index if storage == "ondisk" else bank.index
    if storage != "ondisk" and ondisk_data_file(index) is not None:
        index = make_faiss_index(bank.vectors, bank.config)  # an on-disk index saved in memory: lists of its own
    if storage == "codes":
        faiss.write_index(index, str(staging / "index.faiss"))
    elif storage == "ivf-lists":
        # the vectors are the IVF-Flat lists' codes: store the trained index without them, and each vector's list
        lists = np.empty(len(bank), np.int64)
        invlists = index.invlists
        for number in range(index.nlist):
            rows = faiss.rev_swig_ptr(invlists.get_ids(number), invlists.list_size(number))
            lists[rows] = number
        empty = faiss.clone_index(index)
        empty.reset()
        faiss.write_index(empty, str(staging / "index.faiss"))
        np.save(staging / "ivf_lists.npy", lists)
    else:
        if index is None or ondisk_data_file(index) is None:
            index = build_ondisk_index(bank.vectors, bank.config, staging / "index.faiss", shard_rows)
        # the index file records where its lists are: where they will be once the bank is renamed into place
        write_ondisk_index(index, staging / "index.faiss", recorded=final.absolute() / "index.faiss")


def read_index(path: Path, storage: str, bank):
    """The index of a bank directory as INDEX_STORAGE stores it (None for "exact": nothing to read)."""
    if storage == "exact":
        return None
    faiss = require("faiss", "the bank's FAISS index")
    if storage == "ondisk":
        index = read_ondisk_index(path / "index.faiss")
        lists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(index).invlists)
        have = (path / ("index" + ONDISK_SUFFIX)).stat().st_size
        if have < lists.totsize:  # a mapped file shorter than its lists would crash the first search that reads them
            raise BankError(f"{path}: index{ONDISK_SUFFIX} holds {have} bytes, its lists need {lists.totsize}")
        return index
    index = faiss.read_index(str(path / "index.faiss"))
    if storage == "ivf-lists":
        ivf = faiss.try_extract_index_ivf(index)
        lists = np.load(path / "ivf_lists.npy", allow_pickle=False)
        if ivf is None or index.ntotal or lists.shape != (len(bank),) or lists.dtype != np.int64 or (
                len(lists) and (lists.min() < 0 or lists.max() >= ivf.nlist)):
            raise BankError(f"{path}: ivf_lists.npy ({lists.shape}, {lists.dtype}) must give each of the "
                            f"{len(bank)} vectors one of the empty IVF index's lists")
        for start, block in row_blocks(bank.vectors):  # the lists refilled in row order, as they were built
            assign = np.ascontiguousarray(lists[start:start + len(block)])
            index.add_core(len(block), faiss.swig_ptr(block), None, faiss.swig_ptr(assign))
    return index


def check_index(path: Path, index, bank) -> None:
    """BankError unless `index` is an inner-product index of the bank's size and width (the vectors are stored
    once, so there is no second copy to compare)."""
    faiss = require("faiss", "the bank's FAISS index")

    if index.ntotal != len(bank) or index.d != bank.dim or index.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise BankError(f"{path}: index.faiss holds {index.ntotal} x {index.d} (metric {index.metric_type}), the "
                        f"vectors are {len(bank)} x {bank.dim} under inner product")
