"""Label-map refinement after painting: pixels that no proposal painted given the nearest painted class where the bank
has no background class to give them, superpixels repainted by the superpixel vote (engine.retrieval), and class
boundaries snapped to the image's edges.

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

    They act on the engine's proposer's regions only (`proposed`): proposals the caller gives are exact by
    assumption, so they are painted as given and what they leave unpainted stays background. Config.fill_unpainted
    acts where the bank has no background class (`has_background` False); the superpixel vote's classes, when given
    (Config.superpixel_vote), repaint the superpixels; Config.boundary_radius and boundary_eps snap boundaries. A
    pixel whose class changes becomes no proposal's (owner -1), so that every segment keeps to its class."""

    def __init__(self, config, has_background: bool) -> None:
        self.fill = config.fill_unpainted and not has_background
        self.radius, self.eps = config.boundary_radius, config.boundary_eps

    def __call__(self, image, label_map, owner, proposed: bool = True, atoms=None, atom_classes=None) -> tuple:
        """(label map, owner map) refined: NumPy arrays on the host, or torch tensors where they are (a GPU
        engine's, with the image there too); returned as they are when not `proposed`. `atoms` (H, W) and
        `atom_classes` (n_atoms,), the superpixel vote's (engine.retrieval.superpixel_classes; -1 for an atom no
        region covers), repaint every covered atom with its class after the fill and before the snapping."""
        if not proposed:
            return label_map, owner
        refined = fill_unpainted(label_map, owner) if self.fill else label_map
        if atom_classes is not None:
            refined = repaint_atoms(refined, atoms, atom_classes)
        refined = snap_to_edges(refined, image, self.radius, self.eps)
        if refined is not label_map:
            changed = refined != label_map
            owner = owner.masked_fill(changed, -1) if _is_torch(owner) else np.where(changed, -1, owner).astype(
                owner.dtype, copy=False)
        return refined, owner


#: the guided filter's coefficients are computed at this fraction of the image's side (1 = full resolution)
SUBSAMPLE = 4


def snap_to_edges(label_map, image, radius: int, eps: float, subsample: int = SUBSAMPLE):
    """The label map (H, W) with each pixel given the class whose guided-filtered indicator is largest there.

    image: the (H, W, 3) uint8 RGB image (its grey levels in [0, 1] guide the filter). radius: the half side of the
    filter's square window in full-resolution pixels (0 returns the map unchanged). eps: the regulariser of the
    slope a, in squared grey levels: edges weaker than about sqrt(eps) are smoothed over. Exact ties keep the lower
    class id. NumPy arrays are filtered with OpenCV; torch tensors (a GPU engine's label maps) with torch where they
    are, by the same steps (tests/test_boundaries.py holds both to one reference)."""
    if radius <= 0:
        return label_map
    steps = _TorchSteps if _is_torch(label_map) else _OpenCVSteps
    classes = steps.classes(label_map)
    if len(classes) < 2:
        return label_map
    height, width = label_map.shape
    factor = max(1, min(int(subsample), height, width))
    # mirrored up to whole factor x factor blocks, so that shrinking is an exact block mean
    pad = (-height % factor, -width % factor)
    grey = steps.grey(image)
    padded_labels = steps.mirror(label_map, pad)
    full = tuple(padded_labels.shape)
    small = (full[0] // factor, full[1] // factor)
    guide = steps.shrink(steps.mirror(grey, pad), small)
    window = 2 * max(1, round(radius / factor)) + 1
    mean_guide = steps.box(guide, window)
    var_guide = steps.box(guide * guide, window) - mean_guide * mean_guide
    best, refined = steps.start(label_map)
    for class_id in classes:  # ascending: a later class must be strictly larger to win a tie
        indicator = steps.shrink(steps.indicator(padded_labels, class_id), small)
        mean_indicator = steps.box(indicator, window)
        slope = (steps.box(guide * indicator, window) - mean_guide * mean_indicator) / (var_guide + eps)
        offset = mean_indicator - slope * mean_guide
        filtered = steps.grow(steps.box(slope, window), full)[:height, :width] * grey
        filtered += steps.grow(steps.box(offset, window), full)[:height, :width]
        best, refined = steps.keep_larger(best, refined, filtered, class_id)
    return refined


class _OpenCVSteps:
    """snap_to_edges's steps on NumPy arrays: OpenCV's filters, the image mirrored at its borders (edge pixel
    repeated, BORDER_REFLECT)."""

    @staticmethod
    def classes(label_map):
        return np.flatnonzero(np.bincount(label_map.ravel()))  # the classes present (a sort would cost more)

    @staticmethod
    def grey(image):
        return cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2GRAY).astype(np.float32) / 255.0

    @staticmethod
    def mirror(values, pad):
        """The array mirrored past its bottom and right edges by pad = (rows, columns)."""
        if not any(pad):
            return values
        return cv2.copyMakeBorder(np.ascontiguousarray(values), 0, pad[0], 0, pad[1], cv2.BORDER_REFLECT)

    @staticmethod
    def shrink(values, size):
        """Block means down to size = (rows, columns) (whole blocks: OpenCV's exact fast path)."""
        return values if values.shape == size else cv2.resize(values, size[::-1], interpolation=cv2.INTER_AREA)

    @staticmethod
    def box(values, window):
        """Mean over the window x window square around each pixel."""
        return cv2.boxFilter(values, -1, (window, window), borderType=cv2.BORDER_REFLECT)

    @staticmethod
    def grow(values, size):
        """Bilinear enlargement to size = (rows, columns), pixel centres aligned."""
        return values if values.shape == size else cv2.resize(values, size[::-1], interpolation=cv2.INTER_LINEAR)

    @staticmethod
    def indicator(labels, class_id):
        return (labels == class_id).astype(np.float32)

    @staticmethod
    def start(label_map):
        return np.full(label_map.shape, -np.inf, np.float32), label_map.copy()

    @staticmethod
    def keep_larger(best, refined, filtered, class_id):
        wins = filtered > best
        np.copyto(best, filtered, where=wins)
        np.putmask(refined, wins, class_id)
        return best, refined


