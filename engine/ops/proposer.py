"""The faces of the embedded proposer's kernels: SLIC superpixels, and the agglomerative merging of adjacent
regions (closest pair first, or in rounds of mutual nearest pairs)."""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Sequence

import numpy as np

from ..arrays import address, common_place, contiguous, dtype_of, empty, host, shape_of, stream
from ..errors import InputError
from ._core import _int, _lib, _real


class MergeTree(NamedTuple):
    """The hierarchy merge_regions builds over n leaves (nodes 0..n-1 are the leaves; node n + t is made by merge t).

    parent: (nodes,) parent node, -1 for the roots. height: (nodes,) merge distance at which each node was made
    (0 for leaves). area: (nodes,) pixels. coherence: (nodes,) area-weighted mean cosine between the node's leaf
    features and its mean feature (1 for a leaf, low for a region of unlike parts). levels: (L,) the cut levels,
    descending. snapshots: (L, n) int32, the node holding each leaf when the region count first reached each level.
    """

    parent: np.ndarray
    height: np.ndarray
    area: np.ndarray
    coherence: np.ndarray
    levels: np.ndarray
    snapshots: np.ndarray


def check_merge_inputs(op: str, edges: Any, area: Any, features: Any, colour: Any, levels: Any):
    """Contiguous arrays for merge_regions: edges (E, 2) int64 leaf pairs, area (n,) float64 > 0, features (n, D)
    float32, colour (n, C) float32, levels: distinct positive region counts, sorted descending."""
    area = np.ascontiguousarray(area, np.float64).reshape(-1)
    count = len(area)
    edges = np.ascontiguousarray(edges, np.int64).reshape(-1, 2)
    features = np.ascontiguousarray(features, np.float32)
    colour = np.ascontiguousarray(colour, np.float32)
    if features.ndim != 2 or len(features) != count or colour.ndim != 2 or len(colour) != count:
        raise InputError(f"{op}: features (n, D) and colour (n, C) need one row per leaf ({count}), got "
                         f"{features.shape} and {colour.shape}")
    if len(edges) and (edges.min() < 0 or edges.max() >= count or (edges[:, 0] == edges[:, 1]).any()):
        raise InputError(f"{op}: edges must join two different leaves in [0, {count})")
    if count and not (np.isfinite(area).all() and area.min() > 0 and np.isfinite(features).all()
                      and np.isfinite(colour).all()):
        raise InputError(f"{op}: areas must be positive and areas, features and colours finite")
    levels = np.array(sorted({_int(op, "levels", k, minimum=1) for k in levels}, reverse=True), np.int64)
    return edges, area, features, colour, levels


def merge_regions(edges: Any, area: Any, features: Any, colour: Any, levels: Any, colour_weight: float = 1.0,
                  size_weight: float = 3.0) -> MergeTree:
    """Greedy agglomerative merging of adjacent regions, closest pair first (average linkage on area-weighted
    means), until the region count reaches the smallest of `levels`.

    distance(i, j) = (1 - cos(f_i, f_j)) + colour_weight * |c_i - c_j| / 100 + size_weight * min(a_i, a_j) / A,
    f: the normalised area-weighted sum of the region's unit leaf features, c: its mean colour (Lab), a: its area,
    A: the image's area. The size term makes small fragments merge before large regions (as in selective search).
    Equal distances merge the pair with the smaller node ids first. edges: (E, 2) adjacent leaf pairs; area (n,);
    features (n, D); colour (n, C). Returns a MergeTree.
    """
    op = "merge_regions"
    edges, area, features, colour, levels = check_merge_inputs(op, edges, area, features, colour, levels)
    parent, height, node_area, coherence, snapshots, nodes = _lib().merge_regions(
        edges, area, features, colour, levels, _real(op, "colour_weight", colour_weight),
        _real(op, "size_weight", size_weight))
    return MergeTree(parent[:nodes], height[:nodes], node_area[:nodes], coherence[:nodes], levels, snapshots)


# ------------------------------------------------------------------------------------- the proposer on the device


