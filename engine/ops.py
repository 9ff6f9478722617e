"""The Python face of the compiled kernels in engine._C (csrc/): validate, convert, call — nothing else.

Regions are given as unions of atoms (engine.regions): an (H, W) atom map and an (N, A) membership matrix. Each op
returns exactly what its NumPy twin in engine.reference returns; the twins work on the materialised masks and are the
spec:

- soft_mask_pool(_batch)   SMFA: soft-masked feature aggregation, one L2-normalised vector per region
- mask_nms_raster(_batch)  class-specific greedy mask NMS + confidence-priority rasterisation
- vote                     the retrieval vote over each query's K neighbours
- merge_regions            the embedded proposer's agglomerative merging of adjacent regions (CPU)
- slic_superpixels(_batch)  SLIC superpixels of Lab images (the embedded proposer's leaves, on either device)
- merge_regions_rac(_batch) merging in rounds of mutual nearest pairs (the parallel merge_regions, either device)

The `_batch` ops take a whole batch of images in one call (one launch sequence per batch, however many images and
regions). Each op has one body for both devices (csrc/<op>/<op>.h): NumPy arrays run the CPU (OpenMP) launcher,
torch tensors or CuPy arrays on a CUDA device run the CUDA launcher on the library's current stream and come back
as that library's arrays on that device (engine.arrays). `engine.reference` has the same functions with the same
signatures (host arrays only), so a caller picks an implementation by module (`Engine(kernels="reference")`).
"""

from __future__ import annotations

import math
import operator
from typing import Any, NamedTuple, Sequence

import numpy as np

from .arrays import Place, address, common_place, contiguous, dtype_of, empty, host, place, shape_of, stream
from .errors import InputError

try:
    from . import _C
except ImportError as _error:  # not built: every op says how to build it
    _C = None
    _IMPORT_ERROR: ImportError | None = _error
else:
    _IMPORT_ERROR = None

__all__ = ["soft_mask_pool", "soft_mask_pool_batch", "mask_nms_raster", "mask_nms_raster_batch", "vote",
           "merge_regions", "MergeTree",
           "slic_superpixels", "slic_superpixels_batch", "slic_grid", "merge_regions_rac", "merge_regions_rac_batch", "check_regions", "build_info", "cuda_launches"]

_INT32 = np.iinfo(np.int32)
POOLINGS = ("soft", "hard")
#: the vote's methods and their codes in csrc/vote/vote.h
VOTE_METHODS = {"count": 0, "balanced": 1, "weighted": 2}
#: feature groups (backbone layers) a vector may have (csrc/smfa/smfa.h: kMaxGroups)
MAX_GROUPS = 16


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


def _regions_on(op: str, where: Place, atoms: Sequence, members: Sequence) -> tuple[list, list]:
    """Per-image atoms (int32) and members (uint8) on `where`: host arrays fully checked (check_regions), device
    arrays checked for rank and shape only (reading their values would wait for the device; the kernels ignore atom
    ids outside [0, A))."""
    if len(atoms) != len(members):
        raise InputError(f"{op}: {len(atoms)} atom maps for {len(members)} membership matrices")
    if not where.is_cuda:
        pairs = [check_regions(op, a, m) for a, m in zip(atoms, members)]
        return [a for a, _ in pairs], [m for _, m in pairs]
    for i, (a, m) in enumerate(zip(atoms, members)):
        if len(shape_of(a)) != 2 or len(shape_of(m)) != 2 or dtype_of(a).kind not in "iu" \
                or dtype_of(m).kind not in "biu" or 0 in shape_of(a):
            raise InputError(f"{op}: image {i}: atoms must be a nonempty (H, W) integer map and members an (N, A) "
                             f"bool matrix, got {dtype_of(a)} {shape_of(a)} and {dtype_of(m)} {shape_of(m)}")
    return ([contiguous(a, np.int32, where) for a in atoms],
            [contiguous(m, np.uint8, where) if dtype_of(m) != np.bool_ else contiguous(m, np.bool_, where)
             for m in members])


def _shapes(atoms: list, members: list) -> np.ndarray:
    """(B, 4) int64: height, width, regions and atoms of each image (host numbers, known without the device)."""
    return np.array([[*shape_of(a), *shape_of(m)] for a, m in zip(atoms, members)], np.int64).reshape(-1, 4)


def soft_mask_pool(features: Any, atoms: Any, members: Any, stride: int, pooling: str = "soft", eps: float = 1e-8,
                   normalize: bool = True, groups: Any = (), num_threads: int = 0):
    """SMFA: one vector per region, sum_p w_p F_p / (sum_p w_p + eps), then L2-normalised (zero stays zero).

    features: (h, w, D) float patch features (converted to float32), (h, w) = (ceil(H / stride), ceil(W / stride));
    atoms (H, W), members (N, A): the regions. pooling "soft": w_p is the fraction of patch p's stride x stride pixels
    the region covers, pixels beyond H, W counting as uncovered (the image's zero padding); "hard" (the ablation
    without SMFA): w_p = 1 when the patch's centre pixel lies in the region. normalize=False returns the weighted
    mean. groups: widths of consecutive feature groups (the layers of a multi-layer backbone, summing to D), each
    L2-normalised before the whole vector, so that every layer weighs the same in the cosine; () is one group.
    num_threads: OpenMP threads (0 = default). Returns (N, D) float32 where the features live (one image of
    soft_mask_pool_batch).
    """
    return soft_mask_pool_batch([features], [atoms], [members], stride, pooling, eps, normalize, groups, num_threads)