class _TorchSteps:
    """snap_to_edges's steps on torch tensors, where they are: the same filters written with torch's operations
    (OpenCV's grey weights in its fixed point, the symmetric mirror, bilinear with pixel centres aligned)."""

    @staticmethod
    def classes(label_map):
        import torch

        return torch.bincount(label_map.reshape(-1).long()).nonzero().flatten().tolist()

    @staticmethod
    def grey(image):
        import torch

        image = torch.as_tensor(image).to(torch.int32)
        # OpenCV's RGB -> grey on 8 bits: weights 0.299, 0.587, 0.114 in 15-bit fixed point, rounded
        levels = (image[..., 0] * 9798 + image[..., 1] * 19235 + image[..., 2] * 3735 + (1 << 14)) >> 15
        return levels.to(torch.float32) / 255.0

    @staticmethod
    def _mirrored_index(size, before, after, device):
        """Indices of an axis of `size` extended by `before` and `after` mirrored entries (edge repeated), at any
        extent (a window wider than the axis keeps reflecting, as OpenCV does)."""
        import torch

        index = torch.arange(-before, size + after, device=device) % (2 * size)
        return torch.where(index >= size, 2 * size - 1 - index, index)

    @staticmethod
    def mirror(values, pad):
        if not any(pad):
            return values
        rows = _TorchSteps._mirrored_index(values.shape[0], 0, pad[0], values.device)
        columns = _TorchSteps._mirrored_index(values.shape[1], 0, pad[1], values.device)
        return values[rows[:, None], columns[None, :]]

    @staticmethod
    def shrink(values, size):
        if tuple(values.shape) == size:
            return values
        factor = values.shape[0] // size[0]
        return values.reshape(size[0], factor, size[1], factor).mean(dim=(1, 3))

    @staticmethod
    def box(values, window):
        import torch.nn.functional as F

        half = window // 2
        rows = _TorchSteps._mirrored_index(values.shape[0], half, half, values.device)
        columns = _TorchSteps._mirrored_index(values.shape[1], half, half, values.device)
        padded = values[rows[:, None], columns[None, :]]
        return F.avg_pool2d(padded[None, None], window, stride=1)[0, 0]

    @staticmethod
    def grow(values, size):
        import torch.nn.functional as F

        if tuple(values.shape) == size:
            return values
        return F.interpolate(values[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]

    @staticmethod
    def indicator(labels, class_id):
        import torch

        return (labels == class_id).to(torch.float32)

    @staticmethod
    def start(label_map):
        import torch

        return torch.full(label_map.shape, float("-inf"), device=label_map.device), label_map.clone()

    @staticmethod
    def keep_larger(best, refined, filtered, class_id):
        import torch

        wins = filtered > best
        return torch.where(wins, filtered, best), refined.masked_fill(wins, class_id)


def _is_torch(array) -> bool:
    return type(array).__module__.split(".")[0] == "torch"


def repaint_atoms(label_map, atoms, atom_classes):
    """The label map with each pixel of a covered atom (class >= 0) given its atom's class; the rest unchanged."""
    voted = atom_classes[atoms]
    if _is_torch(label_map):
        import torch

        return torch.where(voted >= 0, voted.to(label_map.dtype), label_map)
    return np.where(voted >= 0, voted, label_map).astype(label_map.dtype, copy=False)


def fill_unpainted(label_map, owner):
    """The label map with every pixel no proposal painted (owner -1) given the class of its nearest painted pixel
    (NumPy arrays: OpenCV's 5 x 5 chamfer approximation of the Euclidean distance; torch tensors: jump flooding
    where they are). Unchanged when every pixel or none was painted."""
    unpainted = owner < 0
    if not unpainted.any() or unpainted.all():
        return label_map
    if _is_torch(label_map):
        return jump_flood_nearest(label_map, unpainted)
    return nearest_known(label_map, unpainted, cv2.DIST_MASK_5)


def jump_flood_nearest(values, unknown):
    """`values` (a torch tensor) with every `unknown` pixel given the value of a nearest known pixel, by jump
    flooding (Rong and Tan, 2006) with one more pass at step 1: each pass, every pixel keeps the closest of the known
    pixels that it and its 8 neighbours at the step's distance hold, steps halving from about half the longer side.
    The passes are whole-image operations (a few kernels each on a GPU); a pixel may rarely get a known pixel
    slightly farther than the nearest, as OpenCV's chamfer distance may on the host. Equal distances keep the
    earlier candidate."""
    import torch

    height, width = values.shape
    rows = torch.arange(height, device=values.device)[:, None].expand(height, width)
    columns = torch.arange(width, device=values.device)[None, :].expand(height, width)
    seed_row = torch.where(unknown, -1, rows)
    seed_column = torch.where(unknown, -1, columns)
    far = torch.iinfo(torch.int64).max

    def distance(seed_row, seed_column):
        return torch.where(seed_row < 0, far, (seed_row - rows) ** 2 + (seed_column - columns) ** 2)

    # powers of two from half the longer side down, so that their sum reaches every pixel from every other
    steps, step = [], 1 << max(0, (max(height, width) - 1).bit_length() - 1)
    while step >= 1:
        steps.append(step)
        step //= 2
    for step in steps + [1]:
        best = distance(seed_row, seed_column)
        for dy in (-step, 0, step):
            for dx in (-step, 0, step):
                if dy == dx == 0:
                    continue
                row, column = _shifted(seed_row, dy, dx), _shifted(seed_column, dy, dx)
                found = distance(row, column)
                closer = found < best
                best = torch.where(closer, found, best)
                seed_row, seed_column = torch.where(closer, row, seed_row), torch.where(closer, column, seed_column)
    return values[seed_row, seed_column]


def _shifted(values, dy: int, dx: int):
    """values[y + dy, x + dx] at every (y, x), -1 where that falls outside (torch)."""
    import torch

    height, width = values.shape
    out = torch.full_like(values, -1)
    if abs(dy) < height and abs(dx) < width:
        out[max(0, -dy):height - max(0, dy), max(0, -dx):width - max(0, dx)] = \
            values[max(0, dy):height - max(0, -dy), max(0, dx):width - max(0, -dx)]
    return out


def nearest_known(values: np.ndarray, unknown: np.ndarray, mask_size: int) -> np.ndarray:
    """`values` with every `unknown` pixel given the value of its nearest known pixel (one OpenCV distance transform
    with a 3 x 3 or 5 x 5 chamfer mask; some pixel must be known)."""
    _, nearest = cv2.distanceTransformWithLabels(unknown.astype(np.uint8), cv2.DIST_L2, mask_size,
                                                 labelType=cv2.DIST_LABEL_PIXEL)
    # DIST_LABEL_PIXEL numbers the known (zero) pixels 1.. in raster order
    known = np.flatnonzero(~unknown.ravel())
    return values.ravel()[known[nearest.ravel() - 1]].reshape(values.shape)
