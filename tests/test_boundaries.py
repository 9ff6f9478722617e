"""engine.boundaries: the guided-filter boundary snapping against a plain NumPy guided filter written from its
equations, and the unpainted-pixel fill against brute-force nearest pixels; each on NumPy arrays (OpenCV's filters)
and on torch tensors (torch's, as a GPU engine runs them; here on the CPU)."""

import numpy as np
import pytest

from engine.boundaries import LabelMapRefiner, fill_unpainted, repaint_atoms, snap_to_edges
from engine.config import Config


@pytest.fixture(params=["numpy", "torch"])
def to(request):
    """Arrays as the backend under test takes them (`to(x)`), and its results back as NumPy (`to.back(y)`)."""
    if request.param == "numpy":
        convert = lambda x: x  # noqa: E731
        convert.back = lambda y: y
        return convert
    torch = pytest.importorskip("torch")
    convert = lambda x: torch.from_numpy(np.ascontiguousarray(x))  # noqa: E731
    convert.back = lambda y: y.numpy()
    return convert


def _window_mean(values: np.ndarray, radius: int) -> np.ndarray:
    """Mean over the (2r+1)^2 window around each pixel, the array mirrored at its borders (edge pixel repeated)."""
    padded = np.pad(values, radius, mode="symmetric")
    height, width = values.shape
    total = np.zeros_like(values)
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            total += padded[dy:dy + height, dx:dx + width]
    return total / (2 * radius + 1) ** 2


def _guided_reference(label_map, grey, radius, eps):
    """Per class c: p = [label == c]; per window a = cov(I, p) / (var(I) + eps), b = mean(p) - a mean(I); q = mean(a)
    I + mean(b); each pixel takes the class of the largest q. Returns the labels and the margin to the runner-up."""
    classes = np.unique(label_map)
    mean_i = _window_mean(grey, radius)
    var_i = _window_mean(grey * grey, radius) - mean_i ** 2
    filtered = []
    for c in classes:
        p = (label_map == c).astype(np.float64)
        mean_p = _window_mean(p, radius)
        a = (_window_mean(grey * p, radius) - mean_i * mean_p) / (var_i + eps)
        b = mean_p - a * mean_i
        filtered.append(_window_mean(a, radius) * grey + _window_mean(b, radius))
    filtered = np.stack(filtered)
    order = np.sort(filtered, axis=0)
    return classes[np.argmax(filtered, axis=0)], order[-1] - order[-2]


def _grey(image):
    weights = np.array([0.299, 0.587, 0.114])  # OpenCV's RGB -> grey
    return np.round(image.astype(np.float64) @ weights) / 255.0