def soft_mask_pool_batch(features: Sequence, atoms: Sequence, members: Sequence, stride: int, pooling: str = "soft",
                         eps: float = 1e-8, normalize: bool = True, groups: Any = (), num_threads: int = 0):
    """soft_mask_pool over the images of a batch in one call: per image a feature map, an atom map and a membership
    matrix (images may differ in size and in their numbers of regions and atoms). Returns the regions' vectors
    stacked in image order, ((sum of N), D) float32: a NumPy array for host inputs, or, for torch / CuPy arrays on a
    CUDA device, an array of that library on that device, computed on the library's current stream without a host
    synchronisation."""
    op = "soft_mask_pool"
    stride = _int(op, "stride", stride, minimum=1)
    eps = _real(op, "eps", eps)
    num_threads = _int(op, "num_threads", num_threads, minimum=0)
    if pooling not in POOLINGS:
        raise InputError(f"{op}: pooling must be one of {POOLINGS}, got {pooling!r}")
    if len(features) != len(atoms):
        raise InputError(f"{op}: {len(features)} feature maps for {len(atoms)} atom maps")
    where = common_place(op, [*features, *atoms, *members])
    atoms, members = _regions_on(op, where, atoms, members)
    dims = set()
    for f, a in zip(features, atoms):
        if len(shape_of(f)) != 3:
            raise InputError(f"{op}: features must be (h, w, D), got shape {shape_of(f)}")
        if dtype_of(f).kind != "f":
            raise InputError(f"{op}: features must be floating point (float32), got dtype {dtype_of(f)}")
        _grid(op, shape_of(f), *shape_of(a), stride)
        dims.add(shape_of(f)[2])
    if len(dims) > 1:
        raise InputError(f"{op}: feature maps of different widths {sorted(dims)} in one batch")
    dim = dims.pop() if dims else 0
    features = [contiguous(f, np.float32, where) for f in features]
    groups = check_groups(op, groups, dim)
    if len(groups) > MAX_GROUPS:
        raise InputError(f"{op}: at most {MAX_GROUPS} feature groups, got {len(groups)}")
    shapes = _shapes(atoms, members)
    out = empty(where, (int(shapes[:, 2].sum()), dim), np.float32)
    _lib().soft_mask_pool(where.index, stream(where), [address(f) for f in features], [address(a) for a in atoms],
                          [address(m) for m in members], shapes, address(out), dim, stride, pooling == "hard", eps,
                          bool(normalize), [int(g) for g in groups], num_threads)
    return out


def mask_nms_raster(atoms: Any, members: Any, classes: Any, scores: Any, iou_threshold: float, background: int = 0,
                    num_threads: int = 0):
    """Class-specific greedy mask NMS, then confidence-priority rasterisation.

    Processing order is score descending, equal scores in index order. A region is suppressed when its IoU with an
    already kept region of the same class is > iou_threshold (equal is kept; an empty union has IoU 0). Kept regions
    paint in processing order and a pixel keeps the first label it gets; unpainted pixels are `background`.
    atoms (H, W), members (N, A): the regions; classes: (N,) integers (fit in int32); scores: (N,) finite reals.
    Returns keep (N,) bool, label_map (H, W) int32, owner (H, W) int32 (index of the painting region, -1 if none):
    one image of mask_nms_raster_batch.
    """
    keep, label_maps, owners = mask_nms_raster_batch([atoms], [members], classes, scores, iou_threshold, background,
                                                     num_threads=num_threads)
    return keep, label_maps[0], owners[0]


