"""engine.search: one face over three backends. ExactIndex (NumPy) against a loop written from the definition,
TorchIndex on CPU tensors and FaissIndex (Flat) against ExactIndex on random data, exact ties included; the face's
checks, create_index and make_faiss_index."""

from __future__ import annotations

import itertools
import mmap
from types import SimpleNamespace

import numpy as np
import pytest

from engine.config import Config
from engine.errors import InputError
from engine.ivf import make_faiss_index
from engine.search import BACKENDS, ExactIndex, FaissIndex, FlatIndex, TorchIndex, create_index

torch = pytest.importorskip("torch")


def loop_search(queries, vectors, k):
    """Top-k by a Python sort per query: similarity descending, equal similarities lowest row first."""
    scores = queries.astype(np.float64) @ vectors.astype(np.float64).T
    rows = [sorted(range(len(vectors)), key=lambda r: (-scores[q, r], r))[:k] for q in range(len(queries))]
    rows = np.array(rows, np.int64).reshape(len(queries), -1)
    return np.take_along_axis(scores, rows, 1), rows


def integer_bank(rng, rows=40, dim=8, copies=3, high=2):
    """Small-integer vectors, each repeated 1 to `copies` times: every product and sum is exact in float32, so
    duplicates (and different vectors with equal products) tie exactly in any GEMM and any summation order."""
    unique = rng.integers(-high, high + 1, (rows, dim)).astype(np.float32)
    vectors = np.repeat(unique, rng.integers(1, copies + 1, rows), axis=0)
    rng.shuffle(vectors)
    queries = rng.integers(-high, high + 1, (17, dim)).astype(np.float32)
    return vectors, queries, rng.integers(0, 4, len(vectors))