def slic_grid(height: int, width: int, n_segments: int, compactness: float, min_size: float) -> tuple:
    """SLIC's sizes on an H x W image: (grid rows, grid columns, smallest kept piece in pixels, spatial weight).

    The grid has about n_segments cells of side S = sqrt(H W / n_segments) (1..H rows, 1..W columns); the weight
    (compactness / S')^2, S' the cells' mean side, scales squared pixel distances against squared Lab distances;
    pieces under min_size x the mean cell area join a neighbour."""
    step = math.sqrt(height * width / n_segments)
    rows = min(max(1, round(height / step)), height)
    cols = min(max(1, round(width / step)), width)
    cell_area = height * width / (rows * cols)
    return rows, cols, max(1, int(min_size * cell_area)), compactness * compactness / cell_area


def slic_superpixels(lab: Any, n_segments: int = 400, compactness: float = 10.0, iterations: int = 10,
                     min_size: float = 0.25, num_threads: int = 0):
    """SLIC superpixels of one (H, W, 3) Lab image (L in 0..100): (H, W) int32 labels 0..n-1, numbered in raster
    order of their first pixels (one image of slic_superpixels_batch)."""
    return slic_superpixels_batch([lab], n_segments, compactness, iterations, min_size, num_threads)[0]


def slic_superpixels_batch(labs: Sequence, n_segments: int = 400, compactness: float = 10.0, iterations: int = 10,
                           min_size: float = 0.25, num_threads: int = 0) -> list:
    """SLIC superpixels of a batch of (H, W, 3) Lab images (csrc/slic/slic.h): grid-seeded local k-means on colour +
    position (`iterations` rounds, each pixel choosing among the 3 x 3 nearest grid cells' centres), then
    4-connected pieces, pieces under `min_size` x the mean cell area joining their neighbour, labels compacted.
    Returns one (H, W) int32 label map per image where the images live (host: NumPy; CUDA: torch / CuPy on the
    library's current stream, one thread block per image)."""
    op = "slic_superpixels"
    n_segments = _int(op, "n_segments", n_segments, minimum=1)
    iterations = _int(op, "iterations", iterations, minimum=0)
    num_threads = _int(op, "num_threads", num_threads, minimum=0)
    compactness, min_size = _real(op, "compactness", compactness), _real(op, "min_size", min_size)
    if compactness < 0 or min_size < 0:
        raise InputError(f"{op}: compactness and min_size must be >= 0")
    where = common_place(op, labs)
    for lab in labs:
        shape = shape_of(lab)
        if len(shape) != 3 or shape[2] != 3 or shape[0] < 1 or shape[1] < 1 or dtype_of(lab).kind not in "fiu":
            raise InputError(f"{op}: images must be nonempty (H, W, 3) Lab arrays, got {dtype_of(lab)} {shape}")
    labs = [contiguous(lab, np.float32, where) for lab in labs]
    grids = [slic_grid(*shape_of(lab)[:2], n_segments, compactness, min_size) for lab in labs]
    shapes = np.array([[*shape_of(lab)[:2], *grid[:3]] for lab, grid in zip(labs, grids)], np.int64).reshape(-1, 5)
    weights = np.array([grid[3] for grid in grids], np.float64)
    labels = [empty(where, shape_of(lab)[:2], np.int32) for lab in labs]
    _lib().slic(where.index, stream(where), [address(x) for x in labs], [address(x) for x in labels], shapes,
                weights, iterations, num_threads)
    return labels


def merge_regions_rac(edges: Any, area: Any, features: Any, colour: Any, levels: Any, colour_weight: float = 1.0,
                      size_weight: float = 3.0, num_threads: int = 0) -> MergeTree:
    """merge_regions's hierarchy built in parallel rounds (one graph of merge_regions_rac_batch)."""
    return merge_regions_rac_batch([(edges, area, features, colour)], levels, colour_weight, size_weight,
                                   num_threads)[0]


