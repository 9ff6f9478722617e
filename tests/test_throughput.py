"""Throughput machinery: segment_stream against segment_batch (order, bounded memory, errors), the FAISS-free exact
searches and torch vote against FAISS Flat and the NumPy vote, the GPU path against the CPU path (gpu-marked), and a
tiny run of bench/throughput.py. No timing assertions."""

import itertools
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine import Engine, FeatureBank, Proposals
from engine.errors import InputError, ModelError
from engine.models import ground_truth_proposals
from engine.retrieval import DeviceIndex, exact_search_numpy, retrieve, topk_inner_product, vote, vote_torch
from toy_models import ColorBackbone, scene, toy_bank

torch = pytest.importorskip("torch")
faiss = pytest.importorskip("faiss")

ROOT = Path(__file__).resolve().parents[1]
VOC = ROOT.parent / "shared" / "data" / "voc2012-mini"
@pytest.fixture(scope="module")
def bank():
    return toy_bank()


def scenes(count, rng=None):
    rng = rng or np.random.default_rng()
    combos = [(1, 2), (3,), (2, 3), (1,), (1, 3)]
    # two sizes, so batches mix padded sizes
    return [scene(96 if i % 3 else 80, 128, rng=rng, classes=combos[i % len(combos)]) for i in range(count)]


def assert_same(a, b):
    np.testing.assert_array_equal(a.label_map, b.label_map)
    np.testing.assert_array_equal(a.owner, b.owner)
    np.testing.assert_array_equal(a.classes, b.classes)
    np.testing.assert_array_equal(a.proposal_ids, b.proposal_ids)
    np.testing.assert_allclose(a.confidences, b.confidences, rtol=1e-6)
    assert (a.num_proposals, a.num_candidates, a.note) == (b.num_proposals, b.num_candidates, b.note)


# ------------------------------------------------------------------------------------------------- segment_stream


@pytest.mark.parametrize("batch_size", [1, 3, 4])
def test_stream_equals_batch_in_order(bank, batch_size):
    data = scenes(11)
    engine = Engine(bank, backbone=ColorBackbone())
    proposals = [ground_truth_proposals(label) for _, label in data]
    expected = engine.segment_batch([image for image, _ in data], proposals)
    got = list(engine.segment_stream(zip([image for image, _ in data], proposals), batch_size=batch_size))
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert_same(a, b)


def test_stream_decodes_paths_and_uses_the_proposer(bank, tmp_path):
    data = scenes(5)
    paths = []
    for i, (image, _) in enumerate(data):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(image).save(paths[-1])

    class LookupProposer:  # ground truth by image content: stands in for a real proposer
        name = "lookup"

        def propose(self, images):
            return [ground_truth_proposals(next(label for im, label in data if np.array_equal(im, image)))
                    for image in images]

    engine = Engine(bank, backbone=ColorBackbone(), proposer=LookupProposer())
    expected = engine.segment_batch([image for image, _ in data])
    # paths, str paths and arrays mixed; some with explicit proposals, some left to the proposer
    items = [paths[0], str(paths[1]), (data[2][0], None), (paths[3], ground_truth_proposals(data[3][1])), data[4][0]]
    got = list(engine.segment_stream(items, batch_size=2))
    for a, b in zip(got, expected):
        assert_same(a, b)
    assert {"decode", "proposer", "backbone", "smfa", "search", "vote", "nms_raster"} <= set(engine.times.seconds)


def test_stream_memory_is_bounded_and_close_stops_threads(bank):
    image, label = scene(classes=(1, 2))
    proposals = ground_truth_proposals(label)
    pulled = itertools.count()
    pulled_so_far = [0]

    def endless():
        while True:
            pulled_so_far[0] = next(pulled) + 1
            yield image, proposals

    before = threading.active_count()
    engine = Engine(bank, backbone=ColorBackbone())
    batch_size, prefetch = 2, 1
    stream = engine.segment_stream(endless(), batch_size=batch_size, prefetch=prefetch)
    first = next(stream)
    np.testing.assert_array_equal(first.label_map, label)
    time.sleep(0.5)  # let the stages fill every queue
    # loader's batch in hand + 3 queues + one batch in each of two stages + the batch being yielded
    bound = batch_size * (3 * prefetch + 4)
    assert 0 < pulled_so_far[0] <= bound
    stream.close()
    deadline = time.time() + 5
    while threading.active_count() > before and time.time() < deadline:
        time.sleep(0.05)
    assert threading.active_count() == before


