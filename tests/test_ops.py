"""engine.ops (the compiled kernels, regions as atoms + members) against their NumPy twins in engine.reference (the
equations on the materialised masks), on random atom partitions drawn from fixed seeds, on edge cases, and their
input checks."""

from __future__ import annotations

import numpy as np
import pytest

from engine import ops, reference
from engine.errors import InputError
from engine.reference import mask_nms_raster_reference, materialise, soft_mask_pool_reference
from engine.regions import Proposals

pytestmark = pytest.mark.skipif(ops._C is None, reason="engine._C is not built")


def random_atoms(rng, height, width):
    """An (H, W) atom map and the number of atoms A (some ids may be unused: zero-area atoms): speckle, blocks,
    the cells of overlapping rectangles, or a single atom."""
    kind = int(rng.integers(0, 4))
    if kind == 0:  # speckle: atoms of single pixels and ragged shapes
        count = int(rng.integers(1, 12))
        atoms = rng.integers(0, count, (height, width))
    elif kind == 1:  # blocks painted over each other
        count = int(rng.integers(1, 20))
        atoms = np.zeros((height, width), np.int64)
        for a in range(1, count):
            y0, x0 = rng.integers(0, height), rng.integers(0, width)
            atoms[y0:rng.integers(y0, height) + 1, x0:rng.integers(x0, width) + 1] = a
    elif kind == 2:  # the arrangement of random rectangles (as Proposals.from_masks makes it)
        masks = np.zeros((int(rng.integers(1, 8)), height, width), bool)
        for mask in masks:
            y0, x0 = rng.integers(0, height), rng.integers(0, width)
            mask[y0:rng.integers(y0, height) + 1, x0:rng.integers(x0, width) + 1] = True
        atoms = Proposals.from_masks(masks, np.ones(len(masks))).atoms
        count = int(atoms.max()) + 1
    else:
        atoms, count = np.zeros((height, width), np.int64), 1
    return atoms.astype(np.int32), count + int(rng.integers(0, 3))  # a few ids no pixel has


def random_members(rng, count, num_atoms, dtype=bool):
    """(N, A) membership: random subsets, plus empty, full and single-atom regions."""
    members = rng.random((count, num_atoms)) < rng.random((count, 1))
    for n in range(count):
        kind = int(rng.integers(0, 8))
        if kind == 0:
            members[n] = False
        elif kind == 1:
            members[n] = True
        elif kind == 2:
            members[n] = False
            members[n, rng.integers(num_atoms)] = True
    return members.astype(dtype)


