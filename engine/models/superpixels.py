"""Image structure for the embedded proposer: grid-seeded watershed superpixels, per-region statistics, the region
adjacency graph, and agglomerative merging of adjacent regions into a hierarchy.

Pure NumPy + OpenCV (no weights). Grid-seeded watershed (seeds on a regular grid, flooding the colour gradient) was
chosen by measurement on voc2012-mini train: about 25x faster than scikit-image's felzenszwalb or SLIC at ~300
segments, with the same achievable segmentation accuracy (98.9% vs 98.1-99.4%), and without another dependency.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import cv2
import numpy as np


def superpixels(image: np.ndarray, n_segments: int = 300, sigma: float = 1.0, lab: np.ndarray | None = None) -> np.ndarray:
    """(H, W) int32 labels 0..n-1 of about `n_segments` superpixels of an HxWx3 uint8 RGB image.

    Seeds on a regular grid flood the Lab image's gradient (cv2.watershed); watershed's boundary pixels take the
    largest neighbouring label, so every pixel belongs to a region. `lab`: the image in 8-bit Lab if already at hand.
    """
    height, width = image.shape[:2]
    if lab is None:
        lab = cv2.cvtColor(image, cv2.COLOR_RGB2LAB)
    if sigma > 0:
        lab = cv2.GaussianBlur(lab, (0, 0), sigma)
    step = max(2.0, float(np.sqrt(height * width / max(n_segments, 1))))
    ys = np.arange(step / 2, height, step).astype(int)
    xs = np.arange(step / 2, width, step).astype(int)
    markers = np.zeros((height, width), np.int32)
    grid = np.arange(1, len(ys) * len(xs) + 1, dtype=np.int32).reshape(len(ys), len(xs))
    markers[np.ix_(ys, xs)] = grid
    labels = cv2.watershed(lab, markers)
    boundary = labels <= 0
    if boundary.any():
        labels[boundary] = 0
        grown = cv2.dilate(labels.astype(np.float32), np.ones((3, 3), np.uint8)).astype(np.int32)
        labels[boundary] = grown[boundary]
        still = labels <= 0  # a boundary pixel with only boundary neighbours (rare): take the next pass
        while still.any():
            grown = cv2.dilate(labels.astype(np.float32), np.ones((3, 3), np.uint8)).astype(np.int32)
            labels[still] = grown[still]
            still = labels <= 0
    # relabel to 0..n-1 (a seed whose basin was swallowed leaves a gap)
    present = np.bincount(labels.ravel(), minlength=int(grid.max()) + 1) > 0
    lut = np.cumsum(present) - 1
    return lut[labels].astype(np.int32)


def adjacency(labels: np.ndarray) -> np.ndarray:
    """(E, 2) int64 unique pairs (a < b) of 4-adjacent regions."""
    n = int(labels.max()) + 1
    pairs = []
    for a, b in ((labels[:, :-1], labels[:, 1:]), (labels[:-1, :], labels[1:, :])):
        differ = a != b
        lo = np.minimum(a[differ], b[differ]).astype(np.int64)
        hi = np.maximum(a[differ], b[differ]).astype(np.int64)
        pairs.append(lo * n + hi)
    codes = np.unique(np.concatenate(pairs)) if pairs else np.zeros(0, np.int64)
    return np.stack([codes // n, codes % n], axis=1)


def pool_grid(labels: np.ndarray, grid: np.ndarray, scale: float, cell: int) -> np.ndarray:
    """Mean of a coarse (h, w, D) feature grid over each region: pixel (y, x) of the HxW label map falls in cell
    (floor(y * scale / cell), floor(x * scale / cell)) — `scale` maps native pixels to the grid's input pixels."""
    height, width = labels.shape
    gh, gw, dim = grid.shape
    rows = np.minimum((np.arange(height) * scale / cell).astype(np.int64), gh - 1)
    cols = np.minimum((np.arange(width) * scale / cell).astype(np.int64), gw - 1)
    cell_index = rows[:, None] * gw + cols[None, :]
    n = int(labels.max()) + 1
    counts = np.bincount((labels.astype(np.int64) * (gh * gw) + cell_index).ravel(),
                         minlength=n * gh * gw).reshape(n, gh * gw).astype(np.float32)
    counts /= np.maximum(counts.sum(axis=1, keepdims=True), 1)
    return counts @ grid.reshape(gh * gw, dim).astype(np.float32)


def region_means(labels: np.ndarray, values: np.ndarray) -> np.ndarray:
    """(n, C) mean of an (H, W) or (H, W, C) array over each region."""
    flat = labels.ravel()
    n = int(labels.max()) + 1
    area = np.maximum(np.bincount(flat, minlength=n), 1).astype(np.float64)
    values = values.reshape(len(flat), -1)
    return np.stack([np.bincount(flat, weights=values[:, c], minlength=n) / area
                     for c in range(values.shape[1])], axis=1)


@dataclass
class Hierarchy:
    """Agglomerative merge tree over n leaf regions.

    parent: (2n-1,) node -> parent node (-1 for roots); nodes 0..n-1 are the leaves, node n+t is made by merge t.
    height: (2n-1,) merge distance at which each node was made (0 for leaves).
    death: (2n-1,) distance at which the node was merged into its parent (its last merge's height for roots).
    area: (2n-1,) pixels per node.
    saliency: (2n-1,) mean saliency per node.
    coherence: (2n-1,) area-weighted mean cosine between the node's leaf features and the node's mean feature
        (1 for a leaf; low for a region mixing unlike parts).
    snapshots: {number of regions: (n,) leaf -> node alive at that point of the merging}.
    """

    parent: np.ndarray
    height: np.ndarray
    death: np.ndarray
    area: np.ndarray
    saliency: np.ndarray
    coherence: np.ndarray
    snapshots: dict


