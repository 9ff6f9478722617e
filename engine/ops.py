"""The Python face of the compiled kernels in engine._C (csrc/): validate, convert, call — nothing else.

Regions are given as unions of atoms (engine.regions): an (H, W) atom map and an (N, A) membership matrix. Each op
returns exactly what its NumPy twin in engine.reference returns; the twins work on the materialised masks and are the
spec:

- soft_mask_pool    SMFA: soft-masked feature aggregation, one L2-normalised vector per region
- mask_nms_raster   class-specific greedy mask NMS + confidence-priority rasterisation
- merge_regions     the embedded proposer's agglomerative merging of adjacent regions

`engine.reference` has the same functions with the same signatures, so a caller picks an implementation by
module (`Engine(kernels="reference")`).
"""

from __future__ import annotations

import math
import operator
from typing import Any, NamedTuple

import numpy as np

from .errors import InputError

try:
    from . import _C
except ImportError as _error:  # not built: every op says how to build it
    _C = None
    _IMPORT_ERROR: ImportError | None = _error
else:
    _IMPORT_ERROR = None

__all__ = ["soft_mask_pool", "mask_nms_raster", "merge_regions", "MergeTree", "check_regions"]

_INT32 = np.iinfo(np.int32)
POOLINGS = ("soft", "hard")


def _lib():
    if _C is None:
        raise ImportError(
            "engine._C (the compiled kernels) is not built: run `pip install .` or, for development, "
            f"`pip install --no-build-isolation -Ceditable.mode=inplace -e .` ({_IMPORT_ERROR})"
        )
    return _C


# ----------------------------------------------------------------------------------------------------- validation


def _int(op: str, name: str, value: Any, minimum: int | None = None) -> int:
    if isinstance(value, (bool, np.bool_)):
        raise InputError(f"{op}: {name} must be an integer, got bool {value!r}")
    try:
        result = operator.index(value)
    except TypeError:
        raise InputError(f"{op}: {name} must be an integer, got {type(value).__name__} {value!r}") from None
    if minimum is not None and result < minimum:
        raise InputError(f"{op}: {name} must be >= {minimum}, got {result}")
    return result


def _real(op: str, name: str, value: Any) -> float:
    if isinstance(value, (bool, np.bool_)):
        raise InputError(f"{op}: {name} must be a real number, got bool {value!r}")
    try:
        result = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{op}: {name} must be a real number, got {type(value).__name__} {value!r}") from None
    if math.isnan(result):
        raise InputError(f"{op}: {name} must not be NaN")
    return result


def check_regions(op: str, atoms: Any, members: Any) -> tuple[np.ndarray, np.ndarray]:
    """atoms (H, W) integer ids in [0, A) and members (N, A) bool/0-1 -> contiguous int32 and uint8 arrays."""
    atoms = np.asarray(atoms)
    members = np.asarray(members)
    if atoms.ndim != 2 or atoms.dtype.kind not in "iu":
        raise InputError(f"{op}: atoms must be an (H, W) integer map, got {atoms.dtype} {atoms.shape}")
    if atoms.shape[0] < 1 or atoms.shape[1] < 1:
        raise InputError(f"{op}: atoms must have a nonzero height and width, got {atoms.shape}")
    if members.ndim != 2 or members.dtype.kind not in "biu":
        raise InputError(f"{op}: members must be an (N, A) bool matrix, got {members.dtype} {members.shape}")
    if atoms.min() < 0 or atoms.max() >= members.shape[1]:
        raise InputError(f"{op}: atom ids must lie in [0, {members.shape[1]}) (one column of members per atom), got "
                         f"{atoms.min()}..{atoms.max()}")
    atoms = np.ascontiguousarray(atoms, dtype=np.int32)
    # a bool matrix is one 0/1 byte per entry: view it as uint8 without a copy
    members = np.ascontiguousarray(members != 0 if members.dtype != np.bool_ else members).view(np.uint8)
    return atoms, members


def check_groups(op: str, groups: Any, dim: int) -> np.ndarray:
    """Feature-group widths: positive integers summing to the feature width `dim` (or none)."""
    widths = np.asarray([_int(op, "groups", g, minimum=1) for g in groups], np.int64)
    if len(widths) and widths.sum() != dim:
        raise InputError(f"{op}: feature groups {widths.tolist()} must sum to the feature width {dim}")
    return widths


