"""Plain NumPy references of the compiled ops, written straight from the method's equations on dense masks.

They define what engine.ops must return; tests compare the two on random inputs and bench/ times them side by side.
`soft_mask_pool` and `mask_nms_raster` take the same arguments as engine.ops (regions as atoms + members), materialise
the (N, H, W) masks and apply the equations, so `Engine(kernels="reference")` swaps one module for the other.
Slow on purpose: clarity over speed.
"""

from __future__ import annotations

import numpy as np

from .constants import VOTE_TEMPERATURE
from .utils import ceil_div


def materialise(atoms: np.ndarray, members: np.ndarray) -> np.ndarray:
    """(N, H, W) bool masks of regions given as atoms (H, W) and members (N, A)."""
    return np.asarray(members, bool)[:, np.asarray(atoms)]


def soft_mask_weights(mask: np.ndarray, stride: int) -> np.ndarray:
    """Area interpolation of one HxW binary mask onto the ceil(H/s) x ceil(W/s) patch grid.

    The mask is zero-padded bottom/right to a multiple of the stride (as the image is before the backbone), then each
    patch's weight is the fraction of its s x s pixels covered by the mask.
    """
    height, width = mask.shape
    grid_h, grid_w = ceil_div(height, stride), ceil_div(width, stride)
    padded = np.zeros((grid_h * stride, grid_w * stride), np.float64)
    padded[:height, :width] = mask
    return padded.reshape(grid_h, stride, grid_w, stride).mean(axis=(1, 3))