def grid_of(height, width, stride):
    return -(-height // stride), -(-width // stride)


def assert_nms_equal(got, want):
    keep, label_map, owner = got
    assert keep.dtype == np.bool_ and label_map.dtype == np.int32 and owner.dtype == np.int32
    np.testing.assert_array_equal(keep, want[0])
    np.testing.assert_array_equal(label_map, want[1])
    np.testing.assert_array_equal(owner, want[2])


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
@pytest.mark.parametrize("pooling", ["soft", "hard"])
def test_soft_mask_pool_matches_reference(rng, height, width, stride, dim, pooling):
    for _ in range(3):
        atoms, num_atoms = random_atoms(rng, height, width)
        count = int(rng.integers(1, 12))
        members = random_members(rng, count, num_atoms, dtype=[bool, np.uint8][int(rng.integers(2))])
        features = rng.standard_normal((*grid_of(height, width, stride), dim)).astype(np.float32)
        masks = materialise(atoms, members)
        for normalize in (True, False):
            got = ops.soft_mask_pool(features, atoms, members, stride, pooling, normalize=normalize)
            want = soft_mask_pool_reference(features, masks, stride, normalize=normalize, pooling=pooling)
            assert got.dtype == np.float32 and got.shape == (count, dim)
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
            # the reference module's twin takes the ops' arguments
            twin = reference.soft_mask_pool(features, atoms, members, stride, pooling, normalize=normalize)
            np.testing.assert_array_equal(twin, want)


@pytest.mark.parametrize("stride", [14, 16, 32])
def test_soft_mask_pool_empty_one_pixel_full_and_corner_regions(rng, stride):
    height, width, dim = 70, 95, 16
    features = rng.standard_normal((*grid_of(height, width, stride), dim)).astype(np.float32)
    y, x = int(rng.integers(height)), int(rng.integers(width))
    atoms = np.zeros((height, width), np.int32)
    atoms[y, x] = 1  # a one-pixel atom
    atoms[-1, -1] = 2  # the corner patch is mostly padding
    members = np.zeros((5, 4), bool)  # atom 3 has no pixel
    members[1, 1] = True  # one pixel
    members[2, :3] = True  # the whole image
    members[3, 2] = True  # the corner pixel
    members[4, 3] = True  # a region of zero area
    got = ops.soft_mask_pool(features, atoms, members, stride)
    np.testing.assert_allclose(got, soft_mask_pool_reference(features, materialise(atoms, members), stride),
                               rtol=1e-6, atol=1e-6)
    assert not got[0].any() and not got[4].any()  # empty regions: zero stays zero
    patch = features[y // stride, x // stride].astype(np.float64)
    np.testing.assert_allclose(got[1], patch / np.linalg.norm(patch), rtol=1e-5, atol=1e-6)
    # unnormalised, a single pixel weighs 1/stride^2 against eps: the mean is (almost) the patch itself
    raw = ops.soft_mask_pool(features, atoms, members[1:2], stride, normalize=False)[0]
    np.testing.assert_allclose(raw, patch, rtol=1e-5, atol=1e-6)


def test_soft_mask_pool_zero_and_one_region(rng):
    features = rng.standard_normal((3, 4, 9)).astype(np.float32)
    atoms, num_atoms = random_atoms(rng, 40, 60)
    none = ops.soft_mask_pool(features, atoms, np.zeros((0, num_atoms), bool), 16)
    assert none.shape == (0, 9) and none.dtype == np.float32
    one = random_members(rng, 1, num_atoms)
    np.testing.assert_allclose(ops.soft_mask_pool(features, atoms, one, 16),
                               soft_mask_pool_reference(features, materialise(atoms, one), 16), rtol=1e-6, atol=1e-6)


def test_soft_mask_pool_zero_features_stay_zero():
    features = np.zeros((2, 2, 5), np.float32)
    assert not ops.soft_mask_pool(features, np.zeros((20, 20), np.int32), np.ones((2, 1), bool), 16).any()


def test_soft_mask_pool_hard_pooling_is_the_mean_of_patches_whose_centre_is_covered(rng):
    stride = 8
    features = rng.normal(size=(5, 7, 6)).astype(np.float32)  # image 37 x 53: the last patches are partly padding
    masks = rng.random((4, 37, 53)) > 0.5
    proposals = Proposals.from_masks(masks, np.ones(4))
    got = ops.soft_mask_pool(features, proposals.atoms, proposals.members, stride, "hard", normalize=False)
    for mask, vector in zip(masks, got):
        covered = np.zeros((5, 7), bool)
        for i in range(5):
            for j in range(7):
                y, x = i * stride + stride // 2, j * stride + stride // 2
                covered[i, j] = y < 37 and x < 53 and mask[y, x]
        want = features[covered].sum(0) / (covered.sum() + 1e-8)
        np.testing.assert_allclose(vector, want, atol=1e-5)


def test_soft_mask_pool_non_contiguous_dtypes_threads_and_torch(rng):
    height, width, stride, dim = 90, 75, 14, 24
    base = rng.standard_normal((dim, *grid_of(height, width, stride)))
    features = base.transpose(1, 2, 0)  # float64 and not contiguous
    wide, num_atoms = random_atoms(rng, height, 2 * width)
    atoms = wide[:, ::2]  # a strided view
    members = random_members(rng, 10, 2 * num_atoms, np.uint8)[:, ::2]
    want = soft_mask_pool_reference(features.astype(np.float32), materialise(atoms, members), stride)
    results = [ops.soft_mask_pool(features, atoms, members, stride, num_threads=t) for t in (0, 1, 2)]
    for got in results:
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(got, results[0])  # the summation order does not depend on the threads
    torch = pytest.importorskip("torch")
    got = ops.soft_mask_pool(torch.from_numpy(np.ascontiguousarray(features, np.float32)),
                             torch.from_numpy(np.ascontiguousarray(atoms)), torch.from_numpy(members.astype(bool)),
                             stride)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case,pattern", [
    ("features_int", "features must be floating point"),
    ("features_2d", r"features must be \(h, w, D\)"),
    ("atoms_float", r"atoms must be an \(H, W\) integer map"),
    ("atoms_3d", r"atoms must be an \(H, W\) integer map"),
    ("atoms_empty_image", "nonzero height and width"),
    ("atoms_negative", r"atom ids must lie in \[0, 3\).*got -1\.\.1"),
    ("atoms_too_large", r"atom ids must lie in \[0, 3\).*got 1\.\.3"),
    ("members_float", r"members must be an \(N, A\) bool matrix"),
    ("members_1d", r"members must be an \(N, A\) bool matrix"),
    ("members_no_atoms", r"atom ids must lie in \[0, 0\)"),
    ("grid_floor", r"features grid \(2, 3\) does not match an image of 40x50 at stride 16: expected .*\(3, 4\)"),
    ("grid_extra", r"expected .*\(3, 4\)"),
    ("stride_zero", "stride must be >= 1"),
    ("stride_float", "stride must be an integer"),
    ("stride_bool", "stride must be an integer"),
    ("eps_nan", "eps must not be NaN"),
    ("threads_negative", "num_threads must be >= 0"),
    ("pooling_unknown", "pooling must be one of"),
])
def test_soft_mask_pool_bad_inputs(case, pattern):
    features = np.zeros((3, 4, 8), np.float32)  # 40x50 at stride 16 -> 3x4
    atoms = np.zeros((40, 50), np.int32)
    atoms[:, 20:] = 1
    atoms[:, 40:] = 2
    members = np.ones((2, 3), bool)
    stride, kwargs = 16, {}
    if case == "features_int":
        features = features.astype(np.int32)
    elif case == "features_2d":
        features = features[0]
    elif case == "atoms_float":
        atoms = atoms.astype(np.float32)
    elif case == "atoms_3d":
        atoms = atoms[None]
    elif case == "atoms_empty_image":
        atoms = np.zeros((0, 50), np.int32)
    elif case == "atoms_negative":
        atoms = atoms - 1
    elif case == "atoms_too_large":
        atoms = atoms + 1
    elif case == "members_float":
        members = members.astype(np.float32)
    elif case == "members_1d":
        members = members[0]
    elif case == "members_no_atoms":
        members = np.zeros((2, 0), bool)
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
    elif case == "pooling_unknown":
        kwargs["pooling"] = "mean"
    with pytest.raises(InputError, match=pattern):
        ops.soft_mask_pool(features, atoms, members, stride, **kwargs)


# ----------------------------------------------------------------------------------------------- mask_nms_raster


@pytest.mark.parametrize("count,height,width,num_classes", [
    (1, 20, 30, 1),
    (5, 33, 47, 2),
    (30, 64, 80, 3),
    (60, 97, 61, 1),  # one class only
    (40, 128, 96, 20),
    (25, 1, 200, 2),  # one row
    (12, 9, 7, 2),  # a handful of pixels
])
def test_mask_nms_raster_matches_reference(rng, count, height, width, num_classes):
    for _ in range(3):
        atoms, num_atoms = random_atoms(rng, height, width)
        members = random_members(rng, count, num_atoms, dtype=[bool, np.uint8][int(rng.integers(2))])
        masks = materialise(atoms, members)
        classes = rng.integers(1, num_classes + 1, count)
        scores = np.round(rng.random(count), 1)  # coarse scores make ties common: they fall back to index order
        for threshold in (0.0, 0.4, float(rng.random()), 1.0):
            background = int(rng.integers(-1, 256))
            got = ops.mask_nms_raster(atoms, members, classes, scores, threshold, background=background)
            want = mask_nms_raster_reference(masks, classes, scores, threshold, background)
            assert_nms_equal(got, want)
            assert_nms_equal(reference.mask_nms_raster(atoms, members, classes, scores, threshold, background), want)