def mask_nms_raster_batch(atoms: Sequence, members: Sequence, classes: Any, scores: Any, iou_threshold: float,
                          background: int = 0, drop_class: int | None = None, ids: Any = None,
                          num_threads: int = 0):
    """mask_nms_raster over the images of a batch in one call. atoms, members: per image; classes, scores (and
    ids): per region, stacked in image order ((sum of N),). Regions of class `drop_class` (the vote's background)
    are never kept nor painted. `owner` records each painting region's entry of `ids` (int32), or its index in its
    image without them. Returns keep ((sum of N),) bool and per image label_map and owner (H, W) int32, where the
    atoms live (host: NumPy; CUDA: torch / CuPy on the library's current stream, without a host synchronisation).
    """
    op = "mask_nms_raster"
    iou_threshold = _real(op, "iou_threshold", iou_threshold)
    background = _int(op, "background", background)
    drop_class = None if drop_class is None else _int(op, "drop_class", drop_class)
    for name, value in (("background", background), ("drop_class", drop_class)):
        if value is not None and not _INT32.min <= value <= _INT32.max:
            raise InputError(f"{op}: {name} must fit in int32, got {value}")
    num_threads = _int(op, "num_threads", num_threads, minimum=0)
    per_region = [classes, scores] + ([] if ids is None else [ids])
    where = common_place(op, [*atoms, *members])
    atoms, members = _regions_on(op, where, atoms, members)
    shapes = _shapes(atoms, members)
    count = int(shapes[:, 2].sum())
    if not where.is_cuda or not any(place(x).is_cuda for x in per_region):
        classes, scores = _classes_scores(op, host(classes), host(scores), count)
        if ids is not None:
            ids = _ids(op, host(ids), count)
    else:
        for name, value in zip(("classes", "scores", "ids"), per_region):
            if shape_of(value) != (count,):
                raise InputError(f"{op}: {name} must be ({count},) to match members, got shape {shape_of(value)}")
    classes, scores = contiguous(classes, np.int32, where), contiguous(scores, np.float64, where)
    ids = None if ids is None else contiguous(ids, np.int32, where)
    keep = empty(where, (count,), np.bool_)
    label_maps = [empty(where, shape_of(a), np.int32) for a in atoms]
    owners = [empty(where, shape_of(a), np.int32) for a in atoms]
    _lib().mask_nms_raster(where.index, stream(where), [address(a) for a in atoms], [address(m) for m in members],
                           [address(x) for x in label_maps], [address(x) for x in owners], shapes, address(classes),
                           address(scores), 0 if ids is None else address(ids), address(keep), iou_threshold,
                           background, drop_class, num_threads)
    return keep, label_maps, owners


def vote(similarities: Any, neighbour_labels: Any, num_classes: int, method: str = "count",
         class_counts: Any = None, num_threads: int = 0):
    """The vote over (Q, K) neighbour similarities and class ids (best first; ids outside [0, num_classes), such as
    the search's -1, are ignored): score per class "count" (neighbours), "balanced" (neighbours / the class's bank
    size, `class_counts`) or "weighted" (summed similarity); ties to the larger summed similarity, then to the class
    met first. Returns classes (Q,) int32 and confidences (Q,) float32 (the winning class's mean similarity; a query
    with no neighbour: class 0, confidence 0), where the similarities live."""
    op = "vote"
    if method not in VOTE_METHODS:
        raise InputError(f"unknown vote {method!r}; expected one of {tuple(VOTE_METHODS)}")
    num_classes = _int(op, "num_classes", num_classes, minimum=1)
    num_threads = _int(op, "num_threads", num_threads, minimum=0)
    where = common_place(op, [similarities, neighbour_labels])
    shape = shape_of(similarities)
    if len(shape) != 2 or shape_of(neighbour_labels) != shape:
        raise InputError(f"{op}: similarities {shape} and neighbour labels {shape_of(neighbour_labels)} must be "
                         "equal (Q, K) shapes")
    if method == "balanced" and class_counts is None:
        raise InputError("the balanced vote needs the bank's class counts")
    counts = np.zeros(num_classes, np.int64) if class_counts is None else np.asarray(host(class_counts), np.int64)
    if counts.shape != (num_classes,):
        raise InputError(f"{op}: class_counts must be ({num_classes},), got {counts.shape}")
    similarities = contiguous(similarities, np.float32, where)
    neighbour_labels = contiguous(neighbour_labels, np.int64, where)
    counts = contiguous(counts, np.int64, where)
    winner, confidence = empty(where, (shape[0],), np.int32), empty(where, (shape[0],), np.float32)
    _lib().vote(where.index, stream(where), address(similarities), address(neighbour_labels), shape[0], shape[1],
                address(counts), num_classes, VOTE_METHODS[method], address(winner), address(confidence),
                num_threads)
    return winner, confidence


def _ids(op: str, ids: Any, count: int) -> np.ndarray:
    ids = np.asarray(ids)
    if ids.shape != (count,) or (count and ids.dtype.kind not in "iu"):
        raise InputError(f"{op}: ids must be ({count},) integers to match members, got {ids.dtype} {ids.shape}")
    if count and (ids.min() < _INT32.min or ids.max() > _INT32.max):
        raise InputError(f"{op}: ids must fit in int32 (the owner map's type)")
    return ids


def build_info() -> dict:
    """What the compiled extension holds: {"cuda": built with CUDA launchers, "architectures": ["sm_75", ...,
    "compute_90"], "ops": ops with a CUDA launcher, "cpu_ops", "openmp", "cuda_runtime"}."""
    return dict(_lib().build_info())


def cuda_launches() -> int:
    """CUDA kernels this process's ops have launched so far (tests count the launches of a batch)."""
    return int(_lib().cuda_launches())


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