def test_stream_raises_the_bad_input_and_stops(bank):
    data = scenes(4)
    items = [(image, ground_truth_proposals(label)) for image, label in data]
    items[2] = (data[2][0][..., 0], items[2][1])  # grayscale
    engine = Engine(bank, backbone=ColorBackbone())
    stream = engine.segment_stream(items, batch_size=2)
    assert len([next(stream), next(stream)]) == 2
    with pytest.raises(InputError, match="grayscale"):
        next(stream)
    with pytest.raises(InputError, match="prefetch"):
        list(engine.segment_stream(items, prefetch=0))


def test_empty_stream_and_no_candidates(bank):
    engine = Engine(bank, backbone=ColorBackbone())
    assert list(engine.segment_stream([])) == []
    image, _ = scene()
    result = next(engine.segment_stream([(image, Proposals.empty(*image.shape[:2]))]))
    assert "no proposals" in result.note and not result.label_map.any()


# ------------------------------------------------------------------------------------------------------- search


def normalised(rng, rows, dim=64):
    x = rng.standard_normal((rows, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("chunk_rows", [7, 100, 1 << 18])
def test_torch_topk_equals_faiss_flat_on_cpu_tensors(chunk_rows):
    rng = np.random.default_rng()
    vectors, queries = normalised(rng, 777), normalised(rng, 40)
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    for k in (1, 5, 25, 777, 1000):
        want_sims, want_rows = index.search(queries, min(k, len(vectors)))
        sims, rows = topk_inner_product(torch.from_numpy(queries), torch.from_numpy(vectors), k, chunk_rows)
        assert_same_neighbours(queries, vectors, sims.numpy(), rows.numpy(), want_sims, want_rows)
        np_sims, np_rows = exact_search_numpy(queries, vectors, k)
        assert_same_neighbours(queries, vectors, np_sims, np_rows, want_sims, want_rows)


def assert_same_neighbours(queries, vectors, sims, rows, want_sims, want_rows, atol=1e-5):
    """Equal ranked lists, except that two neighbours whose similarities differ by float rounding only (different
    summation orders in different GEMMs) may swap: there the exact similarity of our row must equal FAISS's."""
    np.testing.assert_allclose(sims, want_sims, atol=atol)
    swapped = rows != want_rows
    exact = np.einsum("qd,qkd->qk", queries.astype(np.float64), vectors.astype(np.float64)[rows])
    np.testing.assert_allclose(exact[swapped], want_sims[swapped], atol=atol)
    assert swapped.mean() < 0.01


def test_exact_ties_follow_bank_order_whatever_the_chunking():
    rng = np.random.default_rng()
    # small integers: every product and sum is exact in float32, so duplicates tie exactly in any GEMM
    vectors = np.repeat(rng.integers(-3, 4, (30, 16)).astype(np.float32), 4, axis=0)
    queries = torch.from_numpy(rng.integers(-3, 4, (9, 16)).astype(np.float32))
    reference = topk_inner_product(queries, torch.from_numpy(vectors), 10, chunk_rows=1 << 18)
    for chunk_rows in (1, 5, 13):
        sims, rows = topk_inner_product(queries, torch.from_numpy(vectors), 10, chunk_rows)
        np.testing.assert_array_equal(rows.numpy(), reference[1].numpy())
    # within each run of equal similarities the rows ascend
    sims, rows = reference
    same = sims[:, 1:] == sims[:, :-1]
    assert bool((rows[:, 1:] > rows[:, :-1])[same].all())


def test_topk_empty_and_bad_shapes():
    sims, rows = topk_inner_product(torch.zeros((0, 8)), torch.zeros((5, 8)), 3)
    assert sims.shape == (0, 3) and rows.dtype == torch.int64
    with pytest.raises(InputError, match="expected"):
        topk_inner_product(torch.zeros((2, 8)), torch.zeros((5, 7)), 3)


@pytest.mark.parametrize("method", ["count", "balanced"])
def test_vote_torch_equals_vote(method):
    rng = np.random.default_rng()
    for _ in range(10):
        queries, k, classes = int(rng.integers(1, 50)), int(rng.integers(1, 30)), int(rng.integers(1, 8))
        labels = rng.integers(-1, classes, (queries, k))
        sims = np.round(rng.random((queries, k)), 1).astype(np.float32)  # rounded: ties in the sums too
        counts = rng.integers(0, 20, classes)
        want = vote(sims, labels, classes, method, counts)
        got = vote_torch(torch.from_numpy(sims), torch.from_numpy(labels), classes, method, counts)
        np.testing.assert_array_equal(got[0].numpy(), want[0])
        np.testing.assert_allclose(got[1].numpy(), want[1], rtol=1e-6)


def test_device_index_on_cpu_equals_retrieve(bank):
    rng = np.random.default_rng()
    queries = rng.standard_normal((30, bank.dim)).astype(np.float32)
    index = DeviceIndex(bank, "cpu", chunk_rows=4)
    assert index.backend == "torch-topk"
    for method in ("count", "balanced"):
        want = retrieve(bank, queries, 3, method)
        got = index.retrieve(torch.from_numpy(queries), 3, method)
        np.testing.assert_array_equal(got[0].numpy(), want[0])
        np.testing.assert_allclose(got[1].numpy(), want[1], rtol=1e-5)


def test_cuda_device_refused_clearly_without_a_gpu(bank):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ModelError, match="no CUDA GPU"):
        Engine(bank, backbone=ColorBackbone(), device="cuda")
    with pytest.raises(InputError, match="device must be"):
        Engine(bank, backbone=ColorBackbone(), device="tpu")


# ------------------------------------------------------------------------------------------------------- GPU path


@pytest.mark.gpu
def test_gpu_topk_equals_cpu():
    rng = np.random.default_rng()
    vectors, queries = normalised(rng, 5000), normalised(rng, 64)
    cpu = topk_inner_product(torch.from_numpy(queries), torch.from_numpy(vectors), 25)
    gpu = topk_inner_product(torch.from_numpy(queries).cuda(), torch.from_numpy(vectors).cuda(), 25, 1000)
    np.testing.assert_array_equal(gpu[1].cpu().numpy(), cpu[1].numpy())
    np.testing.assert_allclose(gpu[0].cpu().numpy(), cpu[0].numpy(), atol=1e-5)


@pytest.mark.gpu
def test_gpu_engine_equals_cpu_engine_on_toy_scenes(bank):
    data = scenes(7)
    proposals = [ground_truth_proposals(label) for _, label in data]
    images = [image for image, _ in data]
    cpu = Engine(bank, backbone=ColorBackbone()).segment_batch(images, proposals)
    gpu_engine = Engine(bank, backbone=ColorBackbone(), device="cuda")
    for a, b in zip(gpu_engine.segment_batch(images, proposals), cpu):
        assert_same(a, b)
    for a, b in zip(gpu_engine.segment_stream(zip(images, proposals), batch_size=3), cpu):
        assert_same(a, b)


@pytest.fixture(scope="module")
def voc_bank():
    if not VOC.is_dir():
        pytest.skip(f"no {VOC}")
    from engine.data import VOCDataset
    from engine.models import create_backbone

    backbone = create_backbone("effnet-lite2/block19")
    train = VOCDataset(VOC, "train")
    return FeatureBank.build([train[i] for i in range(16)], backbone, train.class_names, progress=False), backbone


@pytest.mark.gpu
def test_gpu_label_maps_equal_cpu_on_real_images(voc_bank):
    from engine.data import VOCDataset

    bank, backbone = voc_bank
    val = VOCDataset(VOC, "val")
    samples = [val[i] for i in range(8)]
    images, proposals = [s.image for s in samples], [ground_truth_proposals(s.mask) for s in samples]
    cpu = Engine(bank, backbone=backbone).segment_batch(images, proposals)
    # the same (onnxruntime CPU) features through the GPU post-processing: identical results
    same_features = Engine(bank, backbone=backbone, device="cuda").segment_batch(images, proposals)
    for a, b in zip(same_features, cpu):
        assert_same(a, b)
    # the whole GPU path (torch CUDA backbone, fp32 without TF32): label maps identical
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    gpu = Engine(bank, device="cuda")
    assert gpu.describe()["runtime"]["runtime"] == "torch"
    for a, b in zip(gpu.segment_batch(images, proposals), cpu):
        np.testing.assert_array_equal(a.label_map, b.label_map)


# ------------------------------------------------------------------------------------------------------- bench


@pytest.mark.skipif(not VOC.is_dir(), reason="needs ../shared/data/voc2012-mini")
def test_throughput_benchmark_tiny_run_writes_json(tmp_path):
    out = tmp_path / "throughput.json"
    # no PYTHONPATH: the script must find the installed engine (a clean clone's sources have no compiled _C)
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "throughput.py"), "--repeats", "1", "--limit", "4",
                          "--bank-limit", "6", "--no-kernels", "--json", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["images_per_sec"] > 0 and report["reference_images_per_sec"] > 0
    assert {"decode", "backbone", "proposer", "smfa", "search", "vote", "nms_raster"} <= set(report["stages"])
    assert report["device"] == "cpu" and report["backend"]
    assert "images/s" in run.stdout