def test_mask_nms_raster_many_overlapping_regions(rng):
    """Jittered copies of a few objects: lots of same-class IoUs near the threshold, many atoms."""
    height, width = 120, 160
    objects = np.zeros((4, height, width), bool)
    for mask in objects:
        y0, x0 = rng.integers(0, height // 2), rng.integers(0, width // 2)
        mask[y0:y0 + rng.integers(10, height // 2), x0:x0 + rng.integers(10, width // 2)] = True
    masks = np.stack([np.roll(objects[n % 4], tuple(rng.integers(-4, 5, 2)), axis=(0, 1))
                      & (rng.random((height, width)) < 0.95) for n in range(80)])
    proposals = Proposals.from_masks(masks, np.ones(len(masks)))
    classes = rng.integers(0, 2, len(masks))
    scores = rng.random(len(masks)).astype(np.float32)
    for threshold in (0.3, 0.5, 0.7, 0.9):
        assert_nms_equal(ops.mask_nms_raster(proposals.atoms, proposals.members, classes, scores, threshold),
                         mask_nms_raster_reference(masks, classes, scores, threshold))


def test_mask_nms_raster_no_regions():
    keep, label_map, owner = ops.mask_nms_raster(np.zeros((6, 7), np.int32), np.zeros((0, 1), bool), [], [], 0.4,
                                                 background=255)
    assert keep.shape == (0,) and keep.dtype == np.bool_
    assert label_map.shape == (6, 7) and (label_map == 255).all() and label_map.dtype == np.int32
    assert owner.shape == (6, 7) and (owner == -1).all()


def test_mask_nms_raster_one_region():
    atoms = np.zeros((4, 5), np.int32)
    atoms[1:3, 1:4] = 1
    keep, label_map, owner = ops.mask_nms_raster(atoms, [[False, True]], [7], [0.3], 0.4)
    assert keep.tolist() == [True]
    np.testing.assert_array_equal(label_map, np.where(atoms == 1, 7, 0))
    np.testing.assert_array_equal(owner, np.where(atoms == 1, 0, -1))


def test_mask_nms_raster_ties_keep_index_order():
    atoms = np.zeros((4, 4), np.int32)
    atoms[:2, :2] = 1
    members = np.array([[False, True]] * 3)  # three identical regions
    classes = np.array([5, 5, 7])
    keep, label_map, owner = ops.mask_nms_raster(atoms, members, classes, [0.5, 0.5, 0.5], 0.4)
    np.testing.assert_array_equal(keep, [True, False, True])  # same class: the first wins; another class stays
    assert (label_map[:2, :2] == 5).all() and (owner[:2, :2] == 0).all()  # the other class's region paints nothing
    assert (label_map[2:, :] == 0).all() and (owner[2:, :] == -1).all()
    # a higher score overrides index order
    keep, label_map, owner = ops.mask_nms_raster(atoms, members, classes, [0.5, 0.5, 0.6], 0.4)
    np.testing.assert_array_equal(keep, [True, False, True])
    assert (label_map[:2, :2] == 7).all() and (owner[:2, :2] == 2).all()
    keep, _, owner = ops.mask_nms_raster(atoms, members, classes, [0.5, 0.9, 0.1], 0.4)
    np.testing.assert_array_equal(keep, [False, True, True])
    assert (owner[:2, :2] == 1).all()


def test_mask_nms_raster_iou_exactly_at_threshold_is_kept():
    atoms = np.array([[0, 0, 1, 1], [2, 2, 2, 2]], np.int32)
    members = np.array([[True, True, False], [True, False, False]])  # 4 pixels and 2 inside: IoU = 0.5
    classes, scores = np.array([1, 1]), np.array([0.9, 0.8])
    for threshold, expected in ((0.5, [True, True]), (0.4999, [True, False]), (0.25, [True, False])):
        got = ops.mask_nms_raster(atoms, members, classes, scores, threshold)
        np.testing.assert_array_equal(got[0], expected)
        assert_nms_equal(got, mask_nms_raster_reference(materialise(atoms, members), classes, scores, threshold))
    # a threshold that is not a short binary fraction: IoU 1/3 against 1/3 computed the same way
    atoms = np.array([[0, 1, 2, 3]], np.int32)
    members = np.array([[True, True, False, False], [False, True, True, False]])
    keep, _, _ = ops.mask_nms_raster(atoms, members, [0, 0], [1.0, 0.0], 1 / 3)
    np.testing.assert_array_equal(keep, [True, True])


def test_mask_nms_raster_empty_regions_have_iou_zero():
    atoms = np.zeros((5, 5), np.int32)
    atoms[1:3, 1:3] = 1
    members = np.array([[False, False, True], [False, False, False], [False, True, False]])  # atom 2: no pixel
    classes, scores = np.array([1, 1, 1]), np.array([0.9, 0.8, 0.7])
    for threshold in (0.0, -0.5):  # 0 > -0.5: with a negative threshold even disjoint regions suppress
        got = ops.mask_nms_raster(atoms, members, classes, scores, threshold)
        assert_nms_equal(got, mask_nms_raster_reference(materialise(atoms, members), classes, scores, threshold))
    np.testing.assert_array_equal(ops.mask_nms_raster(atoms, members, classes, scores, 0.0)[0], [True, True, True])
    np.testing.assert_array_equal(ops.mask_nms_raster(atoms, members, classes, scores, -0.5)[0],
                                  [True, False, False])


def test_mask_nms_raster_one_pixel_and_full_regions(rng):
    height, width = 17, 23
    y, x = int(rng.integers(height)), int(rng.integers(width))
    atoms = np.zeros((height, width), np.int32)
    atoms[y, x] = 1
    members = np.array([[False, True], [True, True], [False, True]])
    classes, scores = np.array([3, 4, 3]), np.array([0.9, 0.5, 0.95])
    keep, label_map, owner = ops.mask_nms_raster(atoms, members, classes, scores, 0.4)
    np.testing.assert_array_equal(keep, [False, True, True])  # region 0 is region 2 again (IoU 1), 2 scores higher
    assert label_map[y, x] == 3 and owner[y, x] == 2
    assert (label_map == 3).sum() == 1 and (owner == 1).sum() == height * width - 1


def test_mask_nms_raster_threads_and_torch_cpu(rng):
    atoms, num_atoms = random_atoms(rng, 50, 70)
    members = random_members(rng, 20, num_atoms)
    classes = rng.integers(0, 3, 20)
    scores = rng.random(20)
    want = mask_nms_raster_reference(materialise(atoms, members), classes, scores, 0.4)
    for threads in (0, 1, 2):
        assert_nms_equal(ops.mask_nms_raster(atoms, members, classes, scores, 0.4, num_threads=threads), want)
    torch = pytest.importorskip("torch")
    assert_nms_equal(ops.mask_nms_raster(torch.from_numpy(atoms), torch.from_numpy(members),
                                         torch.from_numpy(classes), torch.from_numpy(scores), 0.4), want)


@pytest.mark.parametrize("case,pattern", [
    ("atoms_float", r"atoms must be an \(H, W\) integer map"),
    ("atoms_negative", r"atom ids must lie in \[0, 2\)"),
    ("atoms_too_large", r"atom ids must lie in \[0, 2\)"),
    ("members_float", r"members must be an \(N, A\) bool matrix"),
    ("members_3d", r"members must be an \(N, A\) bool matrix"),
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
    ("threads_negative", "num_threads must be >= 0"),
])
def test_mask_nms_raster_bad_inputs(case, pattern):
    atoms = np.zeros((8, 9), np.int32)
    atoms[4:] = 1
    members = np.array([[True, False], [False, True], [True, True]])
    classes, scores = np.array([1, 2, 3]), np.array([0.1, 0.2, 0.3])
    threshold, kwargs = 0.4, {}
    if case == "atoms_float":
        atoms = atoms.astype(np.float64)
    elif case == "atoms_negative":
        atoms = atoms - 1
    elif case == "atoms_too_large":
        atoms = atoms + 1
    elif case == "members_float":
        members = members.astype(np.float64)
    elif case == "members_3d":
        members = members[None]
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
    elif case == "threads_negative":
        kwargs["num_threads"] = -1
    with pytest.raises(InputError, match=pattern):
        ops.mask_nms_raster(atoms, members, classes, scores, threshold, **kwargs)


# ----------------------------------------------------------------------------------------------- merge_regions


def random_graph(rng, count, dim=6):
    """A connected random region graph (a chain plus random chords) with areas, features and colours."""
    edges = {(i, i + 1) for i in range(count - 1)}
    for _ in range(count):
        a, b = sorted(int(x) for x in rng.integers(0, count, 2))
        if a != b:
            edges.add((a, b))
    edges = np.array(sorted(edges), np.int64).reshape(-1, 2)
    area = rng.integers(1, 500, count).astype(np.float64)
    features = rng.standard_normal((count, dim)).astype(np.float32)
    colour = (rng.random((count, 3)) * 100).astype(np.float32)
    return edges, area, features, colour


def assert_same_tree(a, b):
    assert np.array_equal(a.parent, b.parent) and np.array_equal(a.snapshots, b.snapshots)
    assert np.array_equal(a.levels, b.levels)
    np.testing.assert_allclose(a.height, b.height, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(a.area, b.area)
    np.testing.assert_allclose(a.coherence, b.coherence, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("count", [2, 3, 17, 80])
@pytest.mark.parametrize("weights", [(1.0, 3.0), (0.0, 0.0), (2.5, 0.5)])
def test_merge_regions_matches_reference(rng, count, weights):
    edges, area, features, colour = random_graph(rng, count)
    levels = sorted({int(k) for k in rng.integers(1, count + 3, 3)}, reverse=True)
    assert_same_tree(ops.merge_regions(edges, area, features, colour, levels, *weights),
                     reference.merge_regions(edges, area, features, colour, levels, *weights))


def test_merge_regions_tree_facts(rng):
    edges, area, features, colour = random_graph(rng, 30)
    tree = ops.merge_regions(edges, area, features, colour, [20, 10, 1])
    count = 30
    assert len(tree.parent) == 2 * count - 1 and (tree.parent == -1).sum() == 1  # merged to one root
    for node in range(count, len(tree.parent)):  # a node's area is its children's, made higher than them
        children = np.flatnonzero(tree.parent == node)
        assert len(children) == 2 and tree.area[node] == tree.area[children].sum()
    assert np.all(tree.coherence[:count] == 1) and np.all((tree.coherence >= 0) & (tree.coherence <= 1))
    for level, snapshot in zip(tree.levels, tree.snapshots):
        assert len(np.unique(snapshot)) == level


def test_merge_regions_edge_cases(rng):
    edges, area, features, colour = random_graph(rng, 5)
    none = ops.merge_regions(np.zeros((0, 2)), area, features, colour, [3])  # no adjacency: nothing merges
    assert np.array_equal(none.snapshots[0], np.arange(5)) and len(none.parent) == 5
    more = ops.merge_regions(edges, area, features, colour, [9, 5])  # cuts above the leaf count: the leaves
    assert np.array_equal(more.snapshots, np.tile(np.arange(5), (2, 1)))
    one = ops.merge_regions(np.zeros((0, 2)), area[:1], features[:1], colour[:1], [1])
    assert one.snapshots.tolist() == [[0]] and one.parent.tolist() == [-1]
    empty = ops.merge_regions(np.zeros((0, 2)), np.zeros(0), np.zeros((0, 6)), np.zeros((0, 3)), [4])
    assert empty.snapshots.shape == (1, 0) and len(empty.parent) == 0
    # equal distances merge the smaller ids first
    tied = ops.merge_regions([[0, 1], [1, 2], [2, 3]], np.ones(4), np.ones((4, 2)), np.zeros((4, 3)), [3], 0.0, 0.0)
    assert tied.snapshots[0].tolist() == [4, 4, 2, 3]


@pytest.mark.parametrize("case, pattern", [
    (dict(edges=[[0, 0]]), "two different leaves"),
    (dict(edges=[[0, 9]]), "two different leaves"),
    (dict(area=[0.0, 1.0, 1.0]), "areas must be positive"),
    (dict(features=np.zeros((2, 4))), "one row per leaf"),
    (dict(levels=[0]), "levels must be >= 1"),
    (dict(features=np.full((3, 4), np.nan)), "finite"),
])
def test_merge_regions_bad_inputs(case, pattern):
    args = dict(edges=[[0, 1], [1, 2]], area=np.ones(3), features=np.ones((3, 4)), colour=np.zeros((3, 3)),
                levels=[2])
    args.update(case)
    with pytest.raises(InputError, match=pattern):
        ops.merge_regions(**args)


@pytest.mark.parametrize("groups", [(10,), (3, 5, 2), (1, 9)])
def test_soft_mask_pool_feature_groups_match_reference(rng, groups):
    atoms, num_atoms = random_atoms(rng, 37, 45)
    members = random_members(rng, 9, num_atoms)
    features = rng.standard_normal((*grid_of(37, 45, 8), 10)).astype(np.float32)
    ours = ops.soft_mask_pool(features, atoms, members, 8, groups=groups)
    theirs = reference.soft_mask_pool(features, atoms, members, 8, groups=groups)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)
    bounds = np.cumsum((0,) + groups)
    covered = np.linalg.norm(ours, axis=1) > 0
    for start, stop in zip(bounds[:-1], bounds[1:]):  # every layer weighs the same: equal part norms
        part = np.linalg.norm(ours[covered, start:stop], axis=1)
        np.testing.assert_allclose(part, 1 / np.sqrt(len(groups)), rtol=1e-4)


def test_soft_mask_pool_groups_must_sum_to_the_width(rng):
    atoms, num_atoms = random_atoms(rng, 8, 8)
    with pytest.raises(InputError, match="must sum to the feature width 10"):
        ops.soft_mask_pool(np.ones((1, 1, 10), np.float32), atoms, np.ones((1, num_atoms), bool), 8, groups=(4, 4))


# ------------------------------------------------------------------------------------------------- batched ops
# soft_mask_pool_batch and mask_nms_raster_batch (the CPU launchers of the bodies the CUDA launchers run) against
# the twins in engine.reference, on batches of images of different sizes, and the one call into engine._C a batch
# makes whatever its images and regions.

#: (H, W) of the images a batch draws from (without repeats): one pixel, one row, one column, sizes that are not
#: multiples of the strides used (1, 2, 7, 16), one that is, and larger ones
BATCH_SHAPES = [(1, 1), (1, 41), (37, 1), (2, 3), (13, 17), (16, 16), (29, 45), (50, 33), (64, 48), (71, 90)]
BATCH_STRIDES = [1, 2, 7, 16]


def superpixel_atoms(rng, height, width):
    """Blocky superpixel-like cells: the rectangles between random row and column cuts, their ids a random
    permutation (neighbours do not have neighbouring ids) drawn from a range with unused ids. Up to ~200 atoms, so
    memberships span several 64-bit words."""
    rows = np.unique(np.r_[0, rng.integers(1, height, int(rng.integers(0, 15))) if height > 1 else []])
    cols = np.unique(np.r_[0, rng.integers(1, width, int(rng.integers(0, 15))) if width > 1 else []])
    band_y = np.searchsorted(rows, np.arange(height), side="right") - 1
    band_x = np.searchsorted(cols, np.arange(width), side="right") - 1
    cells = len(rows) * len(cols)
    num_atoms = cells + int(rng.integers(0, 4))
    ids = rng.permutation(num_atoms)[:cells]
    return ids[band_y[:, None] * len(cols) + band_x[None, :]].astype(np.int32), num_atoms


def random_image_regions(rng, height, width, count):
    """An atom map (random ids or superpixel-like blocks) and `count` random regions of it."""
    atoms, num_atoms = (superpixel_atoms if rng.random() < 0.5 else random_atoms)(rng, height, width)
    return atoms, random_members(rng, count, num_atoms, dtype=[bool, np.uint8][int(rng.integers(2))])


def random_counts(rng, num_images):
    """Regions per image: often none or one, else up to 15."""
    return [int(rng.choice([0, 1, int(rng.integers(2, 16))])) for _ in range(num_images)]


def random_batch(rng, num_images, counts=None):
    """Atom maps and memberships of `num_images` images of different sizes (counts: regions per image)."""
    counts = random_counts(rng, num_images) if counts is None else counts
    shapes = [BATCH_SHAPES[i] for i in rng.choice(len(BATCH_SHAPES), num_images, replace=False)]
    pairs = [random_image_regions(rng, h, w, n) for (h, w), n in zip(shapes, counts)]
    return [a for a, _ in pairs], [m for _, m in pairs]


def random_features(rng, atoms, stride, dim):
    return [rng.standard_normal((*grid_of(*a.shape, stride), dim)).astype(np.float32) for a in atoms]


def random_groups(rng, dim):
    """Feature-group widths summing to dim (1 to 16 groups), or none."""
    if rng.random() < 0.3:
        return ()
    cuts = np.sort(rng.choice(np.arange(1, dim), min(int(rng.integers(0, 16)), dim - 1), replace=False))
    return tuple(int(g) for g in np.diff(np.r_[0, cuts, dim]))


@pytest.mark.parametrize("stride", BATCH_STRIDES)
@pytest.mark.parametrize("pooling", ["soft", "hard"])
@pytest.mark.parametrize("normalize", [True, False])
def test_soft_mask_pool_batch_matches_reference(rng, stride, pooling, normalize):
    for num_images in range(1, 7):
        for _ in range(2):
            atoms, members = random_batch(rng, num_images)
            dim = int(rng.integers(1, 40))
            features = random_features(rng, atoms, stride, dim)
            groups = random_groups(rng, dim)
            args = (stride, pooling, 1e-8, normalize, groups)
            got = ops.soft_mask_pool_batch(features, atoms, members, *args)
            assert got.dtype == np.float32 and got.shape == (sum(len(m) for m in members), dim)
            np.testing.assert_allclose(got, reference.soft_mask_pool_batch(features, atoms, members, *args),
                                       rtol=1e-5, atol=1e-5)
            # an image's vectors do not depend on the batch around it: the sums run in the same order
            singles = [ops.soft_mask_pool(f, a, m, *args) for f, a, m in zip(features, atoms, members)]
            np.testing.assert_array_equal(got, np.concatenate(singles))


def test_soft_mask_pool_batch_edge_cases(rng):
    dim, stride = 6, 7
    # no images at all
    empty = ops.soft_mask_pool_batch([], [], [], stride)
    assert empty.shape == (0, 0) and empty.dtype == np.float32
    np.testing.assert_array_equal(empty, reference.soft_mask_pool_batch([], [], [], stride))
    # every image without regions
    atoms, members = random_batch(rng, 5, counts=[0] * 5)
    features = random_features(rng, atoms, stride, dim)
    none = ops.soft_mask_pool_batch(features, atoms, members, stride)
    assert none.shape == (0, dim) and none.dtype == np.float32
    # one region in the whole batch, in the middle image; then in the first and in the last
    for where in (2, 0, 4):
        members = [np.zeros((0, m.shape[1]), bool) for m in members]
        members[where] = np.ones((1, members[where].shape[1]), bool)  # it covers the whole image
        for pooling in ("soft", "hard"):
            got = ops.soft_mask_pool_batch(features, atoms, members, stride, pooling)
            assert got.shape == (1, dim)
            np.testing.assert_allclose(got, reference.soft_mask_pool_batch(features, atoms, members, stride, pooling),
                                       rtol=1e-5, atol=1e-5)
    # a batch of 1x1 images, one pixel each: a soft region covering it is its patch's direction (1/stride^2 of it)
    pixels = [np.zeros((1, 1), np.int32) for _ in range(4)]
    members = [np.ones((1, 1), bool), np.zeros((1, 1), bool), np.zeros((0, 1), bool), np.ones((2, 1), bool)]
    features = random_features(rng, pixels, 16, dim)
    got = ops.soft_mask_pool_batch(features, pixels, members, 16)
    want = [features[0][0, 0], np.zeros(dim), features[3][0, 0], features[3][0, 0]]
    np.testing.assert_allclose(got, [w / max(np.linalg.norm(w), 1e-12) for w in want], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got, reference.soft_mask_pool_batch(features, pixels, members, 16), rtol=1e-5,
                               atol=1e-6)
    # the same image three times: the same vectors three times
    atoms, num_atoms = superpixel_atoms(rng, 29, 45)
    members = random_members(rng, 7, num_atoms)
    features = random_features(rng, [atoms], 7, dim)[0]
    got = ops.soft_mask_pool_batch([features] * 3, [atoms] * 3, [members] * 3, 7)
    np.testing.assert_array_equal(got, np.tile(ops.soft_mask_pool(features, atoms, members, 7), (3, 1)))


def test_soft_mask_pool_batch_checks_its_images(rng):
    atoms, members = random_batch(rng, 3, counts=[2, 2, 2])
    features = random_features(rng, atoms, 2, 5)
    with pytest.raises(InputError, match="feature maps for"):
        ops.soft_mask_pool_batch(features[:2], atoms, members, 2)
    with pytest.raises(InputError, match="different widths"):
        ops.soft_mask_pool_batch([features[0], features[1], features[2][:, :, :4]], atoms, members, 2)
    with pytest.raises(InputError, match="does not match an image"):
        ops.soft_mask_pool_batch(features[::-1], atoms, members, 2)
    with pytest.raises(InputError, match="atom maps for"):
        ops.soft_mask_pool_batch(features, atoms, members[:2], 2)


def assert_batch_nms_equal(got, want, images):
    keep, label_maps, owners = got
    assert keep.dtype == np.bool_ and len(label_maps) == len(owners) == images
    np.testing.assert_array_equal(keep, want[0])
    for label_map, owner, want_label, want_owner in zip(label_maps, owners, want[1], want[2]):
        assert label_map.dtype == np.int32 and owner.dtype == np.int32
        np.testing.assert_array_equal(label_map, want_label)
        np.testing.assert_array_equal(owner, want_owner)


def random_scores(rng, count):
    """Coarse scores (ties common), or one score for every region (processing order = index order)."""
    return np.full(count, 0.5) if rng.random() < 0.25 else np.round(rng.random(count), 1)


@pytest.mark.parametrize("drop_class", [None, 0])
@pytest.mark.parametrize("with_ids", [False, True])
def test_mask_nms_raster_batch_matches_reference(rng, drop_class, with_ids):
    for num_images in range(1, 7):
        for _ in range(3):
            atoms, members = random_batch(rng, num_images)
            total = sum(len(m) for m in members)
            classes = rng.integers(0, int(rng.integers(1, 4)), total)  # few classes, many repeats: NMS suppresses
            scores = random_scores(rng, total)
            ids = rng.integers(0, 50, total) if with_ids else None  # ids may repeat: owner records them as given
            for threshold in (0.0, 0.4, 1.0, float(rng.random())):
                background = int(rng.choice([255, -3, 7]))
                args = (classes, scores, threshold, background, drop_class, ids)
                assert_batch_nms_equal(ops.mask_nms_raster_batch(atoms, members, *args),
                                       reference.mask_nms_raster_batch(atoms, members, *args), num_images)
            if drop_class is None and ids is None:  # an image's results do not depend on the batch around it
                keep, label_maps, owners = ops.mask_nms_raster_batch(atoms, members, classes, scores, 0.4, 9)
                offsets = np.cumsum([0] + [len(m) for m in members])
                for b, (a, m) in enumerate(zip(atoms, members)):
                    rows = slice(offsets[b], offsets[b + 1])
                    single = ops.mask_nms_raster(a, m, classes[rows], scores[rows], 0.4, 9)
                    assert_nms_equal((keep[rows], label_maps[b], owners[b]), single)


def test_mask_nms_raster_batch_suppresses_within_images_only(rng):
    """The same regions in every image of a batch: each image keeps what it keeps alone (no suppression across
    images), owners count from 0 in every image, and ids map them."""
    atoms, num_atoms = superpixel_atoms(rng, 40, 50)
    members = random_members(rng, 12, num_atoms)
    members[:4] = members[4:8]  # duplicates: suppressed at any threshold below 1
    classes, scores = rng.integers(1, 3, 12), random_scores(rng, 12)
    single = ops.mask_nms_raster(atoms, members, classes, scores, 0.5, 255)
    keep, label_maps, owners = ops.mask_nms_raster_batch([atoms] * 3, [members] * 3, np.tile(classes, 3),
                                                         np.tile(scores, 3), 0.5, 255)
    np.testing.assert_array_equal(keep, np.tile(single[0], 3))
    for label_map, owner in zip(label_maps, owners):
        np.testing.assert_array_equal(label_map, single[1])
        np.testing.assert_array_equal(owner, single[2])
    ids = np.arange(100, 136)
    _, _, owners = ops.mask_nms_raster_batch([atoms] * 3, [members] * 3, np.tile(classes, 3), np.tile(scores, 3),
                                             0.5, 255, ids=ids)
    for b, owner in enumerate(owners):
        np.testing.assert_array_equal(owner, np.where(single[2] >= 0, single[2] + 100 + 12 * b, -1))


def test_mask_nms_raster_batch_edge_cases(rng):
    # no images at all
    keep, label_maps, owners = ops.mask_nms_raster_batch([], [], [], [], 0.4)
    assert keep.shape == (0,) and label_maps == [] and owners == []
    # every image without regions (ids given or not): background everywhere, no owner
    atoms, members = random_batch(rng, 6, counts=[0] * 6)
    for ids in (None, np.zeros(0, np.int64)):
        keep, label_maps, owners = ops.mask_nms_raster_batch(atoms, members, [], [], 0.4, 255, drop_class=0,
                                                             ids=ids)
        assert keep.shape == (0,) and keep.dtype == np.bool_
        for a, label_map, owner in zip(atoms, label_maps, owners):
            assert label_map.shape == owner.shape == a.shape
            assert (label_map == 255).all() and (owner == -1).all()
    # one region in the whole batch, covering its image
    for where in (0, 3, 5):
        members = [np.zeros((0, m.shape[1]), bool) for m in members]
        members[where] = np.ones((1, members[where].shape[1]), bool)
        keep, label_maps, owners = ops.mask_nms_raster_batch(atoms, members, [4], [0.1], 0.4, 255, ids=[77])
        assert keep.tolist() == [True]
        for b, (label_map, owner) in enumerate(zip(label_maps, owners)):
            assert (label_map == (4 if b == where else 255)).all() and (owner == (77 if b == where else -1)).all()
    # every region of the dropped class: nothing kept, nothing painted (and it suppresses nothing)
    atoms, members = random_batch(rng, 4, counts=[3, 0, 5, 1])
    classes = np.zeros(9, np.int64)
    keep, label_maps, owners = ops.mask_nms_raster_batch(atoms, members, classes, np.ones(9), 0.0, 8, drop_class=0)
    assert not keep.any() and all((m == 8).all() for m in label_maps) and all((o == -1).all() for o in owners)
    # a dropped region of top score overlapping everything leaves the others as if it were not there
    atoms, num_atoms = superpixel_atoms(rng, 30, 30)
    members = np.vstack([np.ones((1, num_atoms), bool), random_members(rng, 6, num_atoms)])
    classes, scores = np.r_[0, rng.integers(1, 3, 6)], np.r_[1.0, rng.random(6)]
    keep, label_maps, owners = ops.mask_nms_raster_batch([atoms], [members], classes, scores, 0.3, drop_class=0)
    alone = ops.mask_nms_raster(atoms, members[1:], classes[1:], scores[1:], 0.3)
    np.testing.assert_array_equal(keep, np.r_[False, alone[0]])
    np.testing.assert_array_equal(label_maps[0], alone[1])
    np.testing.assert_array_equal(owners[0], np.where(alone[2] >= 0, alone[2] + 1, -1))


def test_mask_nms_raster_keeps_class_minus_one_without_drop_class():
    atoms = np.array([[0, 0, 1], [0, 0, 1]], np.int32)
    members = np.array([[True, False], [False, True]])
    classes, scores = np.array([-1, 5]), np.array([0.9, 0.8])  # classes are any int32 (only -1 goes wrong)
    want = reference.mask_nms_raster_batch([atoms], [members], classes, scores, 0.4)
    assert want[0].tolist() == [True, True] and (want[1][0] == [[-1, -1, 5], [-1, -1, 5]]).all()
    assert_batch_nms_equal(ops.mask_nms_raster_batch([atoms], [members], classes, scores, 0.4), want, 1)
    dropped = ops.mask_nms_raster_batch([atoms], [members], classes, scores, 0.4, drop_class=-1)  # any class drops
    assert dropped[0].tolist() == [False, True]

def test_mask_nms_raster_batch_checks_per_region_arrays(rng):
    atoms, members = random_batch(rng, 3, counts=[2, 0, 3])
    with pytest.raises(InputError, match=r"classes must be \(5,\)"):
        ops.mask_nms_raster_batch(atoms, members, [1, 2], np.ones(5), 0.4)
    with pytest.raises(InputError, match=r"scores must be \(5,\)"):
        ops.mask_nms_raster_batch(atoms, members, np.ones(5, int), np.ones(2), 0.4)
    with pytest.raises(InputError, match=r"ids must be \(5,\) integers"):
        ops.mask_nms_raster_batch(atoms, members, np.ones(5, int), np.ones(5), 0.4, ids=np.ones(5))
    with pytest.raises(InputError, match="drop_class must be an integer"):
        ops.mask_nms_raster_batch(atoms, members, np.ones(5, int), np.ones(5), 0.4, drop_class=0.5)


# ---------------------------------------------------------------------------------------------------------- vote
# (the vote's rules are in test_retrieval.py; these are its edges: one neighbour, ids beyond the classes)


@pytest.mark.parametrize("method", ["count", "balanced", "weighted", "softmax"])
def test_vote_one_neighbour(rng, method):
    num_classes = 5
    similarities = rng.random((40, 1)).astype(np.float32)
    labels = rng.integers(-2, num_classes + 2, (40, 1))
    counts = rng.integers(0, 10, num_classes)  # 0: a class without bank vectors (counted as 1)
    classes, confidences = ops.vote(similarities, labels, num_classes, method, counts)
    valid = (labels[:, 0] >= 0) & (labels[:, 0] < num_classes)
    np.testing.assert_array_equal(classes, np.where(valid, labels[:, 0], 0))
    np.testing.assert_array_equal(confidences, np.where(valid, similarities[:, 0], 0))
    want = reference.vote(similarities, labels, num_classes, method, counts)
    np.testing.assert_array_equal(classes, want[0])
    np.testing.assert_array_equal(confidences, want[1])


@pytest.mark.parametrize("method", ["count", "balanced", "weighted", "softmax"])
def test_vote_ignores_ids_outside_the_classes(rng, method):
    for _ in range(20):
        queries, k, num_classes = int(rng.integers(1, 60)), int(rng.integers(1, 30)), int(rng.integers(1, 6))
        labels = rng.integers(-3, num_classes + 3, (queries, k))  # the search's -1 and ids >= num_classes
        similarities = -np.sort(-rng.integers(0, 4, (queries, k)) / 4.0, axis=1).astype(np.float32)
        counts = rng.integers(1, 10, num_classes)
        got = ops.vote(similarities, labels, num_classes, method, counts)
        cleaned = np.where((labels >= 0) & (labels < num_classes), labels, -1)
        for want in (reference.vote(similarities, labels, num_classes, method, counts),
                     ops.vote(similarities, cleaned, num_classes, method, counts)):
            np.testing.assert_array_equal(got[0], want[0])
            np.testing.assert_allclose(got[1], want[1], rtol=1e-6)
        assert ((got[0] >= 0) & (got[0] < num_classes)).all()


# ------------------------------------------------------------------------------------ one call into _C per batch


class CountingExtension:
    """Stands in for engine._C: counts the calls to each of its entry points and forwards them to the real one."""

    def __init__(self, real):
        self.real = real
        self.calls: dict[str, int] = {}

    def __getattr__(self, name):
        target = getattr(self.real, name)
        if not callable(target):
            return target

        def counted(*args, **kwargs):
            self.calls[name] = self.calls.get(name, 0) + 1
            return target(*args, **kwargs)

        return counted


@pytest.fixture
def extension(monkeypatch):
    """engine.ops' _C replaced by a CountingExtension for the test."""
    counting = CountingExtension(ops._C)
    monkeypatch.setattr(ops._core, "_C", counting)  # where every face looks the extension up
    return counting


@pytest.mark.parametrize("num_images", [1, 4, 16])
@pytest.mark.parametrize("regions", [0, 5, 200])
def test_batched_ops_call_the_extension_once_per_batch(extension, rng, num_images, regions):
    shapes = [(int(rng.integers(1, 40)), int(rng.integers(1, 40))) for _ in range(num_images)]
    pairs = [random_image_regions(rng, h, w, regions) for h, w in shapes]
    atoms, members = [a for a, _ in pairs], [m for _, m in pairs]
    features = random_features(rng, atoms, 7, 12)
    total = regions * num_images
    launches = extension.real.cuda_launches()

    pooled = ops.soft_mask_pool_batch(features, atoms, members, 7)
    assert extension.calls == {"soft_mask_pool": 1} and pooled.shape == (total, 12)
    keep, label_maps, owners = ops.mask_nms_raster_batch(atoms, members, rng.integers(0, 3, total),
                                                         rng.random(total), 0.4, 255, drop_class=0,
                                                         ids=np.arange(total))
    assert extension.calls == {"soft_mask_pool": 1, "mask_nms_raster": 1}
    assert keep.shape == (total,) and len(label_maps) == len(owners) == num_images
    classes, _ = ops.vote(rng.random((total, 25)), rng.integers(-1, 21, (total, 25)), 21)
    assert extension.calls == {"soft_mask_pool": 1, "mask_nms_raster": 1, "vote": 1} and classes.shape == (total,)
    assert extension.real.cuda_launches() == launches  # host arrays: the CPU launchers, no CUDA kernel


def test_a_source_tree_that_shadows_the_installed_engine_is_named(tmp_path, monkeypatch):
    """Python started in a checkout imports its source tree, which has no compiled _C, before the installed engine:
    the error says so and where the installed one is, instead of only "not built"."""
    from engine.ops import _core

    installed = tmp_path / "site-packages" / "engine"
    installed.mkdir(parents=True)

    class Installed:
        def locate_file(self, name):
            return tmp_path / "site-packages" / name

    monkeypatch.setattr(_core, "_C", None)
    monkeypatch.setattr(_core, "distribution", lambda name: Installed())
    with pytest.raises(ImportError, match="is not built"):  # the installed copy has no kernels either
        _core._lib()
    (installed / "_C.cpython-311-x86_64-linux-gnu.so").write_bytes(b"")
    with pytest.raises(ImportError, match=f"shadows the installed engine in {installed}"):
        _core._lib()
