"""The faces of the naming kernels: SMFA (soft_mask_pool), the search's top-k selection, mask NMS with rasterisation,
and the vote."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ..arrays import address, common_place, contiguous, dtype_of, empty, host, place, shape_of, stream
from ..constants import VOTE_TEMPERATURE
from ..errors import InputError
from ._core import (_INT32, MAX_GROUPS, POOLINGS, VOTE_METHODS, _classes_scores, _grid, _ids, _int, _lib, _real,
                    _regions_on, _shapes, check_groups)


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


def top_k(scores: Any, k: int, offsets: Any = None, num_threads: int = 0):
    """The k best entries of each row of host `scores` (Q, n), with `offsets` (n,) added to every row first (the
    bank's hubness penalty) when given: (Q, min(k, n)) float32 values and int64 columns, best first, equal values
    the lower column first, NaN after every number (engine.topk's rule). One pass over each row, on the CPU only
    (a GPU search selects with torch.topk)."""
    op = "top_k"
    k = _int(op, "k", k, minimum=0)
    num_threads = _int(op, "num_threads", num_threads, minimum=0)
    scores = np.ascontiguousarray(host(scores), dtype=np.float32)
    if scores.ndim != 2:
        raise InputError(f"{op}: scores must be (Q, n), got shape {scores.shape}")
    if offsets is not None:
        offsets = np.ascontiguousarray(host(offsets), dtype=np.float32)
        if offsets.shape != scores.shape[1:]:
            raise InputError(f"{op}: offsets must be ({scores.shape[1]},), got shape {offsets.shape}")
    return _lib().top_k(scores, offsets, min(k, scores.shape[1]), num_threads)


def vote(similarities: Any, neighbour_labels: Any, num_classes: int, method: str = "count",
         class_counts: Any = None, num_threads: int = 0, temperature: float = VOTE_TEMPERATURE, shares: bool = False):
    """The vote over (Q, K) neighbour similarities and class ids (best first; ids outside [0, num_classes), such as
    the search's -1, are ignored): score per class "count" (neighbours), "balanced" (neighbours / the class's bank
    size, `class_counts`), "weighted" (summed similarity) or "softmax" (the sum of exp((s - s_max) / temperature)
    over its neighbours' similarities s, s_max the query's best); ties to the larger summed similarity, then to the
    class met first. Returns classes (Q,) int32 and confidences (Q,) float32 (the winning class's mean similarity; a
    query with no neighbour: class 0, confidence 0), where the similarities live; with `shares`, also each query's
    scores divided by their sum, (Q, num_classes) float32 (zeros for a query with no neighbour)."""
    op = "vote"
    if method not in VOTE_METHODS:
        raise InputError(f"unknown vote {method!r}; expected one of {tuple(VOTE_METHODS)}")
    num_classes = _int(op, "num_classes", num_classes, minimum=1)
    num_threads = _int(op, "num_threads", num_threads, minimum=0)
    temperature = _real(op, "temperature", temperature)
    if not 0.0 < temperature < float("inf"):
        raise InputError(f"{op}: temperature must be a finite number > 0, got {temperature}")
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
    scores = empty(where, (shape[0], num_classes), np.float32) if shares else None
    _lib().vote(where.index, stream(where), address(similarities), address(neighbour_labels), shape[0], shape[1],
                address(counts), num_classes, VOTE_METHODS[method], temperature, address(winner), address(confidence),
                address(scores) if shares else 0, num_threads)
    return (winner, confidence, scores) if shares else (winner, confidence)
