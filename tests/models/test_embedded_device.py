"""The embedded proposer's device steps (engine.models.embedded_device), run here on torch CPU tensors: each step
against the host's (OpenCV, NumPy), and the whole from the same Lab image against the host's SLIC + RAC proposer,
exactly. test_gpu.py runs them on a CUDA device."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from engine import ops  # noqa: E402
from engine.errors import InputError  # noqa: E402
from engine.models import embedded_device as device  # noqa: E402
from engine.models.embedded import EmbeddedProposer, create_proposer  # noqa: E402
from engine.models.superpixels import adjacency, region_means  # noqa: E402
from engine.config import Config  # noqa: E402


def scene(rng, height, width):
    """A noisy image with a few flat rectangles: superpixels with straight and ragged edges."""
    image = (rng.random((height, width, 3)) * 60 + 80).astype(np.uint8)
    for _ in range(4):
        y, x = rng.integers(0, height), rng.integers(0, width)
        image[y:y + height // 3, x:x + width // 3] = rng.integers(0, 256, 3)
    return image


def host_lab(image, scale):
    """The host's working Lab image (engine.models.superpixels.slic_graph's steps)."""
    height, width = image.shape[:2]
    if scale != 1.0 and min(height, width) * scale >= 1:
        image = cv2.resize(image, (max(1, round(width * scale)), max(1, round(height * scale))),
                           interpolation=cv2.INTER_AREA)
    return cv2.cvtColor(image.astype(np.float32) / 255.0, cv2.COLOR_RGB2LAB)


def test_rgb_to_lab_matches_opencv(rng):
    pixels = np.concatenate([rng.integers(0, 256, (500, 3)), np.array([[0, 0, 0], [255, 255, 255], [1, 2, 3],
                                                                       [255, 0, 0], [0, 255, 0], [0, 0, 255]])])
    rgb = (pixels.astype(np.float32) / 255.0)[None]
    want = cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB)[0]
    got = device.rgb_to_lab(torch.from_numpy(rgb))[0].numpy()
    # OpenCV's float conversion interpolates a lookup table (steps of 1/32 to 1/64 in a and b); ours is the formula
    np.testing.assert_allclose(got, want, atol=0.3)


@pytest.mark.parametrize("shape", [(40, 60), (37, 51), (5, 3), (1, 9)])
def test_working_lab_matches_the_host_at_even_sides(rng, shape):
    image = scene(rng, *shape)
    got = device.working_lab(torch.from_numpy(image), 0.5).numpy()
    want = host_lab(image, 0.5)
    assert got.shape == want.shape
    if shape[0] % 2 == 0 and shape[1] % 2 == 0:  # an exact 2 x 2 block mean: the same 8-bit pixels
        np.testing.assert_allclose(got, want, atol=0.3)
    np.testing.assert_allclose(device.working_lab(torch.from_numpy(image), 1.0).numpy(), host_lab(image, 1.0),
                               atol=0.3)


@pytest.mark.parametrize("small,full", [((10, 12), (20, 24)), ((7, 9), (13, 17)), ((1, 1), (5, 3)), ((3, 4), (3, 4)),
                                        ((188, 250), (375, 500)), ((5, 5), (11, 9))])
def test_upscale_nearest_matches_opencv(rng, small, full):
    labels = rng.integers(0, 50, small).astype(np.int32)
    want = cv2.resize(labels, full[::-1], interpolation=cv2.INTER_NEAREST)
    np.testing.assert_array_equal(device.upscale_nearest(torch.from_numpy(labels), *full).numpy(), want)


def test_leaf_graphs_match_the_host(rng):
    images = [scene(rng, 48, 64), scene(rng, 31, 20), scene(rng, 1, 7), scene(rng, 64, 48)]
    labs = [host_lab(image, 0.5) for image in images]
    small = ops.slic_superpixels_batch(labs, 30)
    counts = [int(labels.max()) + 1 for labels in small]
    graphs = device.leaf_graphs([torch.from_numpy(x) for x in small], [torch.from_numpy(x) for x in labs],
                                [image.shape[:2] for image in images], counts)
    for image, lab, labels, graph in zip(images, labs, small, graphs):
        full = cv2.resize(labels, image.shape[1::-1], interpolation=cv2.INTER_NEAREST)
        np.testing.assert_array_equal(graph.labels.numpy(), full)
        np.testing.assert_array_equal(graph.edges.numpy(), adjacency(labels).reshape(-1, 2))
        np.testing.assert_array_equal(graph.area.numpy(), np.bincount(full.ravel(), minlength=labels.max() + 1))
        colour = region_means(labels, lab).astype(np.float32)
        colour[:, 1:] += 128.0
        np.testing.assert_array_equal(graph.colour.numpy(), colour)


def host_proposals(proposer, image, lab, features, stride):
    """The host proposer's SLIC + RAC proposals of an image, its superpixels made from `lab`."""
    import engine.models.embedded as embedded

    original = embedded.slic_graph

    def from_lab(image, n_segments, scale, compactness, iterations, num_threads):
        labels = ops.slic_superpixels(lab, n_segments, compactness, iterations, num_threads=num_threads)
        colour = region_means(labels, lab).astype(np.float32)
        colour[:, 1:] += 128.0
        full = cv2.resize(labels, image.shape[1::-1], interpolation=cv2.INTER_NEAREST)
        return full, adjacency(labels), colour

    embedded.slic_graph = from_lab
    try:
        return proposer.propose_one(image, features, stride, (5, 3))
    finally:
        embedded.slic_graph = original


