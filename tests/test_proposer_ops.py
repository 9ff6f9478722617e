"""The proposer's device kernels on the CPU launchers against their NumPy twins: SLIC superpixels
(ops.slic_superpixels vs reference.slic_superpixels) and merging in rounds of mutual nearest pairs
(ops.merge_regions_rac vs reference.merge_regions_rac), on random inputs and edge cases (uniform images, one pixel,
one row or column, ties), with determinism over threads and batches. tests/test_gpu.py compares the CUDA launchers
with these."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from engine import ops, reference
from engine.errors import InputError
from test_ops import assert_same_tree, random_graph


def random_lab(rng, height, width, kind="noise"):
    """A float32 Lab image: smooth blobs plus noise ("noise"), a few flat blocks ("blocks": many equal distances),
    or one colour ("uniform")."""
    if kind == "uniform":
        return np.broadcast_to(np.float32([50.0, 10.0, -20.0]), (height, width, 3)).copy()
    if kind == "blocks":
        palette = rng.integers(0, 4, (max(1, height // 5 + 1), max(1, width // 5 + 1)))
        colours = np.float32([[20, 0, 0], [80, 10, 10], [50, -30, 40], [60, 60, -60]])
        return colours[palette.repeat(5, 0).repeat(5, 1)[:height, :width]]
    rgb = rng.random((max(2, height // 8), max(2, width // 8), 3)).astype(np.float32)
    rgb = cv2.resize(rgb, (width, height), interpolation=cv2.INTER_LINEAR)
    rgb = np.clip(rgb + 0.05 * rng.standard_normal((height, width, 3)).astype(np.float32), 0, 1)
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB)


def assert_pieces_connected(labels):
    """Labels are 0..n-1, all used, each one 4-connected piece."""
    n = int(labels.max()) + 1
    assert labels.min() == 0 and len(np.unique(labels)) == n
    for k in range(n):
        count, _ = cv2.connectedComponents((labels == k).astype(np.uint8), connectivity=4)
        assert count == 2, f"label {k} is in {count - 1} pieces"


# ---------------------------------------------------------------------------------------------------------- SLIC


@pytest.mark.parametrize("kind", ["noise", "blocks", "uniform"])
@pytest.mark.parametrize("shape,n_segments", [((40, 56), 30), ((33, 27), 12), ((64, 48), 50), ((17, 90), 20)])
def test_slic_matches_reference(rng, kind, shape, n_segments):
    lab = random_lab(rng, *shape, kind)
    compactness, iterations = float(rng.choice([0.5, 10.0, 30.0])), int(rng.integers(0, 6))
    got = ops.slic_superpixels(lab, n_segments, compactness, iterations)
    want = reference.slic_superpixels(lab, n_segments, compactness, iterations)
    assert got.dtype == np.int32 and got.shape == shape
    np.testing.assert_array_equal(got, want)
    assert_pieces_connected(got)


@pytest.mark.parametrize("shape", [(1, 1), (1, 60), (60, 1), (2, 2), (3, 200)])
@pytest.mark.parametrize("n_segments", [1, 7, 500])
def test_slic_degenerate_images(rng, shape, n_segments):
    lab = random_lab(rng, *shape)
    got = ops.slic_superpixels(lab, n_segments, 10.0, 3)
    np.testing.assert_array_equal(got, reference.slic_superpixels(lab, n_segments, 10.0, 3))
    assert_pieces_connected(got)


def test_slic_small_pieces_join_and_sizes(rng):
    lab = random_lab(rng, 60, 80)
    for min_size in (0.0, 0.25, 0.9):
        got = ops.slic_superpixels(lab, 40, 5.0, 5, min_size=min_size)
        np.testing.assert_array_equal(got, reference.slic_superpixels(lab, 40, 5.0, 5, min_size=min_size))
        rows, cols, min_pixels, _ = ops.slic_grid(60, 80, 40, 5.0, min_size)
        sizes = np.bincount(got.ravel())
        assert (sizes[1:] >= min_pixels).all()  # only the first pixel's piece may be smaller
    # a uniform image is the grid itself: compact cells, one label each
    uniform = ops.slic_superpixels(random_lab(rng, 40, 40, "uniform"), 16, 10.0, 5)
    assert int(uniform.max()) + 1 == 16


def test_slic_batch_and_threads_are_deterministic(rng):
    labs = [random_lab(rng, *shape, kind) for shape, kind in
            [((30, 40), "noise"), ((1, 25), "noise"), ((45, 20), "blocks"), ((8, 8), "uniform"), ((50, 50), "noise")]]
    one_by_one = [ops.slic_superpixels(lab, 20, 10.0, 4, num_threads=1) for lab in labs]
    for threads in (1, 2):
        batch = ops.slic_superpixels_batch(labs, 20, 10.0, 4, num_threads=threads)
        for a, b in zip(batch, one_by_one):
            np.testing.assert_array_equal(a, b)
    assert ops.slic_superpixels_batch([], 20) == []


def test_slic_bad_inputs():
    with pytest.raises(InputError, match=r"\(H, W, 3\)"):
        ops.slic_superpixels(np.zeros((4, 4), np.float32))
    with pytest.raises(InputError, match=r"\(H, W, 3\)"):
        ops.slic_superpixels(np.zeros((0, 4, 3), np.float32))
    with pytest.raises(InputError, match="n_segments"):
        ops.slic_superpixels(np.zeros((4, 4, 3), np.float32), 0)
    with pytest.raises(InputError, match="compactness"):
        ops.slic_superpixels(np.zeros((4, 4, 3), np.float32), 4, -1.0)


# ----------------------------------------------------------------------------------- merging by rounds (RAC)


@pytest.mark.parametrize("count", [2, 3, 17, 80, 300])
@pytest.mark.parametrize("weights", [(1.0, 3.0), (0.0, 0.0), (2.5, 0.5)])
def test_rac_matches_reference(rng, count, weights):
    edges, area, features, colour = random_graph(rng, count)
    levels = sorted({int(k) for k in rng.integers(1, count + 3, 3)}, reverse=True)
    assert_same_tree(ops.merge_regions_rac(edges, area, features, colour, levels, *weights),
                     reference.merge_regions_rac(edges, area, features, colour, levels, *weights))


def test_rac_tree_facts(rng):
    count = 60
    edges, area, features, colour = random_graph(rng, count)
    levels = [40, 17, 5, 1]
    tree = ops.merge_regions_rac(edges, area, features, colour, levels)
    assert len(tree.parent) == 2 * count - 1 and (tree.parent == -1).sum() == 1  # merged to one root
    for node in range(count, len(tree.parent)):
        children = np.flatnonzero(tree.parent == node)
        assert len(children) == 2 and tree.area[node] == tree.area[children].sum()
    for level, snapshot in zip(levels, tree.snapshots):  # each cut has exactly its number of regions
        assert len(np.unique(snapshot)) == level
    assert np.all((tree.coherence >= 0) & (tree.coherence <= 1)) and np.all(tree.coherence[:count] == 1)
    # the same distance and cuts as the greedy merge: the cuts' region counts agree
    greedy = ops.merge_regions(edges, area, features, colour, levels)
    assert [len(np.unique(s)) for s in greedy.snapshots] == [len(np.unique(s)) for s in tree.snapshots]


def test_rac_ties_and_edge_cases(rng):
    # every distance 0: each node's nearest is its smallest-id neighbour; on the chain 0-1-2-3-4-5 the only mutual
    # pair is (0, 1), then (2, 3) on 6-2-3-4-5, then (4, 5) on 6-7-4-5: one merge a round
    chain = [[i, i + 1] for i in range(5)]
    tied = ops.merge_regions_rac(chain, np.ones(6), np.ones((6, 1)), np.zeros((6, 3)), [5, 3], 0.0, 0.0)
    assert tied.snapshots.tolist() == [[6, 6, 2, 3, 4, 5], [6, 6, 7, 7, 8, 8]]
    assert_same_tree(tied, reference.merge_regions_rac(chain, np.ones(6), np.ones((6, 1)), np.zeros((6, 3)), [5, 3],
                                                       0.0, 0.0))
    # a star of equal distances: the centre pairs with its smallest neighbour, the rest wait
    star = [[0, k] for k in range(1, 5)]
    first = ops.merge_regions_rac(star, np.ones(5), np.ones((5, 1)), np.zeros((5, 3)), [4], 0.0, 0.0)
    assert first.snapshots.tolist() == [[5, 5, 2, 3, 4]]
    edges, area, features, colour = random_graph(rng, 5)
    none = ops.merge_regions_rac(np.zeros((0, 2)), area, features, colour, [3])  # no adjacency: nothing merges
    assert np.array_equal(none.snapshots[0], np.arange(5)) and len(none.parent) == 5
    more = ops.merge_regions_rac(edges, area, features, colour, [9, 5])  # cuts above the leaf count: the leaves
    assert np.array_equal(more.snapshots, np.tile(np.arange(5), (2, 1)))
    one = ops.merge_regions_rac(np.zeros((0, 2)), area[:1], features[:1], colour[:1], [1])
    assert one.snapshots.tolist() == [[0]] and one.parent.tolist() == [-1]
    empty = ops.merge_regions_rac(np.zeros((0, 2)), np.zeros(0), np.zeros((0, 6)), np.zeros((0, 3)), [4])
    assert empty.snapshots.shape == (1, 0) and len(empty.parent) == 0
    # two components: merging stops when no two live regions are adjacent, cuts below keep the last partition
    split = ops.merge_regions_rac([[0, 1], [2, 3]], np.ones(4), features[:4], colour[:4], [3, 1])
    last = split.snapshots[1]
    assert last[0] == last[1] != last[2] == last[3] and sorted({*last}) == [4, 5] and len(split.parent) == 6
    with pytest.raises(InputError, match="edges"):
        ops.merge_regions_rac([[0, 0]], np.ones(2), np.ones((2, 2)), np.zeros((2, 3)), [1])


def test_rac_batch_and_threads_are_deterministic(rng):
    graphs = [random_graph(rng, count) for count in (1, 40, 7, 120)]
    graphs.append((np.zeros((0, 2), np.int64), np.ones(3), np.ones((3, 6), np.float32), np.zeros((3, 3), np.float32)))
    levels = [30, 10, 2]
    alone = [ops.merge_regions_rac(*graph, levels) for graph in graphs]
    for threads in (1, 2):
        for a, b in zip(ops.merge_regions_rac_batch(graphs, levels, num_threads=threads), alone):
            assert_same_tree(a, b)
            np.testing.assert_array_equal(a.height, b.height)


def test_embedded_proposer_with_the_device_kernels(rng):
    from engine.models.embedded import EmbeddedProposer

    image = (rng.random((70, 90, 3)) * 255).astype(np.uint8)
    image[20:50, 30:70] = (200, 40, 40)
    features = rng.standard_normal((5, 6, 8)).astype(np.float32)
    for superpixels, merging in [("slic", "greedy"), ("watershed", "rac"), ("slic", "rac")]:
        proposer = EmbeddedProposer(n_superpixels=60, levels=(20, 8), min_area=10, superpixels=superpixels,
                                    merging=merging)
        proposals = proposer.propose_one(image, features, 16)
        assert len(proposals.objectness) > 0 and proposals.atoms.shape == (70, 90)
    with pytest.raises(InputError, match="superpixels"):
        EmbeddedProposer(superpixels="felzenszwalb")
