"""engine.ops (the compiled kernels) against their NumPy twins in engine.reference, on fresh random inputs and edge cases.

Each test draws a new seed and prints it, so a failure shows the seed that reproduces it.
"""

from __future__ import annotations

import numpy as np
import pytest

from engine import ops
from engine.errors import InputError
from engine.reference import mask_nms_raster_reference, soft_mask_pool_reference

pytestmark = pytest.mark.skipif(ops._C is None, reason="engine._C is not built")


@pytest.fixture
def rng():
    seed = int(np.random.SeedSequence().entropy % (2**63))
    print(f"rng seed = {seed}")
    return np.random.default_rng(seed)


def random_masks(rng, count, height, width, dtype=bool):
    """A mix of blobs (rectangles with ragged edges), speckle, empty, full and single-pixel masks."""
    masks = np.zeros((count, height, width), bool)
    for n in range(count):
        kind = rng.integers(0, 10)
        if kind == 0:
            continue  # empty
        if kind == 1:
            masks[n] = True
        elif kind == 2:
            masks[n, rng.integers(height), rng.integers(width)] = True
        elif kind == 3:
            masks[n] = rng.random((height, width)) < rng.random()
        else:
            y0, x0 = rng.integers(0, height), rng.integers(0, width)
            y1, x1 = rng.integers(y0, height + 1), rng.integers(x0, width + 1)
            masks[n, y0:y1 + 1, x0:x1 + 1] = True
            masks[n] &= rng.random((height, width)) < 0.97  # ragged: not a clean rectangle
    return masks.astype(dtype)