def _grid(op: str, features_shape: tuple, height: int, width: int, stride: int) -> None:
    expected = (-(-height // stride), -(-width // stride))
    if tuple(int(s) for s in features_shape[:2]) != expected:
        raise InputError(
            f"{op}: features grid {tuple(features_shape[:2])} does not match an image of {height}x{width} at stride "
            f"{stride}: expected (ceil(H/stride), ceil(W/stride)) = {expected}"
        )


def _classes_scores(op: str, classes: Any, scores: Any, count: int) -> tuple[np.ndarray, np.ndarray]:
    classes = np.asarray(classes)
    scores = np.asarray(scores)
    if classes.shape != (count,):
        raise InputError(f"{op}: classes must be ({count},) to match members, got shape {classes.shape}")
    if not (np.issubdtype(classes.dtype, np.integer) or (classes.size == 0 and classes.dtype == np.float64)):
        raise InputError(f"{op}: classes must be integers, got dtype {classes.dtype}")
    if count and (classes.min() < _INT32.min or classes.max() > _INT32.max):
        raise InputError(f"{op}: classes must fit in int32 (the label map's type)")
    if scores.shape != (count,):
        raise InputError(f"{op}: scores must be ({count},) to match members, got shape {scores.shape}")
    if not (np.issubdtype(scores.dtype, np.floating) or np.issubdtype(scores.dtype, np.integer)):
        raise InputError(f"{op}: scores must be real numbers, got dtype {scores.dtype}")
    scores = np.ascontiguousarray(scores, np.float64)
    if not np.isfinite(scores).all():
        raise InputError(f"{op}: scores must be finite (found NaN or inf)")
    return np.ascontiguousarray(classes, np.int32), scores


# ----------------------------------------------------------------------------------------------------------- ops


def soft_mask_pool(features: Any, atoms: Any, members: Any, stride: int, pooling: str = "soft", eps: float = 1e-8,
                   normalize: bool = True, groups: Any = (), num_threads: int = 0) -> np.ndarray:
    """SMFA: one vector per region, sum_p w_p F_p / (sum_p w_p + eps), then L2-normalised (zero stays zero).

    features: (h, w, D) float patch features (converted to float32), (h, w) = (ceil(H / stride), ceil(W / stride));
    atoms (H, W), members (N, A): the regions. pooling "soft": w_p is the fraction of patch p's stride x stride pixels
    the region covers, pixels beyond H, W counting as uncovered (the image's zero padding); "hard" (the ablation
    without SMFA): w_p = 1 when the patch's centre pixel lies in the region. normalize=False returns the weighted
    mean. groups: widths of consecutive feature groups (the layers of a multi-layer backbone, summing to D), each
    L2-normalised before the whole vector, so that every layer weighs the same in the cosine; () is one group.
    num_threads: OpenMP threads (0 = default). Returns (N, D) float32.
    """
    op = "soft_mask_pool"
    stride = _int(op, "stride", stride, minimum=1)
    eps = _real(op, "eps", eps)
    num_threads = _int(op, "num_threads", num_threads, minimum=0)
    if pooling not in POOLINGS:
        raise InputError(f"{op}: pooling must be one of {POOLINGS}, got {pooling!r}")
    atoms, members = check_regions(op, atoms, members)
    features = np.asarray(features)
    if features.ndim != 3:
        raise InputError(f"{op}: features must be (h, w, D), got shape {features.shape}")
    if not np.issubdtype(features.dtype, np.floating):
        raise InputError(f"{op}: features must be floating point (float32), got dtype {features.dtype}")
    _grid(op, features.shape, *atoms.shape, stride)
    features = np.ascontiguousarray(features, np.float32)
    groups = check_groups(op, groups, features.shape[2])
    return _lib().soft_mask_pool(features, atoms, members, stride, pooling == "hard", eps, bool(normalize), groups,
                                 num_threads)


def mask_nms_raster(atoms: Any, members: Any, classes: Any, scores: Any, iou_threshold: float, background: int = 0,
                    num_threads: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Class-specific greedy mask NMS, then confidence-priority rasterisation.

    Processing order is score descending, equal scores in index order. A region is suppressed when its IoU with an
    already kept region of the same class is > iou_threshold (equal is kept; an empty union has IoU 0). Kept regions
    paint in processing order and a pixel keeps the first label it gets; unpainted pixels are `background`.
    atoms (H, W), members (N, A): the regions; classes: (N,) integers (fit in int32); scores: (N,) finite reals.
    Returns keep (N,) bool, label_map (H, W) int32, owner (H, W) int32 (index of the painting region, -1 if none).
    """
    op = "mask_nms_raster"
    iou_threshold = _real(op, "iou_threshold", iou_threshold)
    background = _int(op, "background", background)
    if not _INT32.min <= background <= _INT32.max:
        raise InputError(f"{op}: background must fit in int32, got {background}")
    num_threads = _int(op, "num_threads", num_threads, minimum=0)
    atoms, members = check_regions(op, atoms, members)
    classes, scores = _classes_scores(op, classes, scores, members.shape[0])
    return _lib().mask_nms_raster(atoms, members, classes, scores, iou_threshold, background, num_threads)


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