def centre_weights(mask: np.ndarray, stride: int) -> np.ndarray:
    """The ablation without SMFA: a patch weighs 1 when the mask covers its centre pixel, else 0 (a centre in the zero
    padding covers nothing)."""
    height, width = mask.shape
    weights = np.zeros((ceil_div(height, stride), ceil_div(width, stride)), np.float64)
    centres = mask[stride // 2::stride, stride // 2::stride]
    weights[:centres.shape[0], :centres.shape[1]] = centres
    return weights


def soft_mask_pool_reference(features: np.ndarray, masks: np.ndarray, stride: int, eps: float = 1e-8,
                             normalize: bool = True, pooling: str = "soft", groups=()) -> np.ndarray:
    """SMFA: for each mask, sum_p w_p F_p / (sum_p w_p + eps), then L2-normalised (a zero vector stays zero); with
    feature groups (widths summing to D), each group's part is L2-normalised first.

    features: (h, w, D) float32 patch features; masks: (N, H, W) binary with h = ceil(H/s), w = ceil(W/s).
    Returns (N, D) float32.
    """
    grid_h, grid_w, dim = features.shape
    weigh = soft_mask_weights if pooling == "soft" else centre_weights
    out = np.zeros((len(masks), dim), np.float32)
    for n, mask in enumerate(masks):
        weights = weigh(mask, stride)
        assert weights.shape == (grid_h, grid_w)
        pooled = (weights[:, :, None] * features.astype(np.float64)).sum(axis=(0, 1)) / (weights.sum() + eps)
        if normalize:
            for part in np.split(pooled, np.cumsum(groups)[:-1]) if len(groups) else []:
                part /= max(np.linalg.norm(part), 1e-12)  # a view: normalises the group inside `pooled`
            pooled = pooled / max(np.linalg.norm(pooled), 1e-12)
        out[n] = pooled
    return out


def processing_order(scores: np.ndarray) -> np.ndarray:
    """Highest score first; equal scores keep index order (a stable sort)."""
    return np.argsort(-np.asarray(scores, np.float64), kind="stable")


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def mask_nms_raster_reference(masks: np.ndarray, classes: np.ndarray, scores: np.ndarray, iou_threshold: float,
                              background: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Class-specific greedy mask NMS, then confidence-priority rasterisation.

    In processing order (score descending, ties by index), a mask is suppressed when its IoU with an already kept mask
    of the same class is > iou_threshold. Kept masks then paint in the same order; a pixel keeps the first label it
    gets; unpainted pixels are `background`.
    Returns keep (N,) bool, label_map (H, W) int32, owner (H, W) int32 (index of the painting mask, -1 if none).
    """
    count, height, width = masks.shape
    masks = masks.astype(bool)
    keep = np.zeros(count, bool)
    kept: list[int] = []
    for i in processing_order(scores):
        if all(classes[j] != classes[i] or mask_iou(masks[i], masks[j]) <= iou_threshold for j in kept):
            keep[i] = True
            kept.append(i)
    label_map = np.full((height, width), background, np.int32)
    owner = np.full((height, width), -1, np.int32)
    for i in kept:
        free = masks[i] & (owner < 0)
        label_map[free] = classes[i]
        owner[free] = i
    return keep, label_map, owner


# engine.ops' signatures over the references above


def soft_mask_pool(features, atoms, members, stride: int, pooling: str = "soft", eps: float = 1e-8,
                   normalize: bool = True, groups=(), num_threads: int = 0) -> np.ndarray:
    """engine.ops.soft_mask_pool's twin (num_threads is ignored)."""
    return soft_mask_pool_reference(np.asarray(features, np.float32), materialise(atoms, members), stride, eps,
                                    normalize, pooling, tuple(groups))


def mask_nms_raster(atoms, members, classes, scores, iou_threshold: float, background: int = 0,
                    num_threads: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """engine.ops.mask_nms_raster's twin (num_threads is ignored)."""
    return mask_nms_raster_reference(materialise(atoms, members), np.asarray(classes), np.asarray(scores),
                                     iou_threshold, background)


def soft_mask_pool_batch(features, atoms, members, stride: int, pooling: str = "soft", eps: float = 1e-8,
                         normalize: bool = True, groups=(), num_threads: int = 0) -> np.ndarray:
    """engine.ops.soft_mask_pool_batch's twin: each image on its own, the vectors stacked in image order."""
    dim = np.shape(features[0])[2] if len(features) else 0
    pooled = [soft_mask_pool(f, a, m, stride, pooling, eps, normalize, groups) for f, a, m in
              zip(features, atoms, members)]
    return np.concatenate(pooled) if pooled else np.zeros((0, dim), np.float32)


def mask_nms_raster_batch(atoms, members, classes, scores, iou_threshold: float, background: int = 0,
                          drop_class: int | None = None, ids=None, num_threads: int = 0):
    """engine.ops.mask_nms_raster_batch's twin: each image on its own, regions of `drop_class` left out before NMS,
    owners mapped through `ids`."""
    classes, scores = np.asarray(classes), np.asarray(scores)
    offsets = np.cumsum([0] + [len(m) for m in members])
    keep = np.zeros(offsets[-1], bool)
    label_maps, owners = [], []
    for b, (a, m) in enumerate(zip(atoms, members)):
        rows = np.arange(offsets[b], offsets[b + 1])
        if drop_class is not None:
            rows = rows[classes[rows] != drop_class]
        kept, label_map, owner = mask_nms_raster(a, np.asarray(m)[rows - offsets[b]], classes[rows], scores[rows],
                                                 iou_threshold, background)
        keep[rows[kept]] = True
        local = rows - offsets[b] if ids is None else np.asarray(ids)[rows]
        label_maps.append(label_map)
        owners.append(np.where(owner >= 0, local[np.clip(owner, 0, None)], -1).astype(np.int32) if len(rows)
                      else owner)
    return keep, label_maps, owners


def top_k(scores, k: int, offsets=None, num_threads: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """engine.ops.top_k's twin: each row plus the offsets (in float32), sorted whole by the rule (engine.topk's
    top_k_reference: higher first, equal values lower column first, NaN last), its first k kept."""
    from .topk import top_k_reference

    scores = np.asarray(scores, np.float32)
    if offsets is not None:
        scores = scores + np.asarray(offsets, np.float32)[None, :]
    return top_k_reference(scores, min(int(k), scores.shape[1]))


def vote(similarities, neighbour_labels, num_classes: int, method: str = "count", class_counts=None,
         num_threads: int = 0, temperature: float = VOTE_TEMPERATURE, shares: bool = False) -> tuple:
    """engine.ops.vote's twin, from the rule: per query, per class among its K neighbours the count, the summed
    similarity and the first rank; score = count, count / bank size ("balanced"), summed similarity ("weighted") or
    the sum of exp((s - s_max) / temperature) over the class's neighbours' similarities s, s_max the query's best
    ("softmax"); the best score wins, then the larger sum, then the first rank. Neighbour ids outside
    [0, num_classes) are ignored. With `shares`, also each query's scores over their sum (zeros without neighbours)."""
    from .errors import InputError

    similarities = np.asarray(similarities, np.float64)
    neighbour_labels = np.asarray(neighbour_labels)
    if similarities.shape != neighbour_labels.shape or similarities.ndim != 2:
        raise InputError(f"similarities {similarities.shape} and neighbour labels {neighbour_labels.shape} must be "
                         "equal (Q, K) shapes")
    if method not in ("count", "balanced", "weighted", "softmax"):
        raise InputError(f"unknown vote {method!r}; expected one of ('count', 'balanced', 'weighted', 'softmax')")
    if method == "balanced" and class_counts is None:
        raise InputError("the balanced vote needs the bank's class counts")
    if not 0.0 < temperature < float("inf"):
        raise InputError(f"vote: temperature must be a finite number > 0, got {temperature}")
    queries, k = similarities.shape
    if queries == 0:
        empty = (np.zeros(0, np.int32), np.zeros(0, np.float32))
        return empty + (np.zeros((0, num_classes), np.float32),) if shares else empty
    valid = (neighbour_labels >= 0) & (neighbour_labels < num_classes)
    labels = np.where(valid, neighbour_labels, 0)
    rows = np.repeat(np.arange(queries), k)
    counts = np.zeros((queries, num_classes))
    sums = np.zeros((queries, num_classes))
    np.add.at(counts, (rows, labels.ravel()), valid.ravel())
    np.add.at(sums, (rows, labels.ravel()), np.where(valid, similarities, 0).ravel())
    top = np.where(valid, similarities, -np.inf).max(axis=1, keepdims=True)
    top[~np.isfinite(top)] = 0.0  # a query without neighbours
    softs = np.zeros((queries, num_classes))
    np.add.at(softs, (rows, labels.ravel()), np.where(valid, np.exp((similarities - top) / temperature), 0).ravel())
    first_rank = np.full((queries, num_classes), k, np.int64)
    rank = np.broadcast_to(np.arange(k), (queries, k))
    np.minimum.at(first_rank, (rows, labels.ravel()), np.where(valid, rank, k).ravel())
    score = {"count": counts, "weighted": sums, "softmax": softs,
             "balanced": counts / np.maximum(np.asarray(class_counts, np.float64), 1)
             if class_counts is not None else None}[method]
    present = counts > 0
    best_score = np.where(present, score, -np.inf)
    tied = present & (best_score == best_score.max(axis=1, keepdims=True))
    tied_sums = np.where(tied, sums, -np.inf)
    tied &= tied_sums == tied_sums.max(axis=1, keepdims=True)
    winner = np.argmin(np.where(tied, first_rank, k + 1), axis=1).astype(np.int32)
    winner_count = counts[np.arange(queries), winner]
    confidence = sums[np.arange(queries), winner] / np.maximum(winner_count, 1)
    if not shares:
        return winner, confidence.astype(np.float32)
    scores = np.where(present, score, 0.0)
    total = scores.sum(axis=1, keepdims=True)
    return winner, confidence.astype(np.float32), (scores / np.where(total == 0, 1, total)).astype(np.float32)


def merge_regions(edges, area, features, colour, levels, colour_weight: float = 1.0, size_weight: float = 3.0):
    """engine.ops.merge_regions's twin: the same greedy merging, one merge at a time with Python's heap (entries
    (distance, i, j), so equal distances go to the smaller ids), every quantity in float64."""
    import heapq

    from .ops import check_merge_inputs

    edges, area, features, colour, levels = check_merge_inputs("merge_regions", edges, area, features, colour,
                                                               levels)
    count = len(area)
    total = area.sum()
    feature_sum, mean_colour, node_area, parent, height = _leaves(area, features, colour)
    leaves = [[i] for i in range(count)]
    neighbours = [set() for _ in range(count)]
    for a, b in edges:
        neighbours[a].add(int(b))
        neighbours[b].add(int(a))

    def distance(i, j):
        fi = feature_sum[i] / max(np.linalg.norm(feature_sum[i]), 1e-12)
        fj = feature_sum[j] / max(np.linalg.norm(feature_sum[j]), 1e-12)
        return (1.0 - fi @ fj + colour_weight / 100.0 * np.linalg.norm(mean_colour[i] - mean_colour[j])
                + size_weight * min(node_area[i], node_area[j]) / total)

    heap = [(distance(int(a), int(b)), int(a), int(b)) for a, b in edges]
    heapq.heapify(heap)
    alive = [True] * count
    leaf_node = np.arange(count, dtype=np.int32)
    snapshots = np.zeros((len(levels), count), np.int32)
    recorded, regions = 0, count

    def record():
        nonlocal recorded
        while recorded < len(levels) and regions <= levels[recorded]:
            snapshots[recorded] = leaf_node
            recorded += 1

    record()
    stop = levels[-1] if len(levels) else 1
    while heap and regions > stop:
        d, i, j = heapq.heappop(heap)
        if not (alive[i] and alive[j]):
            continue
        alive[i] = alive[j] = False
        alive.append(True)
        n = _join(i, j, d, parent, height, node_area, feature_sum, mean_colour)
        leaves.append(leaves[i] + leaves[j])
        leaf_node[leaves[n]] = n
        around = sorted(k for k in neighbours[i] | neighbours[j] if alive[k] and k != n)
        neighbours.append(set(around))
        for k in around:
            neighbours[k].add(n)
            heapq.heappush(heap, (distance(n, k), n, k))
        regions -= 1
        record()
    while recorded < len(levels):
        snapshots[recorded] = leaf_node
        recorded += 1
    return _tree(parent, height, node_area, feature_sum, count, levels, snapshots)


def slic_superpixels(lab, n_segments: int = 400, compactness: float = 10.0, iterations: int = 10,
                     min_size: float = 0.25, num_threads: int = 0) -> np.ndarray:
    """engine.ops.slic_superpixels's twin, step by step from its definition (csrc/slic/slic.h), on whole arrays:
    grid seeds, k-means rounds over the 3 x 3 nearest cells' centres (sums in raster order), 4-connected pieces,
    small pieces joining the piece left of (or above) their first pixel, labels in order of first pixels."""
    import cv2

    from .ops import slic_grid

    lab = np.asarray(lab, np.float32).astype(np.float64)
    height, width = lab.shape[:2]
    rows, cols, min_pixels, weight = slic_grid(height, width, n_segments, compactness, min_size)
    row_start = [-(-i * height // rows) for i in range(rows + 1)]  # the first row of each cell
    col_start = [-(-j * width // cols) for j in range(cols + 1)]
    cell_y, cell_x = np.arange(height) * rows // height, np.arange(width) * cols // width
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    centres = np.zeros((rows * cols, 5))
    for k in range(rows * cols):
        i, j = divmod(k, cols)
        y, x = (row_start[i] + row_start[i + 1] - 1) // 2, (col_start[j] + col_start[j + 1] - 1) // 2
        centres[k] = [*lab[y, x], y, x]

    def nearest():
        best, best_d = np.full((height, width), -1), np.full((height, width), np.inf)
        for di in (-1, 0, 1):  # candidates in increasing centre index: equal distances keep the lower
            for dj in (-1, 0, 1):
                i, j = cell_y[:, None] + di + 0 * cell_x[None, :], cell_x[None, :] + dj + 0 * cell_y[:, None]
                valid = (i >= 0) & (i < rows) & (j >= 0) & (j < cols)
                c = centres[np.where(valid, i * cols + j, 0)]
                dl, da, db = lab[..., 0] - c[..., 0], lab[..., 1] - c[..., 1], lab[..., 2] - c[..., 2]
                dy, dx = ys - c[..., 3], xs - c[..., 4]
                d = (dl * dl + da * da + db * db) + weight * (dy * dy + dx * dx)
                better = valid & (d < best_d)
                best, best_d = np.where(better, i * cols + j, best), np.where(better, d, best_d)
        return best

    values = np.concatenate([lab, ys[..., None], xs[..., None]], axis=2)
    for _ in range(iterations):
        assign = nearest()
        for k in range(rows * cols):
            i, j = divmod(k, cols)
            window = np.s_[row_start[max(i - 1, 0)]:row_start[min(i + 2, rows)],
                           col_start[max(j - 1, 0)]:col_start[min(j + 2, cols)]]
            mine = values[window][assign[window] == k]  # raster order
            if len(mine):
                centres[k] = np.cumsum(mine, axis=0)[-1] / len(mine)  # summed one by one, as the kernel does
    assign = nearest()
    # 4-connected pieces of equal assignment, each named by its first pixel
    piece = np.zeros(height * width, np.int64)
    for k in np.unique(assign):
        count, components = cv2.connectedComponents((assign == k).astype(np.uint8), connectivity=4)
        flat = components.ravel()
        inside = np.flatnonzero(assign.ravel() == k)
        first = np.full(count, height * width)
        np.minimum.at(first, flat[inside], inside)
        piece[inside] = first[flat[inside]]
    size = np.bincount(piece, minlength=height * width)

    def kept(r):
        while r != 0 and size[r] < min_pixels:
            r = piece[r - 1 if r % width else r - width]
        return r

    roots = np.unique(piece)
    final = {int(r): kept(int(r)) for r in roots}
    number = {r: n for n, r in enumerate(sorted(set(final.values())))}
    lut = np.zeros(height * width, np.int32)
    for r, f in final.items():
        lut[r] = number[f]
    return lut[piece].reshape(height, width)


def merge_regions_rac(edges, area, features, colour, levels, colour_weight: float = 1.0, size_weight: float = 3.0,
                      num_threads: int = 0):
    """engine.ops.merge_regions_rac's twin: rounds of mutual nearest pairs over the leaf edges, written with Python
    sets and sorts, every quantity in float64."""
    from .ops import check_merge_inputs

    edges, area, features, colour, levels = check_merge_inputs("merge_regions_rac", edges, area, features, colour,
                                                               levels)
    count = len(area)
    total = sum(float(a) for a in area)  # in leaf order
    feature_sum, mean_colour, node_area, parent, height = _leaves(area, features, colour)

    def distance(i, j):
        fi = feature_sum[i] / max(np.linalg.norm(feature_sum[i]), 1e-12)
        fj = feature_sum[j] / max(np.linalg.norm(feature_sum[j]), 1e-12)
        return (1.0 - fi @ fj + colour_weight / 100.0 * np.linalg.norm(mean_colour[i] - mean_colour[j])
                + size_weight * min(node_area[i], node_area[j]) / total)

    node_of_leaf = np.arange(count, dtype=np.int32)
    snapshots = np.zeros((len(levels), count), np.int32)
    regions, recorded = count, 0
    while recorded < len(levels) and regions <= levels[recorded]:
        snapshots[recorded] = node_of_leaf
        recorded += 1
    stop = levels[-1] if len(levels) else 1
    while regions > stop:
        nearest = {}  # node -> (distance, neighbour): the smallest, equal distances to the smaller neighbour
        for a, b in edges:
            i, j = int(node_of_leaf[a]), int(node_of_leaf[b])
            if i != j:
                d = distance(i, j)
                for x, y in ((i, j), (j, i)):
                    nearest[x] = min(nearest.get(x, (d, y)), (d, y))
        pairs = sorted((d, i, j) for i, (d, j) in nearest.items() if i < j and nearest[j][1] == i)
        if not pairs:
            break
        merges = min(len(pairs), regions - stop)
        for d, i, j in pairs[:merges]:
            n = _join(i, j, d, parent, height, node_area, feature_sum, mean_colour)
            node_of_leaf[np.isin(node_of_leaf, [i, j])] = n
            regions -= 1
            while recorded < len(levels) and regions <= levels[recorded]:  # a cut reached inside the round
                snapshots[recorded] = node_of_leaf
                recorded += 1
    while recorded < len(levels):
        snapshots[recorded] = node_of_leaf
        recorded += 1
    return _tree(parent, height, node_area, feature_sum, count, levels, snapshots)


def _tree(parent, height, node_area, feature_sum, count, levels, snapshots):
    """The MergeTree of a finished merge: coherence = |summed leaf features| / area (1 for a leaf)."""
    from .ops import MergeTree

    node_area = np.array(node_area, np.float64)
    coherence = np.array([np.linalg.norm(s) for s in feature_sum]) / np.maximum(node_area, 1e-12)
    coherence[:count] = 1.0
    return MergeTree(np.array(parent, np.int64), np.array(height, np.float64), node_area,
                     np.clip(coherence, 0.0, 1.0), levels, snapshots)


def _leaves(area, features, colour):
    """The merge twins' leaf nodes: area-weighted unit features, mean colours, areas, no parents, height 0."""
    unit = features.astype(np.float64) / np.maximum(np.linalg.norm(features.astype(np.float64), axis=1,
                                                                   keepdims=True), 1e-12)
    count = len(area)
    return ([unit[i] * area[i] for i in range(count)], [colour[i].astype(np.float64) for i in range(count)],
            list(area), [-1] * count, [0.0] * count)


def _join(i, j, d, parent, height, node_area, feature_sum, mean_colour) -> int:
    """Node n made by merging nodes i and j at distance d: its area, feature sum and mean colour; returns n."""
    n = len(parent)
    parent[i] = parent[j] = n
    parent.append(-1)
    height.append(d)
    node_area.append(node_area[i] + node_area[j])
    feature_sum.append(feature_sum[i] + feature_sum[j])
    mean_colour.append((node_area[i] * mean_colour[i] + node_area[j] * mean_colour[j]) / node_area[n])
    return n
