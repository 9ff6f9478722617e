"""Image structure for the embedded proposer: grid-seeded watershed superpixels, the region adjacency graph and
per-region means. Pure NumPy + OpenCV, no weights.

Grid-seeded watershed (seeds on a regular grid flooding the Lab image's gradient) is about 25x faster than
scikit-image's felzenszwalb or SLIC at ~300 segments with the same achievable segmentation accuracy on VOC. Every
step is bounded: any image of at least one pixel gets at least one seed, and boundary pixels take their nearest
region's label in one pass, however degenerate the image (1 x 5000, a single pixel).
"""

from __future__ import annotations

import cv2
import numpy as np

from .. import ops
from ..boundaries import nearest_known

#: images are never worked on below this side (pixels): watershed needs room for its one-pixel border
MIN_WORKING_SIDE = 16


def superpixels(image: np.ndarray, n_segments: int = 400, scale: float = 1.0, sigma: float = 1.0) -> np.ndarray:
    """(H, W) int32 labels 0..n-1 of about `n_segments` superpixels of an HxWx3 uint8 RGB image.

    scale: the watershed runs on the image resized by this factor (area interpolation; 0.5 costs about a quarter),
        and the labels are brought back to H x W by nearest-neighbour resizing.
    """
    return superpixel_graph(image, n_segments, scale, sigma)[0]


def superpixel_graph(image: np.ndarray, n_segments: int = 400, scale: float = 1.0,
                     sigma: float = 1.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Superpixels with their graph: (H, W) int32 labels 0..n-1, (E, 2) adjacent pairs, and (n, 3) float32 mean Lab
    colours (L in 0..100, a and b offset by 128), the last two measured at the working scale."""
    height, width = image.shape[:2]
    small = image
    if scale != 1.0 and min(height, width) * scale >= MIN_WORKING_SIDE:
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        small = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    lab = cv2.cvtColor(small, cv2.COLOR_RGB2LAB)
    labels = _watershed(lab, n_segments, sigma)
    colour = region_means(labels, lab.astype(np.float32)).astype(np.float32)
    colour[:, 0] *= 100.0 / 255.0  # OpenCV's 8-bit L is 0..255; a and b are offset by 128, same unit
    edges = adjacency(labels)
    if labels.shape != (height, width):
        # enlarging by nearest neighbour keeps every label and every adjacency of the small map
        labels = cv2.resize(labels, (width, height), interpolation=cv2.INTER_NEAREST)
    return labels, edges, colour


def _watershed(lab: np.ndarray, n_segments: int, sigma: float) -> np.ndarray:
    """Labels of the grid-seeded watershed of an 8-bit Lab image."""
    height, width = lab.shape[:2]
    if sigma > 0:
        lab = cv2.GaussianBlur(lab, (0, 0), sigma)
    step = max(2.0, float(np.sqrt(height * width / max(n_segments, 1))))
    # seed rows and columns on a regular grid; at least one each, so every image has a seed
    ys = np.unique(np.minimum(np.arange(step / 2, max(height, step / 2 + 1), step).astype(int), height - 1))
    xs = np.unique(np.minimum(np.arange(step / 2, max(width, step / 2 + 1), step).astype(int), width - 1))
    markers = np.zeros((height, width), np.int32)
    markers[np.ix_(ys, xs)] = np.arange(1, len(ys) * len(xs) + 1, dtype=np.int32).reshape(len(ys), len(xs))
    labels = cv2.watershed(lab, markers)
    unlabelled = labels <= 0  # watershed's boundaries (-1), and its one-pixel frame on tiny images
    if unlabelled.any():
        labels[unlabelled] = 0
        grown = cv2.dilate(labels.astype(np.float32), np.ones((3, 3), np.uint8)).astype(np.int32)
        labels[unlabelled] = grown[unlabelled]
        unlabelled = labels <= 0
        if unlabelled.any():
            labels = _nearest_label(labels, unlabelled)
    return compact_labels(labels)


def _nearest_label(labels: np.ndarray, unlabelled: np.ndarray) -> np.ndarray:
    """Every unlabelled pixel takes the label of its nearest labelled pixel (one distance transform); with no
    labelled pixel at all the image is one region."""
    if unlabelled.all():
        return np.ones_like(labels)
    return nearest_known(labels, unlabelled, cv2.DIST_MASK_3)


def compact_labels(labels: np.ndarray) -> np.ndarray:
    """Labels renumbered 0..n-1 in order of their values (a seed whose basin was swallowed leaves a gap)."""
    present = np.bincount(labels.ravel(), minlength=int(labels.max()) + 1) > 0
    lut = (np.cumsum(present) - 1).astype(np.int32)
    return lut[labels]


def adjacency(labels: np.ndarray) -> np.ndarray:
    """(E, 2) int64 unique pairs (a < b) of 4-adjacent regions."""
    n = int(labels.max()) + 1
    pairs = []
    for a, b in ((labels[:, :-1], labels[:, 1:]), (labels[:-1, :], labels[1:, :])):
        differ = a != b
        lo = np.minimum(a[differ], b[differ]).astype(np.int64)
        hi = np.maximum(a[differ], b[differ]).astype(np.int64)
        pairs.append(lo * n + hi)
    codes = np.unique(np.concatenate(pairs))
    return np.stack([codes // n, codes % n], axis=1)


def region_means(labels: np.ndarray, values: np.ndarray) -> np.ndarray:
    """(n, C) mean of an (H, W) or (H, W, C) array over each region."""
    flat = labels.ravel()
    n = int(labels.max()) + 1
    area = np.maximum(np.bincount(flat, minlength=n), 1).astype(np.float64)
    values = values.reshape(len(flat), -1)
    return np.stack([np.bincount(flat, weights=values[:, c], minlength=n) / area
                     for c in range(values.shape[1])], axis=1)


def slic_graph(image: np.ndarray, n_segments: int = 400, scale: float = 1.0, compactness: float = 10.0,
               iterations: int = 10, num_threads: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """superpixel_graph with SLIC superpixels (engine.ops.slic_superpixels, the kernel the GPU runs too) on the
    float Lab image (L 0..100; colours offset by 128 in a and b, as superpixel_graph's)."""
    height, width = image.shape[:2]
    small = image
    if scale != 1.0 and min(height, width) * scale >= 1:
        small = cv2.resize(image, (max(1, round(width * scale)), max(1, round(height * scale))),
                           interpolation=cv2.INTER_AREA)
    lab = cv2.cvtColor(small.astype(np.float32) / 255.0, cv2.COLOR_RGB2LAB)
    labels = ops.slic_superpixels(lab, n_segments, compactness, iterations, num_threads=num_threads)
    colour = region_means(labels, lab).astype(np.float32)
    colour[:, 1:] += 128.0
    edges = adjacency(labels)
    if labels.shape != (height, width):
        labels = cv2.resize(labels, (width, height), interpolation=cv2.INTER_NEAREST)
    return labels, edges, colour
