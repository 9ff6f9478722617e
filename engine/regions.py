"""Regions of an image as unions of atoms: the compact form proposals take through the engine.

An image's `atoms` map (H, W) partitions it into A atoms — superpixels, connected components, or the cells of an
arrangement of overlapping masks — and each region is a set of atoms (`members`, (N, A) bool). Everything the method
does with a mask is linear in it or counts its pixels (SMFA's patch weights, areas, IoUs, painting), so it runs over A
atoms instead of N x H x W pixels, and an image's proposals cost H x W int32 plus N x A bits whatever N is. Masks are
materialised only on request (`Proposals.masks`).

`Records` is the small container the pipeline carries per image (as segment-anything's MaskData): arrays of equal
length, one row per region, filtered together.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .arrays import common_place, dtype_of, place, shape_of
from .constants import IGNORE
from .errors import InputError


@dataclass
class Proposals:
    """Class-agnostic mask proposals of one image.

    atoms: (H, W) int32 atom id of every pixel, in [0, A).
    members: (N, A) bool, members[n, a]: atom a is part of proposal n.
    objectness: (N,) float32 in [0, 1]; proposals below Config.objectness_threshold are dropped.

    Build them with `Proposals.from_masks(masks, objectness)` from (N, H, W) masks, or directly from a partition
    (a proposer that merges superpixels, `engine.models.ground_truth_proposals`).
    """

    atoms: np.ndarray
    members: np.ndarray
    objectness: np.ndarray

    def __post_init__(self) -> None:
        if place(self.atoms).is_cuda:
            self._check_on_device()
            return
        atoms = np.asarray(self.atoms)
        if atoms.ndim != 2 or atoms.dtype.kind not in "iu":
            hint = " (dense (N, H, W) masks? use Proposals.from_masks(masks, objectness))" if atoms.ndim == 3 else ""
            raise InputError(f"Proposals.atoms: expected an (H, W) integer map, got {atoms.dtype} {atoms.shape}{hint}")
        members = np.asarray(self.members)
        if members.ndim != 2 or members.dtype.kind not in "biu":
            raise InputError(f"Proposals.members: expected an (N, A) bool matrix, got {members.dtype} {members.shape}")
        objectness = np.asarray(self.objectness, dtype=np.float32).reshape(-1)
        if len(objectness) != len(members):
            raise InputError(f"Proposals: {len(members)} proposals but {len(objectness)} objectness scores")
        if atoms.size and (atoms.min() < 0 or atoms.max() >= members.shape[1]):
            raise InputError(f"Proposals.atoms: ids must lie in [0, {members.shape[1]}) (one column of members per "
                             f"atom), got {atoms.min()}..{atoms.max()}")
        self.atoms = np.ascontiguousarray(atoms, dtype=np.int32)
        self.members = np.ascontiguousarray(members != 0 if members.dtype != np.bool_ else members)
        self.objectness = objectness

    def _check_on_device(self) -> None:
        """Proposals whose arrays live on a CUDA device (torch or CuPy; the device proposer's): their shapes, types
        and place are checked, their values trusted as the proposer's own (checking them would read them back)."""
        where = common_place("Proposals", [self.atoms, self.members, self.objectness])
        atoms, members, objectness = (shape_of(x) for x in (self.atoms, self.members, self.objectness))
        if (len(atoms) != 2 or dtype_of(self.atoms) != np.int32 or len(members) != 2
                or dtype_of(self.members) != np.bool_ or objectness != members[:1]
                or dtype_of(self.objectness) != np.float32):
            raise InputError(f"Proposals on {where}: expected atoms (H, W) int32, members (N, A) bool and objectness "
                             f"(N,) float32, got {atoms}, {members} and {objectness}")

    @property
    def on_device(self) -> bool:
        return place(self.atoms).is_cuda

    # ------------------------------------------------------------------------------------------------- construct

    @classmethod
    def from_masks(cls, masks, objectness) -> "Proposals":
        """Proposals from (N, H, W) masks (bool or 0/1 integers): the atoms are the cells of the masks' arrangement
        (pixels covered by exactly the same masks), found by sorting each pixel's membership bits packed into 64-bit
        words (one sort of H x W keys, whatever N)."""
        masks = np.asarray(masks)
        if masks.ndim != 3:
            raise InputError(f"masks: expected shape (N, H, W), got {masks.shape}")
        if masks.dtype.kind not in "biu":
            raise InputError(f"masks: expected bool or integer 0/1 masks, got dtype {masks.dtype}")
        count, height, width = masks.shape
        if count == 0:
            return cls.empty(height, width)
        flat = masks.reshape(count, -1)
        flat = flat if flat.dtype == np.bool_ else flat != 0
        # each pixel's membership bits as 64-bit words (exact: no hashing), sorted so equal words sit together
        keys = np.zeros((-(-count // 64), flat.shape[1]), np.uint64)
        for n in range(count):
            keys[n // 64] |= flat[n].astype(np.uint64) << np.uint64(n % 64)
        order = np.lexsort(keys[::-1]) if len(keys) > 1 else np.argsort(keys[0], kind="stable")
        ordered = keys[:, order]
        starts = np.ones(len(order), bool)
        starts[1:] = (ordered[:, 1:] != ordered[:, :-1]).any(axis=0)
        atoms = np.empty(len(order), np.int32)
        atoms[order] = np.cumsum(starts) - 1
        return cls(atoms.reshape(height, width), flat[:, order[starts]], objectness)

    @classmethod
    def from_labels(cls, labels: np.ndarray, regions, objectness=None) -> "Proposals":
        """One proposal per listed value of an integer (H, W) map (disjoint regions); objectness 1 by default."""
        labels = np.asarray(labels)
        if labels.ndim != 2 or labels.dtype.kind not in "iu":
            raise InputError(f"labels: expected an (H, W) integer map, got {labels.dtype} {labels.shape}")
        values, atoms = np.unique(labels, return_inverse=True)
        regions = np.asarray(regions).reshape(-1)
        missing = sorted(set(regions.tolist()) - set(values.tolist()))
        if regions.size and regions.dtype.kind not in "iu":
            raise InputError(f"labels: regions must be integer values of the map, got dtype {regions.dtype}")
        if missing:
            raise InputError(f"labels: regions {missing} do not occur in the map")
        columns = np.searchsorted(values, regions.astype(np.int64))
        members = np.zeros((len(regions), len(values)), bool)
        members[np.arange(len(regions)), columns] = True
        if objectness is None:
            objectness = np.ones(len(regions), np.float32)
        return cls(atoms.reshape(labels.shape).astype(np.int32), members, objectness)

    @classmethod
    def empty(cls, height: int, width: int) -> "Proposals":
        return cls(np.zeros((height, width), np.int32), np.zeros((0, 1), bool), np.zeros(0, np.float32))

    # ---------------------------------------------------------------------------------------------------- access

    def __len__(self) -> int:
        return len(self.members)

    @property
    def shape(self) -> tuple[int, int]:
        """(H, W) of the image."""
        return self.atoms.shape

    @property
    def num_atoms(self) -> int:
        return self.members.shape[1]

    def atom_areas(self) -> np.ndarray:
        """(A,) int64 pixels of each atom (where the atoms are)."""
        if self.on_device:
            import torch

            return torch.bincount(torch.as_tensor(self.atoms).reshape(-1), minlength=self.num_atoms)
        return np.bincount(self.atoms.ravel(), minlength=self.num_atoms)

    def areas(self) -> np.ndarray:
        """(N,) int64 pixels of each proposal (where the proposals are)."""
        if self.on_device:
            import torch

            members = torch.as_tensor(self.members)
            # a float64 product: CUDA has no integer matrix product, and pixel counts are exact in float64
            return (members.to(torch.float64) @ self.atom_areas().to(torch.float64)).to(torch.int64)
        return self.members.astype(np.int64) @ self.atom_areas()

    def atom_histogram(self, label_map: np.ndarray, num_classes: int) -> np.ndarray:
        """(A, num_classes) int64: the pixels of each class of an (H, W) class map in each atom (void not counted;
        ids at or above num_classes count as the last class)."""
        label_map = np.asarray(label_map)
        if label_map.shape != self.shape:
            raise InputError(f"label map of shape {label_map.shape} for proposals of an image of {self.shape}")
        counted = label_map != IGNORE
        histogram = np.zeros((self.num_atoms, num_classes), np.int64)
        classes = np.minimum(label_map[counted], num_classes - 1).astype(np.int64)
        np.add.at(histogram, (self.atoms[counted], classes), 1)
        return histogram

    def majority(self, label_map: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
        """Each proposal's majority class in an (H, W) class map (void not counted) and its purity: the fraction of
        the proposal's pixels that class covers."""
        counts = self.members.astype(np.int64) @ self.atom_histogram(label_map, num_classes)
        return counts.argmax(axis=1), counts.max(axis=1, initial=0) / np.maximum(self.areas(), 1)

    def candidates(self, objectness_threshold: float, min_area: int) -> "Records":
        """The proposals with objectness >= objectness_threshold and area >= min_area as Records (id: the index in
        these proposals; members, objectness, area), where the proposals are (the host, or a device)."""
        area = self.areas()
        passed = (self.objectness >= objectness_threshold) & (area >= min_area)
        ids = passed.nonzero().flatten() if self.on_device else np.flatnonzero(passed)
        return Records(id=ids, members=self.members[ids], objectness=self.objectness[ids], area=area[ids])

    @property
    def masks(self) -> np.ndarray:
        """(N, H, W) bool masks, materialised (N x H x W bytes: for inspection and small images)."""
        return self.members[:, self.atoms]

    def filter(self, keep) -> "Proposals":
        """The proposals selected by a boolean mask or index array (atoms unchanged)."""
        return Proposals(self.atoms, self.members[keep], self.objectness[keep])


class Records:
    """Per-region arrays of equal length (one row per region), filtered together: `records["area"]`,
    `records["class"] = classes`, `records.filter(keep)`. NumPy arrays, or arrays on a CUDA device (torch, CuPy)
    kept there."""

    def __init__(self, **arrays) -> None:
        self._arrays: dict[str, np.ndarray] = {}
        for name, value in arrays.items():
            self[name] = value

    def __getitem__(self, name: str) -> np.ndarray:
        return self._arrays[name]

    def __setitem__(self, name: str, value) -> None:
        value = value if place(value).is_cuda else np.asarray(value)  # device rows stay where they are
        if self._arrays and len(value) != len(self):
            raise InputError(f"Records: {name!r} has {len(value)} rows, the others {len(self)}")
        self._arrays[name] = value

    def __len__(self) -> int:
        return len(next(iter(self._arrays.values()))) if self._arrays else 0

    def filter(self, keep) -> "Records":
        """The rows selected by a boolean mask or an index array (which may also reorder them)."""
        return Records(**{name: value[keep] for name, value in self._arrays.items()})
