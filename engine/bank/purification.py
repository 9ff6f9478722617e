"""Semantic boundary purification (SBP): a class mask eroded, so that the pixels near its boundary (where the
pseudo-mask is least sure) do not feed its prototype, and dropped when too little of it is left."""

from __future__ import annotations

import cv2
import numpy as np

from ..config import Config


def erode(mask: np.ndarray, size: int) -> np.ndarray:
    """Erosion by a size x size square; outside the image counts as inside the mask, so image edges do not erode
    (OpenCV's default border, the same as iterating a 3x3 erosion)."""
    if size <= 1:
        return mask.astype(bool)
    kernel = np.ones((size, size), np.uint8)
    return cv2.erode(mask.astype(np.uint8), kernel).astype(bool)


def purify(mask: np.ndarray, config: Config) -> np.ndarray | None:
    """SBP of one class mask: erosion, then the mask is dropped (None) if fewer than `min_area` pixels remain.

    With `config.erosion == "adaptive"` the erosion shrinks, one 3x3 step at a time, to the largest number of steps
    (at most `erosion_iterations`) that still leaves `min_area` pixels, so a thin region is purified less rather than
    erased; a mask already smaller than `min_area` is still dropped.
    """
    steps = config.erosion_iterations
    kernel_step = config.erosion_kernel - 1

    def eroded(n_steps: int) -> np.ndarray:
        return erode(mask, 1 + kernel_step * n_steps)

    result = eroded(steps)
    if config.erosion == "adaptive" and result.sum() < config.min_area:
        # Eroded area is non-increasing in the number of steps: binary search the largest step count that keeps it.
        low, high = 0, steps  # invariant: eroded(low) may pass, eroded(high) fails
        if mask.sum() < config.min_area:
            return None
        while high - low > 1:
            middle = (low + high) // 2
            if eroded(middle).sum() >= config.min_area:
                low = middle
            else:
                high = middle
        result = eroded(low)
    return result if result.sum() >= config.min_area else None