def normalised(rng, rows, dim=64):
    x = rng.standard_normal((rows, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def assert_valid_top_k(index_sims, index_rows, queries, vectors, want_sims, atol=0.0):
    """A correct top-k up to the order of tied neighbours: the same similarities, distinct rows, and each row's
    true similarity is the one reported."""
    np.testing.assert_allclose(index_sims, want_sims, atol=atol, rtol=0)
    assert all(len(set(r)) == len(r) for r in index_rows.tolist())
    true = np.einsum("qd,qkd->qk", queries.astype(np.float64), vectors.astype(np.float64)[index_rows])
    np.testing.assert_allclose(true, index_sims, atol=max(atol, 1e-6), rtol=0)


@pytest.mark.parametrize("k", [1, 5, 30, 120, 500])
def test_exact_index_is_the_definition(rng, k):
    vectors, queries, labels = integer_bank(rng)
    sims, rows = ExactIndex(vectors, labels, 4).search(queries, k)
    want_sims, want_rows = loop_search(queries, vectors, k)
    assert sims.dtype == np.float32 and rows.dtype == np.int64 and sims.shape == (len(queries), min(k, len(vectors)))
    np.testing.assert_array_equal(rows, want_rows)
    np.testing.assert_array_equal(sims, want_sims.astype(np.float32))


@pytest.mark.parametrize("chunk_rows,k", [(1, 30), (5, 1), (5, 120), (13, 5), (13, 500), (1 << 16, 1),
                                          (1 << 16, 30), (1 << 16, 500)])
def test_flat_index_equals_exact_with_ties(rng, chunk_rows, k):
    vectors, queries, labels = integer_bank(rng)
    index = FlatIndex(vectors, labels, 4, chunk_rows=chunk_rows)
    got, want = index.search(queries, k), ExactIndex(vectors, labels, 4).search(queries, k)
    assert k == 1 or (want[0][:, 1:] == want[0][:, :-1]).any()  # the data has exact ties
    np.testing.assert_array_equal(got[1], want[1])  # ties: lowest rows first, whatever the chunking
    np.testing.assert_array_equal(got[0], want[0])
    assert got[0].dtype == np.float32 and got[1].dtype == np.int64


@pytest.mark.parametrize("chunk_rows,k", [(1, 30), (5, 1), (5, 120), (13, 5), (13, 500), (1 << 18, 1),
                                          (1 << 18, 30), (1 << 18, 500)])
def test_torch_index_on_cpu_equals_exact_with_ties(rng, chunk_rows, k):
    vectors, queries, labels = integer_bank(rng)
    index = TorchIndex(vectors, labels, 4, device="cpu", chunk_rows=chunk_rows)
    assert index.backend == "torch-topk on cpu"
    got = index.search(queries, k)
    want = ExactIndex(vectors, labels, 4).search(queries, k)
    assert k == 1 or (want[0][:, 1:] == want[0][:, :-1]).any()  # the data has exact ties
    np.testing.assert_array_equal(got[1], want[1])  # ties: lowest rows first, whatever the chunking
    np.testing.assert_array_equal(got[0], want[0])
    sims, rows = index.search_tensors(torch.from_numpy(queries), min(k, len(vectors)))
    assert isinstance(rows, torch.Tensor) and rows.dtype == torch.int64
    np.testing.assert_array_equal(rows.numpy(), want[1])


@pytest.mark.parametrize("k", [1, 5, 30, 120, 500])
def test_faiss_flat_equals_exact_up_to_tie_order(rng, k):
    pytest.importorskip("faiss")
    vectors, queries, labels = integer_bank(rng, high=6)
    index = FaissIndex(vectors, labels, 4, Config())
    assert index.backend == "faiss-cpu Flat"
    sims, rows = index.search(queries, k)
    want_sims, want_rows = ExactIndex(vectors, labels, 4).search(queries, k)
    assert_valid_top_k(sims, rows, queries, vectors, want_sims)
    # a neighbour tied with none before or after it (in the whole ranking, beyond k too) is the same row
    ranked = ExactIndex(vectors, labels, 4).search(queries, len(vectors))[0]
    padded = np.pad(ranked, ((0, 0), (1, 1)), constant_values=np.nan)
    untied = ((padded[:, 1:-1] != padded[:, :-2]) & (padded[:, 1:-1] != padded[:, 2:]))[:, :rows.shape[1]]
    assert untied.any()
    np.testing.assert_array_equal(rows[untied], want_rows[untied])


def test_all_backends_agree_on_random_unit_vectors(rng):
    pytest.importorskip("faiss")
    vectors, queries = normalised(rng, 777), normalised(rng, 40)
    labels = rng.integers(0, 5, len(vectors))
    exact = ExactIndex(vectors, labels, 5)
    for other in (TorchIndex(vectors, labels, 5, "cpu", chunk_rows=100), FaissIndex(vectors, labels, 5, Config())):
        for k in (1, 25, 777):
            want_sims, want_rows = exact.search(queries, k)
            sims, rows = other.search(queries, k)
            # different GEMMs round differently: neighbours whose similarities differ by rounding only may swap
            assert_valid_top_k(sims, rows, queries, vectors, want_sims, atol=1e-5)
            assert (rows != want_rows).mean() < 0.01


def test_search_face_checks_and_degenerate_sizes(rng):
    vectors, _, labels = integer_bank(rng, rows=4, copies=1)
    for index in (ExactIndex(vectors, labels, 4), TorchIndex(vectors, labels, 4, "cpu")):
        sims, rows = index.search(np.zeros((0, 8), np.float32), 3)
        assert sims.shape == rows.shape == (0, 3) and rows.dtype == np.int64
        sims, rows = index.search(np.ones((2, 8)), 10)  # float64 queries are converted; k capped at the bank size
        assert sims.shape == (2, 4) and sims.dtype == np.float32
        assert index.search(np.ones((2, 8), np.float32), 0)[1].shape == (2, 0)
        with pytest.raises(InputError, match=r"expected shape \(Q, 8\)"):
            index.search(np.ones((2, 7), np.float32), 3)
        with pytest.raises(InputError, match=r"expected shape \(Q, 8\)"):
            index.search(np.ones(8, np.float32), 3)
    with pytest.raises(InputError, match="chunk_rows"):
        TorchIndex(vectors, labels, 4, "cpu", chunk_rows=0)


def test_neighbour_labels_and_class_counts():
    vectors = np.eye(4, dtype=np.float32)
    index = ExactIndex(vectors, [2, 0, 2, 1], num_classes=5)
    np.testing.assert_array_equal(index.neighbour_labels(np.array([[0, 3, -1], [1, -1, 2]])), [[2, 1, -1], [0, -1, 2]])
    np.testing.assert_array_equal(index.class_counts, [1, 1, 2, 0, 0])
    assert index.num_classes == 5 and index.dim == 4 and index.size == 4


def test_create_index_backends(toy_bank):
    pytest.importorskip("faiss")
    config = toy_bank.config
    assert isinstance(create_index(toy_bank, config, "faiss"), FlatIndex)  # "Flat": the BLAS scan, not FAISS's
    ivf = config.replace(index="IVF2,Flat", nprobe=2)
    faiss_index = create_index(toy_bank, ivf, "faiss")  # knobs other than the bank's: an index of its own
    assert isinstance(faiss_index, FaissIndex) and "IVF2,Flat" in faiss_index.describe()
    assert faiss_index.index is not toy_bank.index and faiss_index.index.nprobe == 2
    assert isinstance(create_index(toy_bank, config, "exact"), ExactIndex)
    torch_index = create_index(toy_bank, config, "torch", device="cpu")
    assert isinstance(torch_index, TorchIndex) and torch_index.device.type == "cpu"
    for index in (faiss_index, torch_index):
        assert index.num_classes == len(toy_bank.class_names)
        np.testing.assert_array_equal(index.class_counts, toy_bank.class_counts())
    with pytest.raises(InputError, match="unknown search backend 'gpu'"):
        create_index(toy_bank, config, "gpu")
    assert BACKENDS == ("faiss", "torch", "exact")


def test_device_search_honours_config_index(toy_bank, rng):
    """The "torch" (device) backend holds a Flat bank itself, but an approximate Config.index stays that index: faiss-
    gpu's copy where faiss has GPU support, else the CPU index with a warning (never a silent raw upload)."""
    faiss = pytest.importorskip("faiss")
    ivf = toy_bank.config.replace(index="IVF2,Flat", nprobe=2)
    if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        pytest.skip("faiss has GPU support here: the index moves to the GPU (tests/test_gpu.py)")
    with pytest.warns(UserWarning, match="no GPU support, so the bank is searched on the CPU"):
        index = create_index(toy_bank, ivf, "torch", device="cpu")
    assert isinstance(index, FaissIndex) and "IVF2,Flat" in index.describe()
    queries = np.asarray(toy_bank.vectors[:5])
    want = create_index(toy_bank, ivf, "faiss").search(queries, 3)
    for got, expected in zip(index.search(queries, 3), want):
        np.testing.assert_array_equal(got, expected)


def test_faiss_thread_count_is_restored(rng):
    faiss = pytest.importorskip("faiss")
    vectors = normalised(rng, 50, 16)
    before = faiss.omp_get_max_threads()
    index = FaissIndex(vectors, np.zeros(50, int), 1, Config(), num_threads=1)
    want = ExactIndex(vectors, np.zeros(50, int), 1).search(vectors[:5], 3)
    got = index.search(vectors[:5], 3)
    np.testing.assert_array_equal(got[1], want[1])
    assert faiss.omp_get_max_threads() == before


def test_make_faiss_index_ivf_and_bad_factory(rng):
    pytest.importorskip("faiss")
    vectors = normalised(rng, 2000, 16)
    flat = make_faiss_index(vectors, Config())
    ivf = make_faiss_index(vectors, Config(index="IVF16,Flat", nprobe=16, index_train_size=500))
    assert ivf.is_trained and ivf.ntotal == 2000 and ivf.nprobe == 16
    np.testing.assert_array_equal(ivf.search(vectors[:10], 5)[1], flat.search(vectors[:10], 5)[1])  # nprobe = nlist
    with pytest.raises(InputError, match="not a FAISS index factory string"):
        make_faiss_index(vectors, Config(index="NotAnIndex"))


# ------------------------------------------------------------------------------------------- on-disk IVF-PQ


def clustered(rng, rows, dim=32, centres=200, noise=0.3):
    """Unit vectors around random centres: neighbours worth finding, as in a real bank."""
    middle = rng.standard_normal((centres, dim)).astype(np.float32)
    x = middle[rng.integers(0, centres, rows)] + noise * rng.standard_normal((rows, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture
def ondisk(rng, tmp_path):
    """20k x 32 clustered vectors in a memory-mapped .npy, an IVF64,PQ16 index trained on them, built on disk from
    three shards, and the same trained index filled in memory."""
    pytest.importorskip("faiss")
    from engine.ivf import add_shards, merge_shards, read_ondisk_index, train_index

    np.save(tmp_path / "vectors.npy", clustered(rng, 20000))
    vectors = np.load(tmp_path / "vectors.npy", mmap_mode="r")
    config = Config(index="IVF64,PQ16", nprobe=8, index_train_size=5000)
    trained = train_index(vectors, config)
    shards = add_shards(trained, vectors, tmp_path, shard_rows=7000)
    assert [p.name for p in shards] == ["shard00000.faiss", "shard00001.faiss", "shard00002.faiss"]
    merge_shards(trained, shards, tmp_path / "index.faiss")
    memory = train_index(vectors, config)  # trained again: training is deterministic
    memory.add(np.asarray(vectors))
    return vectors, config, read_ondisk_index(tmp_path / "index.faiss"), memory, tmp_path


def test_ondisk_ivfpq_equals_the_same_index_in_memory(ondisk, rng):
    import faiss

    vectors, config, index, memory, _ = ondisk
    assert isinstance(faiss.downcast_InvertedLists(faiss.extract_index_ivf(index).invlists),
                      faiss.OnDiskInvertedLists) and index.ntotal == 20000
    queries = clustered(rng, 100)
    labels = np.arange(20000) % 7
    for nprobe, refine in itertools.product((1, 8, 64), (0, 8)):
        c = config.replace(nprobe=nprobe, refine=refine)
        got = FaissIndex(vectors, labels, 7, c, index).search(queries, 5)
        want = FaissIndex(vectors, labels, 7, c, memory).search(queries, 5)
        np.testing.assert_array_equal(got[1], want[1])
        np.testing.assert_array_equal(got[0], want[0])
    assert index.nprobe == 8  # nprobe goes with each search: the shared index is not changed


def test_ondisk_ivfpq_recall_and_labels(ondisk, rng):
    from engine.search import open_ondisk_index

    vectors, config, _, _, directory = ondisk
    labels = rng.integers(0, 5, len(vectors))
    index = open_ondisk_index(directory / "index.faiss", labels, 5, config)
    assert "on disk" in index.describe() and index.size == 20000 and index.dim == 32
    queries = clustered(rng, 200)
    _, truth = ExactIndex(vectors, labels, 5).search(queries, 5)
    _, found = index.search(queries, 5)
    recall = np.mean([len(np.intersect1d(f, t)) / 5 for f, t in zip(found, truth)])
    assert recall > 0.45, recall  # measured 0.60 to 0.64 at nprobe 8 of 64 (PQ16 on 32-d); wrong ids give ~0
    np.testing.assert_array_equal(index.neighbour_labels(found), labels[found])  # rows are bank rows


def test_build_ondisk_index_in_one_call_and_refusals(ondisk, rng, tmp_path):
    from engine.ivf import add_shards, build_ondisk_index, train_index

    vectors, config, index, _, _ = ondisk
    stages = []
    built = build_ondisk_index(vectors, config, tmp_path / "b.faiss",
                               shard_rows=9000, progress=lambda stage, seconds: stages.append(stage))
    assert stages == ["train", "add", "merge"] and not list(tmp_path.glob(".shards.*"))  # shards deleted
    queries = clustered(rng, 20)
    np.testing.assert_array_equal(built.search(queries, 5)[1], index.search(queries, 5)[1])  # shards don't matter
    with pytest.raises(InputError, match="needs an IVF factory string"):
        build_ondisk_index(vectors, Config(index="PQ16"), tmp_path / "pq.faiss")
    with pytest.raises(InputError, match="shard_rows"):
        add_shards(train_index(vectors, config), vectors, tmp_path, shard_rows=0)


def test_memory_mapped_vectors_are_not_copied(rng, tmp_path):
    np.save(tmp_path / "v.npy", normalised(rng, 300, 16))
    mapped = np.load(tmp_path / "v.npy", mmap_mode="r")
    labels = np.zeros(300, int)
    flat, torch_cpu = FlatIndex(mapped, labels, 1), TorchIndex(mapped, labels, 1, "cpu")
    assert np.shares_memory(flat.vectors, mapped)
    assert torch_cpu.vectors.data_ptr() == mapped.ctypes.data  # the CPU tensor is the mapped file
    queries = normalised(rng, 10, 16)
    np.testing.assert_array_equal(torch_cpu.search(queries, 5)[1], flat.search(queries, 5)[1])
    pytest.importorskip("faiss")
    a, b = make_faiss_index(mapped, Config(index="IVF4,Flat", index_train_size=100)), \
        make_faiss_index(np.array(mapped), Config(index="IVF4,Flat", index_train_size=100))
    np.testing.assert_array_equal(a.search(queries, 5)[1], b.search(queries, 5)[1])


# ------------------------------------------------------------------------------- exact re-rank of a PQ shortlist


def mapping_of(array):
    """The buffer at the bottom of an array's chain of bases (a memoryview's object: an mmap for random_access)."""
    while isinstance(array, np.ndarray):
        array = array.base
    return getattr(array, "obj", array)


def recall(found, truth):
    return np.mean([len(np.intersect1d(f[f >= 0], t)) / t.size for f, t in zip(found, truth)])


def test_rerank_raises_ivfpq_recall_and_is_exact_over_the_lists_searched(ondisk, rng):
    from engine.search import open_ondisk_index

    vectors, config, _, memory, directory = ondisk
    labels = np.arange(len(vectors)) % 5
    queries = clustered(rng, 200)
    exact = ExactIndex(vectors, labels, 5)
    _, truth = exact.search(queries, 5)
    plain = open_ondisk_index(directory / "index.faiss", labels, 5, config.replace(refine=0), vectors=vectors)
    refined = open_ondisk_index(directory / "index.faiss", labels, 5, config.replace(refine=8), vectors=vectors)
    assert plain.refine == 0 and "re-rank" not in plain.describe() and plain.vectors is None
    assert refined.refine == 8 and "exact re-rank of 8 x k" in refined.describe()
    # the bank's file through a mapping of its own, advised random access: the same bytes, nothing read or copied
    assert isinstance(mapping_of(refined.vectors), mmap.mmap) and not np.shares_memory(refined.vectors, vectors)
    np.testing.assert_array_equal(refined.vectors, vectors)
    before, after = recall(plain.search(queries, 5)[1], truth), recall(refined.search(queries, 5)[1], truth)
    # the lists probed bound it: a shortlist of every candidate in them (refine x k >= 20,000) reaches no higher
    ceiling = recall(FaissIndex(vectors, labels, 5, config.replace(refine=4000), memory).search(queries, 5)[1], truth)
    assert after > before + 0.15 and after > ceiling - 0.03, (before, after, ceiling)  # measured ~0.59 -> 0.80 of 0.80

    # a shortlist as long as the bank (refine x k >= 20,000): exactly the top k of the vectors in the lists probed
    ivf = memory  # the same trained quantizer as the on-disk index
    lists_of_rows = ivf.quantizer.search(np.asarray(vectors), 1)[1][:, 0]
    probed = ivf.quantizer.search(queries, config.nprobe)[1]
    whole = FaissIndex(vectors, labels, 5, config.replace(refine=4000), memory)
    sims, rows = whole.search(queries, 5)
    for q in range(len(queries)):
        members = np.nonzero(np.isin(lists_of_rows, probed[q]))[0]
        want_sims, want_rows = ExactIndex(vectors[members], labels[members], 5).search(queries[q:q + 1], 5)
        np.testing.assert_array_equal(rows[q], members[want_rows[0]])
        np.testing.assert_allclose(sims[q], want_sims[0], rtol=0, atol=1e-6)
    # every list probed (nprobe = nlist): exact search itself
    every = FaissIndex(vectors, labels, 5, config.replace(nprobe=64, refine=4000), memory).search(queries, 5)
    want = exact.search(queries, 5)
    np.testing.assert_array_equal(every[1], want[1])
    np.testing.assert_allclose(every[0], want[0], rtol=0, atol=1e-6)


def ivfpq_integer_bank(rng):
    """integer_bank (exact ties in any summation order) behind an IVF4,PQ4x4 index: 4 lists, 2-byte codes."""
    vectors, queries, labels = integer_bank(rng, rows=60)
    config = Config(index="IVF4,PQ4x4", nprobe=4, index_train_size=len(vectors))
    return vectors, queries, labels, config, make_faiss_index(vectors, config)


@pytest.mark.parametrize("k", [1, 5, 30, 500])
def test_rerank_ties_lowest_row_first_as_exact_search(rng, k):
    pytest.importorskip("faiss")
    vectors, queries, labels, config, index = ivfpq_integer_bank(rng)
    got = FaissIndex(vectors, labels, 4, config.replace(refine=len(vectors)), index).search(queries, k)
    want = ExactIndex(vectors, labels, 4).search(queries, k)
    assert k == 1 or (want[0][:, 1:] == want[0][:, :-1]).any()  # the data has exact ties
    np.testing.assert_array_equal(got[1], want[1])  # ties: lowest rows first, like FlatIndex and ExactIndex
    np.testing.assert_array_equal(got[0], want[0])  # exact similarities, not the codes'
    # a shortlist of k x 1: FAISS's k rows, re-ordered exactly (equal scores lowest row first)
    coded = FaissIndex(vectors, labels, 4, config.replace(refine=0), index).search(queries, k)
    sims, rows = FaissIndex(vectors, labels, 4, config.replace(refine=1), index).search(queries, k)
    assert [sorted(r) for r in rows.tolist()] == [sorted(r) for r in coded[1].tolist()]
    np.testing.assert_array_equal(sims, np.einsum("qd,qkd->qk", queries, vectors[rows]))
    order = np.lexsort((rows, -sims), axis=1)
    np.testing.assert_array_equal(np.take_along_axis(rows, order, 1), rows)


def test_rerank_with_fewer_candidates_than_k(rng):
    pytest.importorskip("faiss")
    vectors, queries, labels, config, index = ivfpq_integer_bank(rng)
    lists = index.quantizer.search(vectors, 1)[1][:, 0]
    probed = index.quantizer.search(queries, 1)[1][:, 0]
    k = len(vectors) - 1  # more than one list holds: FAISS pads with row -1
    sims, rows = FaissIndex(vectors, labels, 4, config.replace(nprobe=1, refine=3), index).search(queries, k)
    assert sims.shape == rows.shape == (len(queries), k)
    for q in range(len(queries)):
        members = np.nonzero(lists == probed[q])[0]
        want_sims, want_rows = ExactIndex(vectors[members], labels[members], 4).search(queries[q:q + 1], k)
        n = len(members)
        assert 0 < n < k
        np.testing.assert_array_equal(rows[q, :n], members[want_rows[0]])
        np.testing.assert_array_equal(sims[q, :n], want_sims[0])
        assert (rows[q, n:] == -1).all() and (sims[q, n:] == np.finfo(np.float32).min).all()  # FAISS's padding
    index_face = FaissIndex(vectors, labels, 4, config.replace(nprobe=1, refine=3), index)
    assert (index_face.neighbour_labels(rows)[rows < 0] == -1).all()


def test_rerank_applies_to_approximate_scores_only(rng, toy_bank):
    pytest.importorskip("faiss")
    from engine.search import rerank

    vectors = normalised(rng, 2000, 16)
    labels = np.zeros(2000, int)
    for factory, applies in (("Flat", False), ("IVF8,Flat", False), ("HNSW8", False), ("IVF8,PQ4", True),
                             ("IVF8,SQ8", True), ("PQ4", True)):
        index = FaissIndex(vectors, labels, 1, Config(index=factory, refine=5, index_train_size=1000))
        assert index.refine == (5 if applies else 0) and (index.vectors is not None) == applies, factory
    ivfpq = Config(index="IVF8,PQ4", index_train_size=1000)
    built = make_faiss_index(vectors, ivfpq)
    assert FaissIndex(None, labels, 1, ivfpq, built).refine == 0  # an index alone: nothing to rescore from
    assert FaissIndex(vectors, labels, 1, ivfpq.replace(refine=0), built).refine == 0
    with pytest.raises(InputError, match="an index of 2000 x 16 vectors given 1999 x 16 vectors"):
        FaissIndex(vectors[:-1], labels[:-1], 1, ivfpq, built)
    # create_index hands the bank's vectors (a loaded bank's are memory-mapped) to the index
    bank = SimpleNamespace(vectors=vectors, labels=labels, class_names=["a"], config=ivfpq, index=built,
                           search_offsets=lambda config: None)
    face = create_index(bank, ivfpq, "faiss")
    assert face.index is built and face.refine == Config().refine and face.vectors is vectors
    # the re-rank in query groups (RERANK_ROWS candidates at a time) gives the same as in one
    queries = normalised(rng, 300, 16)
    sims, rows = built.search(queries, 40)
    one = rerank(queries, sims, rows, vectors, 5)
    import engine.search as search
    small = search.RERANK_ROWS
    try:
        search.RERANK_ROWS = 97  # 2 queries a group, the last one alone
        grouped = rerank(queries, sims, rows, vectors, 5)
    finally:
        search.RERANK_ROWS = small
    np.testing.assert_array_equal(grouped[1], one[1])
    np.testing.assert_array_equal(grouped[0], one[0])


def test_random_access_maps_the_same_rows_again(rng, tmp_path):
    from engine.search import random_access

    np.save(tmp_path / "v.npy", normalised(rng, 5000, 24))
    mapped = np.load(tmp_path / "v.npy", mmap_mode="r")
    for view in (mapped, mapped[1234:], mapped[7:4000], np.ascontiguousarray(mapped, np.float32)):  # offsets
        again = random_access(view)  # in pages unaligned to the mapping granularity too
        assert isinstance(mapping_of(again), mmap.mmap) and not np.shares_memory(again, view)
        assert again.shape == view.shape and again.dtype == np.float32
        np.testing.assert_array_equal(again, view)
    in_memory = np.array(mapped)
    writable = np.load(tmp_path / "v.npy", mmap_mode="c")  # copy-on-write: its changes are its own, kept
    for array in (in_memory, writable, mapped[:, :10], mapped[:0]):
        assert random_access(array) is array


def test_offsets_join_every_score_before_the_top_k_in_every_exact_backend(rng):
    """Search offsets (the hubness penalty): each row's offset is added to every query's score of that row before
    the top k, ties lowest row first, in ExactIndex (against the loop), FlatIndex at any chunking and TorchIndex."""
    vectors, queries, labels = integer_bank(rng)
    offsets = rng.integers(-3, 4, len(vectors)).astype(np.float32)  # small integers: sums stay exact, ties stay
    scores = queries.astype(np.float64) @ vectors.astype(np.float64).T + offsets
    for k in (1, 5, 30, len(vectors)):
        want_rows = np.array([sorted(range(len(vectors)), key=lambda r: (-scores[q, r], r))[:k]
                              for q in range(len(queries))], np.int64)
        want_sims = np.take_along_axis(scores, want_rows, 1).astype(np.float32)
        for index in (ExactIndex(vectors, labels, 4, offsets), FlatIndex(vectors, labels, 4, 7, offsets),
                      TorchIndex(vectors, labels, 4, "cpu", chunk_rows=7, offsets=offsets)):
            sims, rows = index.search(queries, k)
            np.testing.assert_array_equal(rows, want_rows)
            np.testing.assert_array_equal(sims, want_sims)
            assert index.describe().endswith("hubness penalty")
    with pytest.raises(InputError, match="3 search offsets for"):
        FlatIndex(vectors, labels, 4, offsets=offsets[:3])


def test_faiss_indexes_rerank_their_shortlist_with_the_offsets(rng):
    """FAISS knows nothing of offsets: with them every FAISS index re-ranks its shortlist exactly, offsets added."""
    pytest.importorskip("faiss")
    vectors, queries = normalised(rng, 2000, 16), normalised(rng, 50, 16)
    labels = np.zeros(2000, int)
    offsets = (-0.25 * rng.random(2000)).astype(np.float32)
    want_sims, want_rows = ExactIndex(vectors, labels, 1, offsets).search(queries, 5)
    for factory in ("IVF8,Flat", "IVF8,PQ4"):
        config = Config(index=factory, nprobe=8, refine=400, index_train_size=1000)  # a shortlist of the whole bank
        index = FaissIndex(vectors, labels, 1, config, offsets=offsets)
        sims, rows = index.search(queries, 5)
        np.testing.assert_array_equal(rows, want_rows)
        np.testing.assert_allclose(sims, want_sims, atol=1e-5)
    flat = Config(index="IVF8,Flat", refine=0, index_train_size=1000)
    assert FaissIndex(vectors, labels, 1, flat, offsets=offsets).refine == 1  # re-ranked even without Config.refine
    assert FaissIndex(vectors, labels, 1, flat).refine == 0
    with pytest.raises(InputError, match="need the bank's vectors"):
        FaissIndex(None, labels, 1, flat, make_faiss_index(vectors, flat), offsets=offsets)
