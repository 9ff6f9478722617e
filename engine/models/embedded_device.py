"""The embedded proposer's steps where the backbone's features are (torch tensors, on a CUDA device in the engine;
on the CPU in the tests): a batch of images → Lab at the superpixel scale → SLIC superpixels (engine.ops, one thread
block per image) → the superpixels' graph (adjacent pairs, areas, mean colours) → pooled leaf features → rounds of
mutual-nearest merging (engine.ops, one thread block per image) → proposals as device arrays.

Each step mirrors the host's `slic_graph` and `EmbeddedProposer.propose_one` on the same numbers, so that given the
same Lab image the proposals are the same (tests/test_embedded_device.py). Only the shrinking differs: torch's area
interpolation, where the host uses OpenCV's INTER_AREA (equal for even sides at scale 0.5). Nothing per image comes
back to the host: the batch synchronises a few times for sizes (superpixel counts, edge counts, node counts,
proposal counts), each read once for the whole batch.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .. import ops
from ..arrays import torch_view
from ..regions import Proposals

# sRGB (D65) to CIE XYZ, and the D65 white point: the constants of OpenCV's RGB2Lab, so that the host and the device
# see the same colours
_RGB_TO_XYZ = ((0.412453, 0.357580, 0.180423), (0.212671, 0.715160, 0.072169), (0.019334, 0.119193, 0.950227))
_WHITE = (0.950456, 1.0, 1.088754)


class LeafGraph(NamedTuple):
    """One image's superpixels as the merging takes them: labels (H, W) int32 at full resolution, edges (E, 2) int64
    adjacent pairs (a < b, sorted), area (n,) float64 full-resolution pixels, colour (n, 3) float32 mean Lab at the
    working scale (a and b offset by 128, as the host's)."""

    labels: torch.Tensor
    edges: torch.Tensor
    area: torch.Tensor
    colour: torch.Tensor


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """(..., 3) RGB in [0, 1] → CIE Lab (L in 0..100), float32, by the sRGB companding and CIE formulas."""
    rgb = rgb.to(torch.float32)
    linear = torch.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    matrix = torch.tensor(_RGB_TO_XYZ, dtype=torch.float32, device=rgb.device)
    xyz = (linear @ matrix.T) / torch.tensor(_WHITE, dtype=torch.float32, device=rgb.device)
    f = torch.where(xyz > 0.008856, xyz.clamp_min(0) ** (1 / 3), 7.787 * xyz + 16 / 116)
    y = xyz[..., 1]
    lightness = torch.where(y > 0.008856, 116 * f[..., 1] - 16, 903.3 * y)
    return torch.stack([lightness, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


def working_lab(image: torch.Tensor, scale: float) -> torch.Tensor:
    """An (H, W, 3) uint8 RGB image shrunk by `scale` (area interpolation, rounded to 8 bits as the host's) and
    converted to Lab; unshrunk where the scale is 1 or would leave a side under one pixel."""
    height, width = image.shape[:2]
    if scale != 1.0 and min(height, width) * scale >= 1:
        size = (max(1, round(height * scale)), max(1, round(width * scale)))
        shrunk = F.interpolate(image.permute(2, 0, 1)[None].to(torch.float32), size=size, mode="area")
        image = torch.floor(shrunk[0].permute(1, 2, 0) + 0.5)
    return rgb_to_lab(image.to(torch.float32) / 255.0).contiguous()


def upscale_nearest(labels: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """An (h, w) map enlarged to (height, width) by OpenCV's INTER_NEAREST rule: output x reads floor(x * w / W)."""
    if tuple(labels.shape) == (height, width):
        return labels

    def source(out: int, size: int) -> torch.Tensor:
        step = 1.0 / (out / size)  # as OpenCV computes it, so that the floors agree
        return torch.clamp((torch.arange(out, dtype=torch.float64, device=labels.device) * step).floor().long(),
                           max=size - 1)

    return labels[source(height, labels.shape[0])[:, None], source(width, labels.shape[1])[None, :]]


def leaf_graphs(small: Sequence[torch.Tensor], labs: Sequence[torch.Tensor], shapes: Sequence[tuple[int, int]],
                counts: Sequence[int]) -> list[LeafGraph]:
    """The graphs of a batch's superpixels: `small` the (h, w) labels at the working scale (0..counts[b]-1), `labs`
    the working-scale Lab images, `shapes` the full (H, W). Adjacent pairs of every image are made unique in one sort
    over the batch (labels offset per image)."""
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    total = int(offsets[-1])
    codes = []
    for labels, start in zip(small, offsets):
        labels = labels.long() + int(start)
        for a, b in ((labels[:, :-1], labels[:, 1:]), (labels[:-1, :], labels[1:, :])):
            differ = a != b
            low, high = torch.minimum(a[differ], b[differ]), torch.maximum(a[differ], b[differ])
            codes.append(low * total + high)
    device = small[0].device
    codes = torch.unique(torch.cat(codes)) if codes else torch.zeros(0, dtype=torch.long, device=device)
    low, high = codes // total, codes % total
    bounds = torch.as_tensor(offsets[1:], device=device)
    owner = torch.bucketize(low, bounds, right=True)  # the image of each pair
    per_image = torch.bincount(owner, minlength=len(small)).tolist()
    graphs, first = [], 0
    for b, (labels, lab, shape) in enumerate(zip(small, labs, shapes)):
        take = slice(first, first + per_image[b])
        first += per_image[b]
        edges = torch.stack([low[take], high[take]], 1) - int(offsets[b])
        full = upscale_nearest(labels, *shape)
        area = torch.bincount(full.reshape(-1).long(), minlength=counts[b]).to(torch.float64)
        flat = labels.reshape(-1).long()
        sums = torch.zeros(counts[b], 3, dtype=torch.float64, device=device).index_add_(
            0, flat, lab.reshape(-1, 3).to(torch.float64))
        colour = (sums / torch.bincount(flat, minlength=counts[b]).clamp_min(1)[:, None]).to(torch.float32)
        colour[:, 1:] += 128.0
        graphs.append(LeafGraph(full.to(torch.int32).contiguous(), edges.contiguous(), area, colour.contiguous()))
    return graphs


def proposals_from_trees(trees: Sequence, atoms: Sequence[torch.Tensor], min_area: int) -> list[Proposals]:
    """Every region of every cut of each merge tree (finest cut first, nodes in ascending id, a node present in
    several cuts once, regions under min_area pixels left out) as one image's Proposals over its superpixels: the
    order and content of the host proposer's. One nonzero over the whole batch finds them."""
    device = atoms[0].device
    new, sizes, cuts = [], [], []
    for tree in trees:
        snapshots = torch.as_tensor(tree.snapshots, device=device).long()
        cuts.append(snapshots)
        area = torch.as_tensor(tree.area, device=device)
        present = torch.zeros(snapshots.shape[0], area.shape[0], dtype=torch.bool, device=device)
        present.scatter_(1, snapshots, True)
        earlier = (torch.cumsum(present.to(torch.int32), 0) - present.to(torch.int32)) > 0
        new.append((present & ~earlier & (area >= min_area)[None]).reshape(-1))
        sizes.append(area.shape[0])
    found = torch.nonzero(torch.cat(new)).flatten()
    starts = np.concatenate([[0], np.cumsum([len(n) for n in new])]).astype(np.int64)
    owner = torch.bucketize(found, torch.as_tensor(starts[1:], device=device), right=True)
    per_image = torch.bincount(owner, minlength=len(trees)).tolist()
    proposals, first = [], 0
    for b, (tree, labels, snapshots) in enumerate(zip(trees, atoms, cuts)):
        local = found[first:first + per_image[b]] - int(starts[b])
        first += per_image[b]
        level, node = local // sizes[b], local % sizes[b]
        if not len(node):
            proposals.append(Proposals(torch.zeros_like(labels), torch.zeros(0, 1, dtype=torch.bool, device=device),
                                       torch.zeros(0, dtype=torch.float32, device=device)))
            continue
        members = snapshots[level] == node[:, None]
        objectness = torch.as_tensor(tree.coherence, device=device)[node].to(torch.float32)
        proposals.append(Proposals(labels, members, objectness))
    return proposals


def propose(proposer, images: Sequence[np.ndarray], features: Sequence[torch.Tensor], stride: int,
            groups: Sequence[int]) -> list[Proposals]:
    """EmbeddedProposer's proposals (superpixels "slic", merging "rac") for HxWx3 uint8 RGB images, computed where
    their feature maps (torch tensors) are."""
    if not len(images):
        return []
    device = features[0].device
    labs = [working_lab(torch_view(torch, np.ascontiguousarray(image)).to(device), proposer.superpixel_scale)
            for image in images]
    small = [torch.as_tensor(labels, device=device) for labels in ops.slic_superpixels_batch(
        labs, proposer.n_superpixels, proposer.slic_compactness, proposer.slic_iterations,
        num_threads=proposer.num_threads)]
    counts = (torch.stack([labels.max() for labels in small]) + 1).tolist()
    graphs = leaf_graphs(small, labs, [image.shape[:2] for image in images], counts)
    pooled = torch.as_tensor(ops.soft_mask_pool_batch(
        [proposer.merge_features(f, groups) for f in features], [g.labels for g in graphs],
        [torch.eye(n, dtype=torch.bool, device=device) for n in counts], stride, num_threads=proposer.num_threads),
        device=device)
    leaf_features = torch.split(pooled, counts)
    trees = ops.merge_regions_rac_batch(
        [(g.edges, g.area, f, g.colour) for g, f in zip(graphs, leaf_features)], proposer.levels,
        proposer.colour_weight, proposer.size_weight, num_threads=proposer.num_threads)
    return proposals_from_trees(trees, [g.labels for g in graphs], proposer.min_area)