def merge_regions_rac_batch(graphs: Sequence, levels: Any, colour_weight: float = 1.0, size_weight: float = 3.0,
                            num_threads: int = 0) -> list:
    """Agglomerative merging of adjacent regions in rounds of mutual nearest pairs (reciprocal agglomerative
    clustering, csrc/rac_merge/rac_merge.h), for a batch of region graphs (edges, area, features, colour) as
    merge_regions takes them, all with the same feature and colour widths. merge_regions's distance; each round, every
    region's nearest neighbour is found (ties: the smaller id) and all mutual pairs merge, in (distance, ids) order,
    the t-th making the next node; a cut level reached inside a round is recorded after exactly the merges that
    reach it. The distance is not reducible (merging can bring a region closer to a third), so the tree may differ
    from merge_regions's closest-pair-first one. Returns one MergeTree per graph: NumPy arrays for host inputs;
    for torch / CuPy arrays on a CUDA device, that library's arrays (one thread block per graph; the node counts
    are read back to the host to trim the arrays; device inputs are checked for shape only, their values are
    trusted as the proposer's own)."""
    op = "merge_regions_rac"
    num_threads = _int(op, "num_threads", num_threads, minimum=0)
    colour_weight, size_weight = _real(op, "colour_weight", colour_weight), _real(op, "size_weight", size_weight)
    levels = np.array(sorted({_int(op, "levels", k, minimum=1) for k in levels}, reverse=True), np.int64)
    if len(levels) > 16:
        raise InputError(f"{op}: at most 16 levels, got {len(levels)}")
    if not len(graphs):
        return []
    where = common_place(op, [x for graph in graphs for x in graph])
    checked = []
    for graph in graphs:
        if len(graph) != 4:
            raise InputError(f"{op}: each graph is (edges, area, features, colour)")
        if where.is_cuda:
            edges, area, features, colour = graph
            if len(shape_of(features)) != 2 or len(shape_of(colour)) != 2 or len(shape_of(edges)) != 2:
                raise InputError(f"{op}: edges (E, 2), area (n,), features (n, D), colour (n, C)")
        else:
            edges, area, features, colour, _ = check_merge_inputs(op, *graph, levels)
        checked.append((contiguous(edges, np.int64, where), contiguous(area, np.float64, where),
                        contiguous(features, np.float32, where), contiguous(colour, np.float32, where)))
    dims = {shape_of(g[2])[1] for g in checked}
    channels = {shape_of(g[3])[1] for g in checked}
    if len(dims) > 1 or len(channels) > 1:
        raise InputError(f"{op}: graphs of different feature or colour widths in one batch")
    sizes = np.array([[shape_of(g[0])[0], shape_of(g[1])[0]] for g in checked], np.int64)
    capacity = np.maximum(2 * sizes[:, 1] - 1, 1)
    nodes, leaves = int(capacity.sum()), int(sizes[:, 1].sum())
    parent, num_nodes = empty(where, (nodes,), np.int64), empty(where, (len(checked),), np.int64)
    height, area, coherence = (empty(where, (nodes,), np.float64) for _ in range(3))
    snapshots = empty(where, (leaves * len(levels),), np.int32)
    _lib().rac_merge(where.index, stream(where), *([address(g[k]) for g in checked] for k in range(4)), sizes,
                     dims.pop(), channels.pop(), levels.tolist(), colour_weight, size_weight, address(parent),
                     address(height), address(area), address(coherence), address(snapshots), address(num_nodes),
                     num_threads)
    trees, counts = [], host(num_nodes)
    node_start = np.concatenate([[0], np.cumsum(capacity)])
    leaf_start = np.concatenate([[0], np.cumsum(sizes[:, 1])]) * len(levels)
    for b, made in enumerate(counts):
        first = int(node_start[b])
        take = slice(first, first + int(made))
        trees.append(MergeTree(parent[take], height[take], area[take], coherence[take], levels,
                               snapshots[int(leaf_start[b]):int(leaf_start[b + 1])].reshape(len(levels), int(sizes[b, 1]))))
    return trees