def merge_regions(edges: np.ndarray, area: np.ndarray, features: np.ndarray, colour: np.ndarray,
                  saliency: np.ndarray, levels, colour_weight: float = 1.0, saliency_weight: float = 1.0,
                  size_weight: float = 1.0) -> Hierarchy:
    """Greedy agglomerative merging of adjacent regions, closest pair first (average linkage on area-weighted means).

    distance(i, j) = (1 - cos(f_i, f_j)) + colour_weight * |lab_i - lab_j| / 100 + saliency_weight * |s_i - s_j|
                     + size_weight * min(a_i, a_j) / A
    The size term makes small fragments merge before large regions (as in selective search), so intermediate levels
    hold few slivers. `levels` are the region counts at which the current partition is recorded; merging stops at
    the smallest.
    """
    n = len(area)
    total = float(area.sum())
    nodes = max(2 * n - 1, 1)
    # per-node means (features kept unit-length, so cosine is a dot product)
    feat = np.zeros((nodes, features.shape[1]), np.float32)
    feat_sum = np.zeros((nodes, features.shape[1]), np.float32)
    col = np.zeros((nodes, colour.shape[1]), np.float32)
    sal = np.zeros(nodes, np.float32)
    size = np.zeros(nodes, np.float64)
    size[:n] = area
    feat[:n] = _unit(features)
    feat_sum[:n] = feat[:n] * area[:, None]
    col[:n] = colour
    sal[:n] = saliency
    parent = np.full(nodes, -1, np.int64)
    height = np.zeros(nodes)
    death = np.zeros(nodes)
    neighbours: list[set] = [set() for _ in range(nodes)]
    for a, b in edges:
        neighbours[a].add(int(b))
        neighbours[b].add(int(a))

    def distances(i: int, others: np.ndarray) -> np.ndarray:
        diff = col[others] - col[i]
        return (1.0 - feat[others] @ feat[i] + (colour_weight / 100.0) * np.sqrt((diff * diff).sum(1))
                + saliency_weight * np.abs(sal[others] - sal[i]) + (size_weight / total) * np.minimum(size[others], size[i]))

    if len(edges):
        a, b = edges[:, 0], edges[:, 1]
        d0 = (1.0 - np.einsum("ij,ij->i", feat[a], feat[b]) + colour_weight / 100.0 * np.linalg.norm(col[a] - col[b], axis=1)
              + saliency_weight * np.abs(sal[a] - sal[b]) + size_weight * np.minimum(size[a], size[b]) / total)
        heap = list(zip(d0.tolist(), a.tolist(), b.tolist()))
    else:
        heap = []
    heapq.heapify(heap)
    alive = np.zeros(nodes, bool)
    alive[:n] = True
    levels = sorted({int(k) for k in levels if 1 <= k <= n}, reverse=True)
    stop = levels[-1] if levels else 1  # merging past the coarsest cut would only build unused nodes
    snapshots = {}
    count, new = n, n
    leaf_node = np.arange(n)
    members: list[list[int]] = [[i] for i in range(n)] + [[] for _ in range(n - 1)]

    def snapshot_if_due():
        while levels and count <= levels[0]:
            snapshots[levels.pop(0)] = leaf_node.copy()

    snapshot_if_due()
    while heap and count > stop:
        d, i, j = heapq.heappop(heap)
        if not (alive[i] and alive[j]):
            continue
        alive[i] = alive[j] = False
        parent[i] = parent[j] = new
        death[i] = death[j] = d
        height[new] = d
        size[new] = size[i] + size[j]
        wi, wj = size[i] / size[new], size[j] / size[new]
        feat_sum[new] = feat_sum[i] + feat_sum[j]
        feat[new] = feat_sum[new] / max(float(np.sqrt(feat_sum[new] @ feat_sum[new])), 1e-12)
        col[new] = wi * col[i] + wj * col[j]
        sal[new] = wi * sal[i] + wj * sal[j]
        members[new] = members[i] + members[j]
        members[i] = members[j] = []
        leaf_node[members[new]] = new
        around = (neighbours[i] | neighbours[j]) - {i, j}
        for k in around:
            neighbours[k].discard(i)
            neighbours[k].discard(j)
            neighbours[k].add(new)
        neighbours[new] = around
        neighbours[i] = neighbours[j] = set()
        alive[new] = True
        if around:
            others = np.fromiter(around, np.int64, len(around))
            for dk, k in zip(distances(new, others).tolist(), others.tolist()):
                heapq.heappush(heap, (dk, new, k))
        new += 1
        count -= 1
        snapshot_if_due()
    roots = np.flatnonzero(alive[:new])
    death[roots] = height[roots]
    # leaf features are unit vectors, so sum_l a_l cos(f_l, mean) = |sum_l a_l f_l|
    coherence = np.linalg.norm(feat_sum[:new], axis=1) / np.maximum(size[:new], 1e-12)
    coherence[:n] = 1.0
    return Hierarchy(parent[:new], height[:new], death[:new], size[:new], sal[:new].copy(),
                     np.clip(coherence, 0, 1).astype(np.float32), snapshots)


def _unit(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return (x / np.maximum(norm, 1e-12)).astype(np.float32)
