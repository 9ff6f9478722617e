"""Small pure helpers shared by the bank, the pipeline and the models: input checks, padding, bucketing."""

from __future__ import annotations

import hashlib
from collections import defaultdict
from typing import Sequence

import numpy as np

from .errors import InputError


def check_image(image, name: str = "image", max_pixels: int | None = None) -> np.ndarray:
    """Return `image` as a C-contiguous HxWx3 uint8 RGB array, or raise InputError saying what is wrong (including
    more than `max_pixels` pixels)."""
    if not isinstance(image, np.ndarray):
        raise InputError(f"{name}: expected a numpy array HxWx3 uint8 RGB, got {type(image).__name__}")
    if image.ndim == 2:
        raise InputError(f"{name}: grayscale image of shape {image.shape}; convert it to RGB (HxWx3) first")
    if image.ndim != 3 or image.shape[2] != 3:
        extra = " (RGBA? drop the alpha channel)" if image.ndim == 3 and image.shape[2] == 4 else ""
        raise InputError(f"{name}: expected shape HxWx3 (RGB), got {image.shape}{extra}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise InputError(f"{name}: empty image of shape {image.shape}")
    if image.dtype != np.uint8:
        raise InputError(f"{name}: expected dtype uint8, got {image.dtype}")
    if max_pixels is not None and image.shape[0] * image.shape[1] > max_pixels:
        raise InputError(f"{name}: {image.shape[0]}x{image.shape[1]} = {image.shape[0] * image.shape[1]:,} pixels is "
                         f"over Config.max_image_pixels ({max_pixels:,}); shrink the image or raise the limit")
    return np.ascontiguousarray(image)


def check_masks(masks, height: int, width: int, name: str = "masks") -> np.ndarray:
    """Return `masks` as a C-contiguous (N, height, width) bool array, or raise InputError."""
    masks = np.asarray(masks)
    if masks.ndim != 3 or masks.shape[1:] != (height, width):
        raise InputError(f"{name}: expected shape (N, {height}, {width}), got {masks.shape}")
    if masks.dtype != np.bool_:
        if masks.dtype.kind not in "biu":
            raise InputError(f"{name}: expected bool or integer 0/1 masks, got dtype {masks.dtype}")
        masks = masks != 0
    return np.ascontiguousarray(masks)


def ceil_div(value: int, divisor: int) -> int:
    """ceil(value / divisor) for non-negative integers: the patch-grid size of `value` pixels at a stride."""
    return -(-value // divisor)


def padded_size(height: int, width: int, multiple: int) -> tuple[int, int]:
    """Size after zero-padding bottom/right to a multiple of `multiple`."""
    return ceil_div(height, multiple) * multiple, ceil_div(width, multiple) * multiple


def pad_to_multiple(array: np.ndarray, multiple: int) -> np.ndarray:
    """Zero-pad the first two axes of `array` bottom/right to a multiple of `multiple` (no resize, as the method)."""
    height, width = array.shape[:2]
    target_h, target_w = padded_size(height, width, multiple)
    if (target_h, target_w) == (height, width):
        return array
    padding = [(0, target_h - height), (0, target_w - width)] + [(0, 0)] * (array.ndim - 2)
    return np.pad(array, padding)


def bucket_by_size(sizes: Sequence[tuple[int, int]], batch_size: int) -> list[list[int]]:
    """Group indices of equal (padded) size into batches of at most `batch_size`, in first-seen order."""
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for index, size in enumerate(sizes):
        groups[size].append(index)
    return [members[i:i + batch_size] for members in groups.values() for i in range(0, len(members), batch_size)]


def rle_encode(mask: np.ndarray) -> dict:
    """Uncompressed COCO run-length encoding of an (H, W) binary mask: {"size": [H, W], "counts": [...]}, runs of
    alternating 0s and 1s in column-major order, starting with 0s (as pycocotools and SAM's records)."""
    mask = np.asarray(mask, bool)
    flat = mask.ravel(order="F")
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        counts = [0] + counts
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": [int(c) for c in counts]}


#: how Result.segments gives a mask (segment-anything's output modes)
MASK_OUTPUT_MODES = ("binary_mask", "uncompressed_rle", "coco_rle")


def encode_mask(mask: np.ndarray, output_mode: str = "uncompressed_rle"):
    """An (H, W) binary mask as `output_mode`: "binary_mask" (the bool array), "uncompressed_rle" (rle_encode) or
    "coco_rle" (COCO's compressed RLE, counts as a str, made by pycocotools: `pip install pycocotools`)."""
    if output_mode == "binary_mask":
        return np.asarray(mask, bool)
    if output_mode == "uncompressed_rle":
        return rle_encode(mask)
    if output_mode != "coco_rle":
        raise InputError(f"output_mode must be one of {MASK_OUTPUT_MODES}, got {output_mode!r}")
    return compress_rle(rle_encode(mask))


def compress_rle(rle: dict) -> dict:
    """COCO's compressed RLE ({"size", "counts": str}) of an uncompressed one, made by pycocotools (which decodes
    only the compressed form)."""
    try:
        from pycocotools import mask as coco_mask
    except ImportError:
        raise InputError("output_mode 'coco_rle' needs pycocotools: pip install pycocotools "
                         "(or 'moduseg-engine[coco]')") from None
    height, width = rle["size"]
    compressed = coco_mask.frPyObjects({"size": [height, width], "counts": list(rle["counts"])}, height, width)
    return {"size": [int(height), int(width)], "counts": compressed["counts"].decode("ascii")}


def rle_decode(rle: dict) -> np.ndarray:
    """The (H, W) bool mask of an uncompressed COCO run-length encoding (rle_encode's inverse)."""
    height, width = rle["size"]
    values = np.arange(len(rle["counts"])) % 2 == 1
    flat = np.repeat(values, rle["counts"])
    if flat.size != height * width:
        raise InputError(f"RLE counts cover {flat.size} pixels, size {height}x{width} needs {height * width}")
    return flat.reshape((height, width), order="F")


def mask_box(mask: np.ndarray) -> list[int]:
    """[x, y, width, height] of the smallest box holding a mask's pixels ([0, 0, 0, 0] for an empty mask)."""
    rows, columns = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if not len(rows):
        return [0, 0, 0, 0]
    return [int(columns[0]), int(rows[0]), int(columns[-1] - columns[0] + 1), int(rows[-1] - rows[0] + 1)]


def file_sha256(path) -> str:
    """Hex sha256 of a file's bytes, read in 4 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()
