"""Label-map refinement after painting: class boundaries snapped to the image's edges, and pixels that no proposal
painted given the nearest painted class where the bank has no background class to give them.

Proposals are unions of superpixels made at half scale, so a painted boundary can sit a few pixels off the object's
edge. `snap_to_edges` runs a guided filter (He, Sun and Tang, "Guided Image Filtering", 2013) over the indicator of
each class present, guided by the image's grey levels, and gives every pixel the class of the largest filtered
indicator. Within each window the filter fits q = a * I + b to the indicator p by least squares (a regularised by
eps), then averages the (a, b) of the windows over each pixel: where the image is flat the indicator is smoothed,
where it has an edge the output follows the edge. The coefficients are computed at 1/`subsample` of the resolution
and applied at full resolution (the fast guided filter, He and Sun 2015): the windows are large, the cost small.
"""

from __future__ import annotations

import cv2
import numpy as np

class LabelMapRefiner:
    """The refinements after painting that a Config asks for, on one image's label map and owner map.

    Config.fill_unpainted acts where the bank has no background class (`has_background` False); Config.boundary_radius
    and boundary_eps snap boundaries when `snap` (the engine's proposer's regions; proposals the caller gives are
    exact by assumption). A pixel whose class changes becomes no proposal's (owner -1), so that every segment keeps
    to its class."""

    def __init__(self, config, has_background: bool) -> None:
        self.fill = config.fill_unpainted and not has_background
        self.radius, self.eps = config.boundary_radius, config.boundary_eps

    def __call__(self, image: np.ndarray, label_map: np.ndarray, owner: np.ndarray, snap: bool = True) -> tuple:
        refined = fill_unpainted(label_map, owner) if self.fill else label_map
        if snap:
            refined = snap_to_edges(refined, image, self.radius, self.eps)
        if refined is not label_map:
            owner = np.where(refined == label_map, owner, -1).astype(owner.dtype, copy=False)
        return refined, owner


#: the guided filter's coefficients are computed at this fraction of the image's side (1 = full resolution)
SUBSAMPLE = 4


def snap_to_edges(label_map: np.ndarray, image: np.ndarray, radius: int, eps: float,
                  subsample: int = SUBSAMPLE) -> np.ndarray:
    """The label map (H, W) with each pixel given the class whose guided-filtered indicator is largest there.

    image: the (H, W, 3) uint8 RGB image (its grey levels in [0, 1] guide the filter). radius: the half side of the
    filter's square window in full-resolution pixels (0 returns the map unchanged). eps: the regulariser of the
    slope a, in squared grey levels: edges weaker than about sqrt(eps) are smoothed over. Exact ties keep the lower
    class id."""
    if radius <= 0:
        return label_map
    classes = np.flatnonzero(np.bincount(label_map.ravel()))  # the classes present (a sort would cost more)
    if len(classes) < 2:
        return label_map
    height, width = label_map.shape
    factor = max(1, min(int(subsample), height, width))
    # mirrored up to whole factor x factor blocks, so that shrinking is an exact block mean (OpenCV's fast path)
    pad = (-height % factor, -width % factor)
    grey = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2GRAY).astype(np.float32) / 255.0
    padded_labels = _mirror(np.ascontiguousarray(label_map), pad)
    full = padded_labels.shape[::-1]
    small = (full[0] // factor, full[1] // factor)
    guide = _shrink(_mirror(grey, pad), small)
    window = 2 * max(1, round(radius / factor)) + 1
    mean_guide = _box(guide, window)
    var_guide = _box(guide * guide, window) - mean_guide * mean_guide
    best = np.full((height, width), -np.inf, np.float32)
    refined = label_map.copy()
    for class_id in classes:  # ascending: a later class must be strictly larger to win a tie
        indicator = _shrink((padded_labels == class_id).astype(np.float32), small)
        mean_indicator = _box(indicator, window)
        slope = (_box(guide * indicator, window) - mean_guide * mean_indicator) / (var_guide + eps)
        offset = mean_indicator - slope * mean_guide
        filtered = _grow(_box(slope, window), full)[:height, :width] * grey
        filtered += _grow(_box(offset, window), full)[:height, :width]
        wins = filtered > best
        np.copyto(best, filtered, where=wins)
        np.putmask(refined, wins, class_id)
    return refined


def fill_unpainted(label_map: np.ndarray, owner: np.ndarray) -> np.ndarray:
    """The label map with every pixel no proposal painted (owner -1) given the class of its nearest painted pixel
    (OpenCV's 5 x 5 chamfer approximation of the Euclidean distance). Unchanged when every pixel or none was
    painted."""
    unpainted = owner < 0
    if not unpainted.any() or unpainted.all():
        return label_map
    return nearest_known(label_map, unpainted, cv2.DIST_MASK_5)


def nearest_known(values: np.ndarray, unknown: np.ndarray, mask_size: int) -> np.ndarray:
    """`values` with every `unknown` pixel given the value of its nearest known pixel (one OpenCV distance transform
    with a 3 x 3 or 5 x 5 chamfer mask; some pixel must be known)."""
    _, nearest = cv2.distanceTransformWithLabels(unknown.astype(np.uint8), cv2.DIST_L2, mask_size,
                                                 labelType=cv2.DIST_LABEL_PIXEL)
    # DIST_LABEL_PIXEL numbers the known (zero) pixels 1.. in raster order
    known = np.flatnonzero(~unknown.ravel())
    return values.ravel()[known[nearest.ravel() - 1]].reshape(values.shape)


def _box(values: np.ndarray, window: int) -> np.ndarray:
    """Mean over the window x window square around each pixel, the image mirrored at its borders."""
    return cv2.boxFilter(values, -1, (window, window), borderType=cv2.BORDER_REFLECT)


def _mirror(values: np.ndarray, pad: tuple[int, int]) -> np.ndarray:
    """The array mirrored past its bottom and right edges by pad = (rows, columns)."""
    if not any(pad):
        return values
    return cv2.copyMakeBorder(values, 0, pad[0], 0, pad[1], cv2.BORDER_REFLECT)


def _shrink(values: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return values if values.shape[::-1] == size else cv2.resize(values, size, interpolation=cv2.INTER_AREA)


def _grow(values: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return values if values.shape[::-1] == size else cv2.resize(values, size, interpolation=cv2.INTER_LINEAR)