@pytest.mark.parametrize("seed", range(4))
def test_snap_matches_the_reference_at_full_resolution(seed, to):
    rng = np.random.default_rng(seed)
    height, width = rng.integers(8, 40, size=2)
    # blocky labels and a noisy image with edges of its own, so the filter has something to follow
    label_map = np.kron(rng.integers(0, 4, size=(height // 4 + 1, width // 4 + 1)), np.ones((4, 4)))
    label_map = label_map[:height, :width].astype(np.uint8)
    image = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    radius, eps = int(rng.integers(1, 4)), float(rng.choice([1e-3, 1e-2, 1e-1]))
    got = to.back(snap_to_edges(to(label_map), to(image), radius, eps, subsample=1))
    expected, margin = _guided_reference(label_map, _grey(image), radius, eps)
    clear = margin > 1e-4  # float32 against float64: only near-ties may differ
    assert clear.mean() > 0.9
    np.testing.assert_array_equal(got[clear], expected[clear])
    assert got.dtype == label_map.dtype


def test_a_boundary_moves_onto_the_image_edge(to):
    image = np.zeros((64, 64, 3), np.uint8)
    image[:, 32:] = 200  # the object's edge: column 32
    label_map = np.zeros((64, 64), np.uint8)
    label_map[:, 29:] = 7  # painted three pixels too far left (a half-scale superpixel boundary)
    snapped = to.back(snap_to_edges(to(label_map), to(image), radius=16, eps=1e-2))
    np.testing.assert_array_equal(snapped[:, :32], 0)
    np.testing.assert_array_equal(snapped[:, 32:], 7)


def test_flat_image_smooths_and_ties_keep_the_lower_class(to):
    image = np.full((16, 16, 3), 90, np.uint8)
    label_map = np.zeros((16, 16), np.uint8)
    label_map[:, 8:] = 3  # exactly half and half: the middle columns tie only by symmetry, never flip the halves
    snapped = to.back(snap_to_edges(to(label_map), to(image), radius=4, eps=1e-2, subsample=1))
    assert (snapped[:, :7] == 0).all() and (snapped[:, 9:] == 3).all()


@pytest.mark.parametrize("shape", [(1, 1), (1, 9), (9, 1), (2, 3), (5, 200)])
def test_tiny_and_thin_images(shape, to):
    rng = np.random.default_rng(1)
    label_map = rng.integers(0, 3, size=shape).astype(np.uint8)
    image = rng.integers(0, 256, size=(*shape, 3), dtype=np.uint8)
    snapped = to.back(snap_to_edges(to(label_map), to(image), radius=16, eps=1e-2))
    assert snapped.shape == shape and set(np.unique(snapped)) <= set(np.unique(label_map))


def test_one_class_or_radius_zero_is_unchanged(to):
    rng = np.random.default_rng(2)
    image = to(rng.integers(0, 256, size=(20, 30, 3), dtype=np.uint8))
    single = to(np.full((20, 30), 5, np.uint8))
    assert snap_to_edges(single, image, 16, 1e-2) is single
    mixed = to(rng.integers(0, 3, size=(20, 30)).astype(np.uint8))
    assert snap_to_edges(mixed, image, 0, 1e-2) is mixed


def test_fill_gives_each_unpainted_pixel_a_nearest_painted_class(to):
    rng = np.random.default_rng(3)
    owner = np.full((40, 50), -1, np.int32)
    label_map = np.zeros((40, 50), np.uint8)
    points = rng.choice(40 * 50, size=12, replace=False)
    for i, point in enumerate(points):  # a few painted pixels, far apart, each its own class
        y, x = divmod(point, 50)
        owner[y, x], label_map[y, x] = i, i + 1
    filled = to.back(fill_unpainted(to(label_map), to(owner)))
    ys, xs = np.divmod(points, 50)
    yy, xx = np.mgrid[:40, :50]
    distance = np.hypot(yy[..., None] - ys, xx[..., None] - xs)  # to every painted pixel
    nearest = distance.min(axis=2)
    got = distance[yy, xx, filled.astype(int) - 1]
    # the chamfer distance and jump flooding approximate the nearest: the class found is a nearest one up to 3 %
    assert (got <= nearest * 1.03 + 1e-9).all()
    np.testing.assert_array_equal(filled[owner >= 0], label_map[owner >= 0])


def test_fill_is_a_no_op_when_all_or_nothing_is_painted(to):
    label_map = to(np.arange(12, dtype=np.uint8).reshape(3, 4))
    assert fill_unpainted(label_map, to(np.zeros((3, 4), np.int32))) is label_map
    assert fill_unpainted(label_map, to(np.full((3, 4), -1, np.int32))) is label_map


@pytest.mark.parametrize("shape", [(1, 7), (7, 1), (5, 5), (33, 70), (64, 3)])
def test_fill_reaches_every_pixel_of_any_shape(to, shape):
    rng = np.random.default_rng(4)
    owner = np.full(shape, -1, np.int32)
    label_map = np.zeros(shape, np.uint8)
    y, x = rng.integers(0, shape[0]), rng.integers(0, shape[1])  # one painted pixel in a corner of nothing
    owner[y, x], label_map[y, x] = 0, 9
    np.testing.assert_array_equal(to.back(fill_unpainted(to(label_map), to(owner))), 9)


def test_repaint_gives_covered_atoms_their_class_and_keeps_the_rest(to, rng):
    atoms = rng.integers(0, 6, (9, 11)).astype(np.int32)
    label_map = rng.integers(0, 4, (9, 11)).astype(np.uint8)
    atom_classes = np.array([3, -1, 0, 7, -1, 2])
    got = to.back(repaint_atoms(to(label_map), to(atoms), to(atom_classes)))
    want = np.where(atom_classes[atoms] >= 0, atom_classes[atoms], label_map)
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, want)


def test_refiner_fills_then_repaints_then_snaps_and_frees_changed_pixels(to, rng):
    """Without a background class: the unpainted pixels are filled from the painting first, so an atom the superpixel
    vote leaves uncovered keeps its nearest painted class; every pixel whose class changed has owner -1."""
    atoms = np.repeat(np.repeat(np.arange(4, dtype=np.int32).reshape(2, 2), 10, axis=0), 10, axis=1)  # 2 x 2 blocks
    label_map = np.array([[1, 1], [0, 2]], np.uint8)[atoms // 2, atoms % 2]
    owner = np.array([[0, 0], [-1, 1]], np.int32)[atoms // 2, atoms % 2]
    image = np.full((20, 20, 3), 128, np.uint8)
    refiner = LabelMapRefiner(Config(boundary_radius=0), has_background=False)
    got, got_owner = refiner(to(image), to(label_map), to(owner), atoms=to(atoms), atom_classes=to(np.array([1, 3,
                                                                                                       -1, 2])))
    got, got_owner = to.back(got), to.back(got_owner)
    filled = fill_unpainted(label_map, owner)  # atom 2 takes its nearest painted classes, 1 and 2
    want = np.where(atoms == 1, 3, filled)  # atom 1 repainted, atom 2 uncovered
    assert set(np.unique(want[atoms == 2])) == {1, 2}
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got_owner, np.where(got != label_map, -1, owner))
    # without the vote's classes, the refiner is what it was
    plain, _ = refiner(to(image), to(label_map), to(owner))
    assert (to.back(plain)[atoms == 1] == 1).all()


def test_torch_and_opencv_refinements_agree_on_real_sized_maps(toy, rng):
    """The two backends' snapping through LabelMapRefiner on a 375 x 500 scene at the defaults: the same maps but
    where float rounding decides a near-tie, and owners cleared exactly where the class changed. (Their fills differ
    where two painted pixels are nearly equally near, chamfer against jump flooding: each is held to the brute-force
    nearest above.)"""
    torch = pytest.importorskip("torch")
    image, label_map, owner = toy.painted_scene(rng)
    refiner = LabelMapRefiner(Config(), has_background=True)  # snap only
    want, want_owner = refiner(image, label_map, owner)
    got, got_owner = refiner(torch.from_numpy(image), torch.from_numpy(label_map), torch.from_numpy(owner))
    got, got_owner = got.numpy(), got_owner.numpy()
    assert (got != want).mean() < 0.001 and (got != label_map).mean() > 0.01
    np.testing.assert_array_equal(got_owner[got == want], want_owner[got == want])
    np.testing.assert_array_equal(got_owner == -1, (got != label_map) | (owner == -1))


def test_torch_grey_levels_are_opencvs():
    torch = pytest.importorskip("torch")
    import cv2

    from engine.boundaries import _TorchSteps

    pixels = np.random.default_rng(6).integers(0, 256, (1, 100000, 3), dtype=np.uint8)
    want = cv2.cvtColor(pixels, cv2.COLOR_RGB2GRAY).astype(np.float32) / 255.0
    np.testing.assert_array_equal(_TorchSteps.grey(torch.from_numpy(pixels)).numpy(), want)
