"""engine.models.superpixels: grid-seeded watershed superpixels, their graph, and bounded work on degenerate images."""

import threading

import numpy as np
import pytest

from engine.models.superpixels import adjacency, compact_labels, region_means, superpixel_graph, superpixels


def finishes(function, seconds=60.0):
    """Run `function` in a thread; its result, or a failure if it has not returned within `seconds` (a hang guard,
    not a timing assertion)."""
    out = {}
    thread = threading.Thread(target=lambda: out.setdefault("value", function()), daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "superpixels did not return: unbounded work"
    return out["value"]


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_superpixels_cover_the_image_with_contiguous_ids(toy, rng, scale):
    image, _ = toy.scene(rng, 120, 160)
    labels = superpixels(image, 100, scale)
    assert labels.shape == image.shape[:2] and labels.dtype == np.int32
    n = labels.max() + 1
    assert labels.min() == 0 and np.all(np.bincount(labels.ravel(), minlength=n) > 0)
    assert 50 <= n <= 150


def test_graph_edges_and_colours_agree_with_the_full_size_labels(toy, rng):
    image, _ = toy.scene(rng, 120, 160)
    labels, edges, colour = superpixel_graph(image, 100, 0.5)
    assert np.array_equal(edges, adjacency(labels))  # enlarging by nearest keeps every adjacency
    assert edges.ndim == 2 and edges.shape[1] == 2 and np.all(edges[:, 0] < edges[:, 1])
    assert colour.shape == (labels.max() + 1, 3) and colour.dtype == np.float32
    assert np.all((colour[:, 0] >= 0) & (colour[:, 0] <= 100))
    full, full_edges, full_colour = superpixel_graph(image, 100, 1.0)
    assert np.array_equal(full_edges, adjacency(full))


@pytest.mark.parametrize("shape", [(1, 1), (2, 2), (1, 5000), (3, 5000), (5000, 1), (2, 7), (17, 3)])
@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_degenerate_images_return_a_partition(shape, scale, rng):
    image = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    labels, edges, colour = finishes(lambda: superpixel_graph(image, 400, scale))
    assert labels.shape == shape and labels.min() == 0
    assert len(colour) == labels.max() + 1 == len(np.unique(labels))


def test_uniform_image_is_bounded_and_covered():
    image = np.full((64, 64, 3), 128, np.uint8)
    labels = finishes(lambda: superpixels(image, 50))
    assert labels.shape == (64, 64) and labels.min() == 0


def test_compact_labels_and_region_means():
    labels = np.array([[4, 4, 9], [9, 2, 2]])
    compact = compact_labels(labels)
    assert compact.tolist() == [[1, 1, 2], [2, 0, 0]]
    values = np.array([[1.0, 3.0, 5.0], [7.0, 2.0, 4.0]])
    np.testing.assert_allclose(region_means(compact, values)[:, 0], [3.0, 2.0, 6.0])