def test_device_proposals_equal_the_host_proposer_from_the_same_lab(rng, monkeypatch):
    proposer = EmbeddedProposer(n_superpixels=60, levels=(20, 8, 3), min_area=1, superpixels="slic", merging="rac")
    images = [scene(rng, 70, 90), scene(rng, 33, 47), scene(rng, 2, 40), np.full((20, 30, 3), 128, np.uint8),
              scene(rng, 1, 1), scene(rng, 1, 90)]
    stride = 16
    features = [rng.standard_normal((-(-h // stride), -(-w // stride), 8)).astype(np.float32)
                for h, w in (image.shape[:2] for image in images)]
    labs = [host_lab(image, 0.5) for image in images]
    want = [host_proposals(proposer, image, lab, f, stride) for image, lab, f in zip(images, labs, features)]
    given = iter(labs)
    monkeypatch.setattr(device, "working_lab", lambda image, scale: torch.from_numpy(next(given)))
    got = proposer.propose_on_device(images, [torch.from_numpy(f) for f in features], stride, (5, 3))
    assert sum(len(p) for p in want) > 10
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a.atoms, b.atoms)
        np.testing.assert_array_equal(a.members, b.members)
        np.testing.assert_array_equal(a.objectness, b.objectness)


def test_device_proposals_without_any_region_over_min_area(rng):
    proposer = EmbeddedProposer(n_superpixels=20, levels=(5,), min_area=10 ** 6, superpixels="slic", merging="rac")
    image = scene(rng, 30, 40)
    features = torch.from_numpy(rng.standard_normal((2, 3, 4)).astype(np.float32))
    (proposals,) = proposer.propose_on_device([image], [features], 16)
    assert len(proposals) == 0 and proposals.atoms.shape == (30, 40)
    assert proposer.propose_on_device([], [], 16) == []


def test_only_slic_and_rac_run_on_the_device(rng):
    host = EmbeddedProposer()
    assert not host.runs_on_device
    with pytest.raises(InputError, match="slic"):
        host.propose_on_device([scene(rng, 20, 20)], [torch.zeros(2, 2, 4)], 16)
    assert create_proposer(Config(), on_device=True).runs_on_device
    assert not create_proposer(Config(gpu_proposer=False), on_device=True).runs_on_device
    assert not create_proposer(Config()).runs_on_device


def test_engine_describes_its_proposer(toy, toy_bank):
    from engine import Engine

    engine = Engine(toy_bank, backbone=toy.ColorBackbone())
    assert engine.describe()["proposer"] == "embedded (watershed + greedy, on the host)"
    given_only = Engine(toy_bank, backbone=toy.ColorBackbone(), proposer=None)
    assert given_only.describe()["proposer"] == "none (proposals are given)"