def grid_of(height, width, stride):
    return -(-height // stride), -(-width // stride)


# ------------------------------------------------------------------------------------------------ soft_mask_pool

POOL_SHAPES = [  # (H, W, stride, D)
    (384, 512, 32, 208),
    (378, 504, 14, 384),
    (100, 130, 16, 1),
    (33, 47, 14, 7),
    (65, 64, 32, 64),
    (31, 29, 32, 5),  # smaller than one patch
    (1, 1, 16, 3),
    (227, 301, 14, 120),
]


@pytest.mark.parametrize("height,width,stride,dim", POOL_SHAPES)
@pytest.mark.parametrize("dtype", [bool, np.uint8])
def test_soft_mask_pool_matches_reference(rng, height, width, stride, dim, dtype):
    count = int(rng.integers(1, 12))
    features = rng.standard_normal((*grid_of(height, width, stride), dim)).astype(np.float32)
    masks = random_masks(rng, count, height, width, dtype)
    for normalize in (True, False):
        got = ops.soft_mask_pool(features, masks, stride, normalize=normalize)
        want = soft_mask_pool_reference(features, masks, stride, normalize=normalize)
        assert got.dtype == np.float32 and got.shape == (count, dim)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("stride", [14, 16, 32])
def test_soft_mask_pool_edge_masks(rng, stride):
    height, width, dim = 70, 95, 16
    features = rng.standard_normal((*grid_of(height, width, stride), dim)).astype(np.float32)
    masks = np.zeros((4, height, width), bool)
    y, x = int(rng.integers(height)), int(rng.integers(width))
    masks[1, y, x] = True  # one pixel
    masks[2] = True  # full
    masks[3, -1, -1] = True  # the corner patch is mostly padding
    got = ops.soft_mask_pool(features, masks, stride)
    np.testing.assert_allclose(got, soft_mask_pool_reference(features, masks, stride), rtol=1e-6, atol=1e-6)
    assert not got[0].any()  # empty mask: zero stays zero
    patch = features[y // stride, x // stride].astype(np.float64)
    np.testing.assert_allclose(got[1], patch / np.linalg.norm(patch), rtol=1e-5, atol=1e-6)
    # Unnormalised, a single pixel weighs 1/stride^2 against eps: the mean is (almost) the patch itself.
    raw = ops.soft_mask_pool(features, masks[1:2], stride, normalize=False)[0]
    np.testing.assert_allclose(raw, patch, rtol=1e-5, atol=1e-6)


def test_soft_mask_pool_zero_and_one_mask(rng):
    features = rng.standard_normal((3, 4, 9)).astype(np.float32)
    empty = ops.soft_mask_pool(features, np.zeros((0, 40, 60), bool), 16)
    assert empty.shape == (0, 9) and empty.dtype == np.float32
    one = random_masks(rng, 1, 40, 60)
    np.testing.assert_allclose(ops.soft_mask_pool(features, one, 16), soft_mask_pool_reference(features, one, 16),
                               rtol=1e-6, atol=1e-6)


def test_soft_mask_pool_zero_features_stay_zero():
    features = np.zeros((2, 2, 5), np.float32)
    masks = np.ones((2, 20, 20), bool)
    assert not ops.soft_mask_pool(features, masks, 16).any()


def test_soft_mask_pool_non_contiguous_dtypes_and_threads(rng):
    height, width, stride, dim = 90, 75, 14, 24
    grid = grid_of(height, width, stride)
    base = rng.standard_normal((dim, *grid))
    features = base.transpose(1, 2, 0)  # float64 and not contiguous
    masks = random_masks(rng, 10, height, 2 * width)[:, :, ::2]  # a strided view
    want = soft_mask_pool_reference(features.astype(np.float32), np.ascontiguousarray(masks), stride)
    for threads in (0, 1, 2):
        got = ops.soft_mask_pool(features, masks, stride, num_threads=threads)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_soft_mask_pool_accepts_cpu_torch_tensors(rng):
    torch = pytest.importorskip("torch")
    features = rng.standard_normal((3, 3, 8)).astype(np.float32)
    masks = random_masks(rng, 5, 40, 33)
    got = ops.soft_mask_pool(torch.from_numpy(features), torch.from_numpy(masks), 14)
    np.testing.assert_allclose(got, soft_mask_pool_reference(features, masks, 14), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case,pattern", [
    ("features_int", "features must be floating point"),
    ("features_2d", r"features must be \(h, w, D\)"),
    ("masks_float", "masks must be bool or uint8"),
    ("masks_2d", r"masks must be \(N, H, W\)"),
    ("masks_empty_image", "nonzero height and width"),
    ("grid_floor", r"does not match masks of 40x50 at stride 16: expected .*\(3, 4\)"),
    ("grid_extra", r"expected .*\(3, 4\)"),
    ("stride_zero", "stride must be >= 1"),
    ("stride_float", "stride must be an integer"),
    ("stride_bool", "stride must be an integer"),
    ("eps_nan", "eps must not be NaN"),
    ("threads_negative", "num_threads must be >= 0"),
])
def test_soft_mask_pool_bad_inputs(case, pattern):
    features = np.zeros((3, 4, 8), np.float32)  # 40x50 at stride 16 -> 3x4
    masks = np.zeros((2, 40, 50), bool)
    stride, kwargs = 16, {}
    if case == "features_int":
        features = features.astype(np.int32)
    elif case == "features_2d":
        features = features[0]
    elif case == "masks_float":
        masks = masks.astype(np.float32)
    elif case == "masks_2d":
        masks = masks[0]
    elif case == "masks_empty_image":
        masks = np.zeros((2, 0, 50), bool)
    elif case == "grid_floor":
        features = np.zeros((2, 3, 8), np.float32)
    elif case == "grid_extra":
        features = np.zeros((3, 5, 8), np.float32)
    elif case == "stride_zero":
        stride = 0
    elif case == "stride_float":
        stride = 16.0
    elif case == "stride_bool":
        stride = True
    elif case == "eps_nan":
        kwargs["eps"] = float("nan")
    elif case == "threads_negative":
        kwargs["num_threads"] = -1
    with pytest.raises(InputError, match=pattern):
        ops.soft_mask_pool(features, masks, stride, **kwargs)


# ----------------------------------------------------------------------------------------------- mask_nms_raster


def assert_nms_equal(got, want):
    keep, label_map, owner = got
    assert keep.dtype == np.bool_ and label_map.dtype == np.int32 and owner.dtype == np.int32
    np.testing.assert_array_equal(keep, want[0])
    np.testing.assert_array_equal(label_map, want[1])
    np.testing.assert_array_equal(owner, want[2])


@pytest.mark.parametrize("count,height,width,num_classes", [
    (1, 20, 30, 1),
    (5, 33, 47, 2),
    (30, 64, 80, 3),
    (60, 97, 61, 1),  # one class only
    (40, 128, 96, 20),
    (25, 1, 200, 2),  # one row: words straddle masks' starts
    (12, 9, 7, 2),  # fewer pixels than one packed word
])
@pytest.mark.parametrize("dtype", [bool, np.uint8])
def test_mask_nms_raster_matches_reference(rng, count, height, width, num_classes, dtype):
    masks = random_masks(rng, count, height, width, dtype)
    classes = rng.integers(1, num_classes + 1, count)
    # Coarse scores make ties common; ties must fall back to index order.
    scores = np.round(rng.random(count), 1)
    for threshold in (0.0, 0.4, float(rng.random()), 1.0):
        background = int(rng.integers(-1, 256))
        got = ops.mask_nms_raster(masks, classes, scores, threshold, background=background)
        assert_nms_equal(got, mask_nms_raster_reference(masks, classes, scores, threshold, background))


def test_mask_nms_raster_many_overlapping_masks(rng):
    """Jittered copies of a few objects: lots of same-class IoUs near the threshold."""
    height, width = 120, 160
    objects = random_masks(rng, 4, height, width)
    masks = []
    for n in range(80):
        dy, dx = rng.integers(-4, 5, 2)
        masks.append(np.roll(objects[n % 4], (dy, dx), axis=(0, 1)) & (rng.random((height, width)) < 0.95))
    masks = np.stack(masks)
    classes = rng.integers(0, 2, len(masks))
    scores = rng.random(len(masks)).astype(np.float32)
    for threshold in (0.3, 0.5, 0.7, 0.9):
        assert_nms_equal(ops.mask_nms_raster(masks, classes, scores, threshold),
                         mask_nms_raster_reference(masks, classes, scores, threshold))


def test_mask_nms_raster_no_masks():
    keep, label_map, owner = ops.mask_nms_raster(np.zeros((0, 6, 7), bool), [], [], 0.4, background=255)
    assert keep.shape == (0,) and keep.dtype == np.bool_
    assert label_map.shape == (6, 7) and (label_map == 255).all() and label_map.dtype == np.int32
    assert owner.shape == (6, 7) and (owner == -1).all()


def test_mask_nms_raster_ties_keep_index_order():
    masks = np.zeros((3, 4, 4), bool)
    masks[:, :2, :2] = True  # identical masks
    classes = np.array([5, 5, 7])
    scores = np.array([0.5, 0.5, 0.5])
    keep, label_map, owner = ops.mask_nms_raster(masks, classes, scores, 0.4)
    np.testing.assert_array_equal(keep, [True, False, True])  # same class: the first wins; another class stays
    assert (label_map[:2, :2] == 5).all() and (owner[:2, :2] == 0).all()  # the other class's mask paints nothing
    assert (label_map[2:, :] == 0).all() and (owner[2:, :] == -1).all()
    # A higher score overrides index order.
    keep, label_map, owner = ops.mask_nms_raster(masks, classes, [0.5, 0.5, 0.6], 0.4)
    np.testing.assert_array_equal(keep, [True, False, True])
    assert (label_map[:2, :2] == 7).all() and (owner[:2, :2] == 2).all()
    keep, _, owner = ops.mask_nms_raster(masks, classes, [0.5, 0.9, 0.1], 0.4)
    np.testing.assert_array_equal(keep, [False, True, True])
    assert (owner[:2, :2] == 1).all()


def test_mask_nms_raster_iou_exactly_at_threshold_is_kept():
    masks = np.zeros((2, 2, 4), bool)
    masks[0, 0, :] = True  # 4 pixels
    masks[1, 0, :2] = True  # 2 pixels inside: IoU = 2 / 4 = 0.5
    classes, scores = [1, 1], [0.9, 0.8]
    for threshold, expected in ((0.5, [True, True]), (0.4999, [True, False]), (0.25, [True, False])):
        got = ops.mask_nms_raster(masks, classes, scores, threshold)
        np.testing.assert_array_equal(got[0], expected)
        assert_nms_equal(got, mask_nms_raster_reference(masks, np.array(classes), np.array(scores), threshold))
    # A threshold that is not a short binary fraction: IoU 1/3 against 1/3 computed the same way.
    masks = np.zeros((2, 1, 4), bool)
    masks[0, 0, :2] = True
    masks[1, 0, 1:3] = True  # IoU = 1 / 3
    keep, _, _ = ops.mask_nms_raster(masks, [0, 0], [1.0, 0.0], 1 / 3)
    np.testing.assert_array_equal(keep, [True, True])


def test_mask_nms_raster_empty_masks_have_iou_zero():
    masks = np.zeros((3, 5, 5), bool)
    masks[2, 1:3, 1:3] = True
    classes, scores = np.array([1, 1, 1]), np.array([0.9, 0.8, 0.7])
    for threshold in (0.0, -0.5):  # 0 > -0.5: with a negative threshold even disjoint masks suppress
        got = ops.mask_nms_raster(masks, classes, scores, threshold)
        assert_nms_equal(got, mask_nms_raster_reference(masks, classes, scores, threshold))
    np.testing.assert_array_equal(ops.mask_nms_raster(masks, classes, scores, 0.0)[0], [True, True, True])
    np.testing.assert_array_equal(ops.mask_nms_raster(masks, classes, scores, -0.5)[0], [True, False, False])


def test_mask_nms_raster_one_pixel_and_full_masks(rng):
    height, width = 17, 23
    masks = np.zeros((3, height, width), bool)
    y, x = int(rng.integers(height)), int(rng.integers(width))
    masks[0, y, x] = True
    masks[1] = True
    masks[2, y, x] = True
    classes, scores = np.array([3, 4, 3]), np.array([0.9, 0.5, 0.95])
    keep, label_map, owner = ops.mask_nms_raster(masks, classes, scores, 0.4)
    np.testing.assert_array_equal(keep, [False, True, True])  # mask 0 is mask 2 again (IoU 1), mask 2 scores higher
    assert label_map[y, x] == 3 and owner[y, x] == 2
    assert (label_map == 3).sum() == 1 and (owner == 1).sum() == height * width - 1


def test_mask_nms_raster_threads_and_torch_cpu(rng):
    torch = pytest.importorskip("torch")
    masks = random_masks(rng, 20, 50, 70)
    classes = rng.integers(0, 3, 20)
    scores = rng.random(20)
    want = mask_nms_raster_reference(masks, classes, scores, 0.4)
    for threads in (1, 2):
        assert_nms_equal(ops.mask_nms_raster(masks, classes, scores, 0.4, num_threads=threads), want)
    assert_nms_equal(ops.mask_nms_raster(torch.from_numpy(masks), torch.from_numpy(classes),
                                         torch.from_numpy(scores), 0.4), want)


@pytest.mark.parametrize("case,pattern", [
    ("masks_float", "masks must be bool or uint8"),
    ("masks_2d", r"masks must be \(N, H, W\)"),
    ("classes_length", r"classes must be \(3,\)"),
    ("classes_float", "classes must be integers"),
    ("classes_int64_overflow", "classes must fit in int32"),
    ("scores_length", r"scores must be \(3,\)"),
    ("scores_nan", "scores must be finite"),
    ("scores_str", "scores must be real numbers"),
    ("threshold_nan", "iou_threshold must not be NaN"),
    ("threshold_str", "iou_threshold must be a real number"),
    ("background_float", "background must be an integer"),
    ("background_overflow", "background must fit in int32"),
])
def test_mask_nms_raster_bad_inputs(case, pattern):
    masks = np.zeros((3, 8, 9), bool)
    classes, scores = np.array([1, 2, 3]), np.array([0.1, 0.2, 0.3])
    threshold, kwargs = 0.4, {}
    if case == "masks_float":
        masks = masks.astype(np.float64)
    elif case == "masks_2d":
        masks = masks[0]
    elif case == "classes_length":
        classes = classes[:2]
    elif case == "classes_float":
        classes = classes.astype(np.float32)
    elif case == "classes_int64_overflow":
        classes = np.array([1, 2, 2**40])
    elif case == "scores_length":
        scores = scores[:1]
    elif case == "scores_nan":
        scores = np.array([0.1, np.nan, 0.3])
    elif case == "scores_str":
        scores = np.array(["a", "b", "c"])
    elif case == "threshold_nan":
        threshold = float("nan")
    elif case == "threshold_str":
        threshold = "high"
    elif case == "background_float":
        kwargs["background"] = 0.5
    elif case == "background_overflow":
        kwargs["background"] = 2**31
    with pytest.raises(InputError, match=pattern):
        ops.mask_nms_raster(masks, classes, scores, threshold, **kwargs)


def test_cuda_queries_do_not_crash():
    assert isinstance(ops.has_cuda(), bool)
    assert ops._C.cuda_device_count() >= 0
    assert isinstance(ops.cuda_available(), bool)


def test_cuda_tensors_without_cuda_build_say_so():
    torch = pytest.importorskip("torch")
    if ops.has_cuda():
        pytest.skip("engine._C has CUDA kernels")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device to make a CUDA tensor on")
    masks = torch.zeros((1, 4, 4), dtype=torch.bool, device="cuda")
    with pytest.raises(InputError, match="built without CUDA"):
        ops.mask_nms_raster(masks, [0], [1.0], 0.4)


# ------------------------------------------------------------------------------------------------------- CUDA


@pytest.mark.gpu
@pytest.mark.parametrize("height,width,stride,dim", POOL_SHAPES)
def test_soft_mask_pool_cuda_matches_reference(rng, height, width, stride, dim):
    import torch

    count = int(rng.integers(1, 12))
    features = rng.standard_normal((*grid_of(height, width, stride), dim)).astype(np.float32)
    masks = random_masks(rng, count, height, width)
    for dtype in (torch.bool, torch.uint8):
        for normalize in (True, False):
            got = ops.soft_mask_pool(torch.from_numpy(features).cuda(), torch.from_numpy(masks).to("cuda", dtype),
                                     stride, normalize=normalize)
            assert got.is_cuda and got.dtype == torch.float32 and tuple(got.shape) == (count, dim)
            want = soft_mask_pool_reference(features, masks, stride, normalize=normalize)
            np.testing.assert_allclose(got.cpu().numpy(), want, rtol=1e-6, atol=1e-6)


@pytest.mark.gpu
def test_soft_mask_pool_cuda_edges_and_errors(rng):
    import torch

    features = torch.from_numpy(rng.standard_normal((3, 4, 16)).astype(np.float32)).cuda()
    empty = ops.soft_mask_pool(features, torch.zeros((0, 40, 50), dtype=torch.bool, device="cuda"), 16)
    assert tuple(empty.shape) == (0, 16) and empty.is_cuda
    masks = torch.zeros((2, 40, 50), dtype=torch.bool, device="cuda")
    masks[1, 39, 49] = True
    got = ops.soft_mask_pool(features, masks, 16).cpu().numpy()
    want = soft_mask_pool_reference(features.cpu().numpy(), masks.cpu().numpy(), 16)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    with pytest.raises(InputError, match="must be float32"):
        ops.soft_mask_pool(features.double(), masks, 16)
    with pytest.raises(InputError, match="does not match"):
        ops.soft_mask_pool(features, masks, 14)
    with pytest.raises(InputError, match="features must be a CUDA tensor"):
        ops.soft_mask_pool(features.cpu(), masks, 16)
    with pytest.raises(InputError, match="masks must be bool or uint8"):
        ops.soft_mask_pool(features, masks.float(), 16)


@pytest.mark.gpu
@pytest.mark.parametrize("count,height,width,num_classes", [
    (0, 20, 30, 1), (1, 20, 30, 1), (30, 64, 80, 3), (60, 97, 61, 1), (200, 384, 512, 20), (12, 9, 7, 2)])
def test_mask_nms_raster_cuda_matches_reference(rng, count, height, width, num_classes):
    import torch

    masks = random_masks(rng, count, height, width)
    classes = rng.integers(1, num_classes + 1, count)
    scores = np.round(rng.random(count), 1)
    for threshold in (0.0, 0.4, float(rng.random()), -0.5):
        for dtype in (torch.bool, torch.uint8):
            got = ops.mask_nms_raster(torch.from_numpy(masks).to("cuda", dtype), torch.from_numpy(classes).cuda(),
                                      scores, threshold, background=255)
            assert all(t.is_cuda for t in got)
            assert got[0].dtype == torch.bool and got[1].dtype == torch.int32 and got[2].dtype == torch.int32
            assert_nms_equal([t.cpu().numpy() for t in got],
                             mask_nms_raster_reference(masks, classes, scores, threshold, 255))


@pytest.mark.gpu
def test_mask_nms_raster_cuda_ties_threshold_and_stream(rng):
    import torch

    masks = np.zeros((3, 2, 4), bool)
    masks[0, 0, :] = True
    masks[1, 0, :2] = True  # IoU with mask 0 = 0.5 exactly
    masks[2, 0, :] = True  # identical to mask 0, same score: index order keeps mask 0
    classes, scores = np.array([1, 1, 1]), np.array([0.5, 0.4, 0.5])
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        got = ops.mask_nms_raster(torch.from_numpy(masks).cuda(), classes, scores, 0.5)
    stream.synchronize()
    np.testing.assert_array_equal(got[0].cpu().numpy(), [True, True, False])
    assert_nms_equal([t.cpu().numpy() for t in got], mask_nms_raster_reference(masks, classes, scores, 0.5))
    with pytest.raises(InputError, match="scores must be finite"):
        ops.mask_nms_raster(torch.from_numpy(masks).cuda(), classes, [0.1, float("nan"), 0.2], 0.5)
