"""The offline feature bank: class prototypes from images with image-level labels, the method's first stage.

Per image and class mask: semantic boundary purification (SBP: erosion, small regions dropped) → soft-masked feature
aggregation (SMFA: area-interpolated mask weights over the backbone's patch grid, weighted mean, L2-normalised) → one
vector per (image, class) plus one background vector per image → per-class outlier rejection.

Region entries (Config.region_entries, on by default): the proposer's own regions in each bank image, each named by
the (pseudo-)mask's majority class when at least `region_purity` of it has that class, join the class prototypes.
Queries at inference are such regions too (parts, stuff, whole objects), so they meet bank entries of their own
kind.

Saved as a versioned directory with checksums, so a truncated or corrupt bank, or one built with another backbone, is
refused on load. The manifest is sealed too (SEAL: the sha256 of its own content), so class names, config or checksums
changed by hand are refused like a damaged file. The vectors are stored once (`vectors.npy`, read memory-mapped); an approximate index adds its
trained quantizer and codes, never a second copy of the vectors (INDEX_STORAGE). Each file's size and the sha256 of
its first and last HASH_BLOCK bytes are checked at every load (`verify="quick"`), the full sha256 on request
(`verify="full"`, `moduseg verify-bank`), so loading a large bank does not read it whole.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import cv2
import numpy as np
from tqdm.auto import tqdm

from . import ops
from .config import Config
from .constants import IGNORE
from .deps import require
from .errors import BankError, InputError
from .models.base import checked_features
from .ivf import (BLOCK_ROWS, ONDISK_SUFFIX, build_ondisk_index, make_faiss_index, ondisk_data_file,
                  read_ondisk_index, write_ondisk_index)
from .utils import file_sha256

FORMAT = "moduseg-feature-bank"
FORMAT_VERSION = 4  # 3: vectors stored once (no flat index.faiss), per-storage index files, quick/full checksums;
# 4: the manifest sealed (SEAL)
#: why a bank of an older format version is refused, where a reason helps
OLD_FORMATS = {3: "its manifest is not sealed: its class names and config were never checked"}
#: the key of a manifest (and of a parts directory's parts.json and part.json) holding the sha256 of the rest of it
SEAL = "seal_sha256"
#: BankEntry kinds, as stored in kinds.npy
KINDS = ("class", "region")


# --------------------------------------------------------------------------------------------------------------------
# Semantic boundary purification


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


# --------------------------------------------------------------------------------------------------------------------
# The bank


@dataclass
class BankEntry:
    """Where one bank vector came from: its image, its class, and its kind ("class": a purified class mask's
    prototype; "region": a proposer region named by the mask's majority)."""

    image_id: str
    class_id: int
    kind: str = "class"


@dataclass
class FeatureBank:
    """L2-normalised prototypes (M, dim) with their class ids (0 = background) and provenance.

    `backbone` is the backbone's `describe()` dict (id, dim, stride, padding); an engine refuses a bank whose backbone
    id or dimension differs from its own. `sources`: the image id of each vector; `kinds`: each vector's kind, an
    index into KINDS.
    """

    vectors: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]
    backbone: dict
    config: Config = field(default_factory=Config)
    sources: list[str] = field(default_factory=list)
    provenance: dict = field(default_factory=dict)
    kinds: np.ndarray | None = None

    def __post_init__(self) -> None:
        mapped = isinstance(self.vectors, np.memmap) or isinstance(getattr(self.vectors, "base", None), np.memmap)
        self.vectors = np.ascontiguousarray(self.vectors, dtype=np.float32)  # a mapped float32 array stays mapped
        self.labels = np.ascontiguousarray(self.labels, dtype=np.int32).reshape(-1)
        self.kinds = (np.zeros(len(self.labels), np.uint8) if self.kinds is None
                      else np.ascontiguousarray(self.kinds, dtype=np.uint8).reshape(-1))
        self.class_names = tuple(self.class_names)
        if len(self.kinds) != len(self.labels) or (len(self.kinds) and self.kinds.max() >= len(KINDS)):
            raise BankError(f"bank kinds {self.kinds.shape} must give one of {KINDS} per vector")
        if self.vectors.ndim != 2 or len(self.vectors) != len(self.labels):
            raise BankError(f"bank vectors {self.vectors.shape} and labels {self.labels.shape} disagree")
        if self.vectors.shape[1] != int(self.backbone.get("dim", -1)):
            raise BankError(f"bank vectors are {self.vectors.shape[1]}-d but the backbone record says "
                            f"{self.backbone.get('dim')}-d")
        if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= len(self.class_names)):
            raise BankError(f"bank labels outside 0..{len(self.class_names) - 1}")
        # memory-mapped vectors (a loaded bank, or one larger than memory) are not read whole here: save checks them
        # a block at a time, and load's checksums say the file is the one saved
        if not mapped and not np.isfinite(self.vectors).all():
            raise BankError("bank vectors contain NaN or inf")
        self._index = None

    # ---------------------------------------------------------------------------------------------------------- build

    @classmethod
    def build(cls, samples: Iterable, backbone, class_names: Sequence[str], config: Config | None = None,
              proposer="embedded", provenance: dict | None = None, progress: bool = True,
              total: int | None = None) -> "FeatureBank":
        """Build a bank from samples with `.id`, `.image` (HxWx3 uint8 RGB), `.mask` (HxW class-index map, 0
        background, 255 ignore; ground truth or pseudo-masks) and `.labels` (image-level class ids).

        Only classes named by the image's labels (and background) contribute: a mask pixel of another class is
        ignored, as the method filters the logits of absent classes. proposer: makes the region entries when
        `config.region_entries` ("embedded", a Proposer, or None for none); use the engine's.
        """
        from .models.embedded import resolve_proposer

        config = config or Config()
        proposer = resolve_proposer(proposer, config) if config.region_entries else None
        parts = list(bank_parts(samples, backbone, class_names, config, proposer, progress, total))
        bank = cls.from_parts(parts, class_names, backbone.describe(), config, provenance)
        bank.provenance["proposer"] = getattr(proposer, "name", None)
        return bank

    @classmethod
    def from_parts(cls, parts: Sequence["BankPart"], class_names: Sequence[str], backbone_record: dict,
                   config: Config | None = None, provenance: dict | None = None,
                   keep: np.ndarray | None = None) -> "FeatureBank":
        """The bank of a sequence of parts (see `BankPart`): their entries concatenated in the order given, then
        per-class outlier rejection over all of them (`reject_outliers`). Merging shards or appending images is this
        call over the parts of each, so outlier rejection sees the union, as one build over all images would.

        backbone_record: the backbone's `describe()` dict. keep: a keep-mask over the concatenated entries computed
        elsewhere (the Ray build's distributed outlier rejection, which equals `reject_outliers`); None computes it.
        """
        config = config or Config()
        parts = list(parts)
        dim = int(backbone_record.get("dim", -1))
        for i, part in enumerate(parts):
            if part.dim != dim:
                raise BankError(f"bank part {i} holds {part.dim}-d vectors; the backbone {backbone_record.get('id')} "
                                f"gives {dim}-d")
        matrix = np.concatenate([p.vectors for p in parts]) if parts else np.zeros((0, dim), np.float32)
        labels = np.concatenate([p.labels for p in parts]) if parts else np.zeros(0, np.int32)
        kinds = np.concatenate([p.kinds for p in parts]) if parts else np.zeros(0, np.uint8)
        sources = [source for p in parts for source in p.sources]
        if keep is None:
            keep = reject_outliers(matrix, labels, config, kinds == KINDS.index("class"))
        keep = np.asarray(keep, bool)
        if keep.shape != labels.shape:
            raise InputError(f"keep-mask of {keep.shape} for {len(labels)} bank entries")
        if not keep.any():
            raise InputError("no bank vector survived: every class mask was smaller than "
                             f"min_area={config.min_area} px after erosion (or there were no samples)")
        record = dict(provenance or {})
        record.setdefault("created", datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
        record["vectors_before_outlier_rejection"] = int(len(matrix))
        return cls(matrix[keep], labels[keep], tuple(class_names), dict(backbone_record), config,
                   [sources[i] for i in np.flatnonzero(keep)], record, kinds[keep])

    # ----------------------------------------------------------------------------------------------------- access

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def __len__(self) -> int:
        return len(self.vectors)

    @property
    def backbone_name(self) -> str:
        """The registered name of the bank's backbone (its id without the padding rule), for create_backbone."""
        return self.backbone.get("model") or str(self.backbone["id"]).split("+")[0]

    def class_counts(self) -> np.ndarray:
        """Number of bank vectors of each class (length = number of classes)."""
        return np.bincount(self.labels, minlength=len(self.class_names))

    @property
    def index(self):
        """The FAISS inner-product index over the vectors: a loaded bank's (an approximate index's codes, or its
        on-disk lists mapped), else built in memory on first use from `config.index`. A "Flat" bank is searched by
        engine.search.FlatIndex over the vectors, so this exact FAISS copy is made only when asked for."""
        if self._index is None:
            self._index = make_faiss_index(self.vectors, self.config)
        return self._index

    def check_backbone(self, backbone) -> None:
        """Raise BankError unless `backbone` is the one this bank was built with."""
        mine = (self.backbone.get("id"), int(self.backbone.get("dim", -1)))
        theirs = (backbone.id, int(backbone.dim))
        if mine != theirs:
            raise BankError(f"bank built with backbone {mine[0]} ({mine[1]}-d); this engine runs {theirs[0]} "
                            f"({theirs[1]}-d): rebuild the bank with this backbone or load the bank's backbone")

    # -------------------------------------------------------------------------------------------------- persistence

    def save(self, path, overwrite: bool = False, ondisk: bool | None = None, shard_rows: int = 1 << 20) -> Path:
        """Write the bank directory atomically: written to a temporary sibling, then renamed into place. With
        `overwrite`, an existing bank (a directory holding a bank manifest, and nothing else) is replaced: the old
        one is renamed aside, the new one renamed in, then the old one deleted, so a crash at any point leaves a
        whole bank at `path` or beside it, never half of one. Anything else at `path` is refused, never deleted.

        The vectors are written once, a block at a time (a memory-mapped bank is never read whole), and the index
        as INDEX_STORAGE says. `ondisk`: an IVF bank's index with its inverted lists in a file of their own, read
        memory-mapped at load (for banks larger than memory: built by engine.ivf.build_ondisk_index from the
        vectors, `shard_rows` vectors a shard, never whole in memory); None keeps a loaded on-disk index on disk."""
        path = Path(path)
        if path.exists() and not overwrite:
            raise BankError(f"{path} exists; pass overwrite=True (--overwrite) to replace the bank there")
        if path.exists():
            _check_replaceable(path)
        storage = _index_storage(self, ondisk)
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            _write_vectors(staging / "vectors.npy", self.vectors)
            np.save(staging / "labels.npy", self.labels)
            np.save(staging / "kinds.npy", self.kinds)
            (staging / "sources.json").write_text(json.dumps(self.sources))
            _write_index(self, staging, path, storage, shard_rows)
            manifest = {
                "format": FORMAT,
                "version": FORMAT_VERSION,
                "backbone": self.backbone,
                "dim": self.dim,
                "size": len(self),
                "class_names": list(self.class_names),
                "class_counts": {n: int(c) for n, c in zip(self.class_names, self.class_counts())},
                "kind_counts": {kind: int((self.kinds == i).sum()) for i, kind in enumerate(KINDS)},
                "config": self.config.to_dict(),
                "provenance": self.provenance,
                "index_storage": storage,
                "files": {name: _seal(staging / name) for name in _bank_files(storage)},
            }
            (staging / "manifest.json").write_text(json.dumps(_sealed(manifest), indent=2))
            _swap_in(staging, path)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return path

    @classmethod
    def load(cls, path, backbone=None, verify: str = "quick") -> "FeatureBank":
        """Read a bank directory, verifying format, version, that the manifest lists exactly the bank's files and
        their checksums, and the index against the vectors; with `backbone`, also that it matches. The vectors are
        memory-mapped (read as searches need them).

        verify: "quick" checks each file's size and the sha256 of its first and last HASH_BLOCK bytes (the whole
        file's for small ones): a truncated, extended or replaced file is refused without reading the bank whole;
        "full" rehashes every byte (a file corrupted in its middle too); `moduseg verify-bank` runs it."""
        if verify not in VERIFY:
            raise InputError(f"verify must be one of {VERIFY}, got {verify!r}")
        path = Path(path)
        manifest_file = path / "manifest.json"
        if not manifest_file.is_file():
            raise BankError(f"{path} is not a feature bank (no manifest.json)")
        try:
            manifest = json.loads(manifest_file.read_text())
        except (ValueError, RecursionError) as error:  # JSONDecodeError, UnicodeDecodeError, nesting too deep
            raise BankError(f"{manifest_file} is corrupt: {error}") from error
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise BankError(f"{path}: not a {FORMAT} directory")
        if manifest.get("version") != FORMAT_VERSION:
            reason = OLD_FORMATS.get(manifest.get("version"))
            raise BankError(f"{path}: bank format version {manifest.get('version')}, this engine reads "
                            f"version {FORMAT_VERSION}" + (f" ({reason})" if reason else "") + "; rebuild the bank")
        _check_seal(manifest, manifest_file, "rebuild the bank")
        storage = manifest.get("index_storage")
        if storage not in INDEX_STORAGE:
            raise BankError(f"{path}: unknown index storage {storage!r}; known: {sorted(INDEX_STORAGE)}")
        expected_files = set(_bank_files(storage))
        files = manifest.get("files")
        if not isinstance(files, dict) or set(files) != expected_files:
            raise BankError(f"{path}: the manifest must list checksums of exactly {sorted(expected_files)}, it "
                            f"lists {sorted(files or {})}")
        for name, expected in files.items():
            _verify(path, name, expected, verify)
        try:
            bank = cls(np.load(path / "vectors.npy", mmap_mode="r", allow_pickle=False),
                       np.load(path / "labels.npy", allow_pickle=False),
                       manifest["class_names"], manifest["backbone"], Config.from_dict(manifest["config"]),
                       json.loads((path / "sources.json").read_text()), manifest.get("provenance", {}),
                       np.load(path / "kinds.npy", allow_pickle=False))
            index = _read_index(path, storage, bank)
        except (KeyError, ValueError, TypeError, AttributeError, OSError, RuntimeError) as error:
            raise BankError(f"{path}: cannot read bank: {error}") from error
        if index is not None:
            _check_index(path, index, bank)
        bank._index = index
        if backbone is not None:
            bank.check_backbone(backbone)
        return bank

    @staticmethod
    def verify(path) -> dict:
        """Check a bank directory fully (every byte of every file, as load(verify="full")) and return its
        manifest; BankError naming the first problem."""
        FeatureBank.load(path, verify="full")
        return json.loads((Path(path) / "manifest.json").read_text())


def reject_outliers(vectors: np.ndarray, labels: np.ndarray, config: Config,
                    subject: np.ndarray | None = None) -> np.ndarray:
    """Keep-mask: per class, drop the `ratio` fraction (rounded down) of vectors farthest (Euclidean) from the class
    mean; foreground uses `outlier_ratio`, background (class 0) `background_outlier_ratio`. Among equal distances
    the earlier vector is dropped first (`drop_farthest`). `subject`: a boolean mask of the vectors the rule applies
    to (the class prototypes); the others are kept."""
    keep = np.ones(len(vectors), bool)
    subject = np.ones(len(vectors), bool) if subject is None else subject
    for class_id in np.unique(labels[subject]):
        members = np.flatnonzero((labels == class_id) & subject)
        n_drop = outlier_count(int(class_id), len(members), config)
        if n_drop == 0:
            continue
        distance = np.linalg.norm(vectors[members] - vectors[members].mean(axis=0), axis=1)
        keep[drop_farthest(members, distance, n_drop)] = False
    return keep


def outlier_count(class_id: int, n: int, config: Config) -> int:
    """How many of a class's `n` vectors outlier rejection drops: int(n * ratio)."""
    return int(n * (config.background_outlier_ratio if class_id == 0 else config.outlier_ratio))


def drop_farthest(members: np.ndarray, distance: np.ndarray, n_drop: int) -> np.ndarray:
    """The `n_drop` members with the largest distance; a stable sort, so among equal distances the one earlier in
    `members` goes first. Shared by `reject_outliers` and the distributed build, so both break ties alike."""
    return members[np.argsort(-distance, kind="stable")[:n_drop]]


# --------------------------------------------------------------------------------------------------------------------
# Parts: a bank before outlier rejection, in pieces that can be built apart, kept, merged and appended to

PART_FORMAT = "moduseg-bank-part"
PARTS_FORMAT = "moduseg-bank-parts"
PARTS_VERSION = 2  # 2: parts.json and part.json sealed (SEAL)
#: why parts of an older format version are refused
OLD_PARTS = {1: "parts.json and part.json are not sealed: their class names and images were never checked"}
#: a part directory's files; part.json (sizes and checksums of the others) is written last and marks it complete
PART_FILES = ("vectors.npy", "labels.npy", "kinds.npy", "sources.json")


@dataclass
class BankPart:
    """The entries of one batch of bank images before outlier rejection: vectors (n, dim) float32, their class ids,
    kinds (indices into KINDS) and source image ids, in build order; `images`: every image the batch featurised,
    also those that gave no entry (so merging can refuse an image counted twice)."""

    vectors: np.ndarray
    labels: np.ndarray
    kinds: np.ndarray
    sources: list[str]
    images: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.vectors = np.ascontiguousarray(self.vectors, dtype=np.float32)
        self.labels = np.ascontiguousarray(self.labels, dtype=np.int32).reshape(-1)
        self.kinds = np.ascontiguousarray(self.kinds, dtype=np.uint8).reshape(-1)
        self.sources, self.images = [str(s) for s in self.sources], [str(i) for i in self.images]
        n = len(self.labels)
        if self.vectors.ndim != 2 or len(self.vectors) != n or len(self.kinds) != n or len(self.sources) != n:
            raise BankError(f"bank part: vectors {self.vectors.shape}, labels ({n},), kinds {self.kinds.shape} and "
                            f"{len(self.sources)} sources disagree")

    @classmethod
    def empty(cls, dim: int, images: Sequence[str] = ()) -> "BankPart":
        return cls(np.zeros((0, dim), np.float32), [], [], [], list(images))

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    @classmethod
    def concatenate(cls, parts: Sequence["BankPart"]) -> "BankPart":
        """One part holding the entries (and images) of `parts`, in the order given."""
        parts = list(parts)
        if not parts:
            raise InputError("no bank parts to concatenate")
        return cls(np.concatenate([p.vectors for p in parts]), np.concatenate([p.labels for p in parts]),
                   np.concatenate([p.kinds for p in parts]), [s for p in parts for s in p.sources],
                   [i for p in parts for i in p.images])

    def per_image(self) -> list["BankPart"]:
        """One part per image of `images`, in order (entries are grouped by image in build order), so parts made in
        batches of any composition can be regrouped in image order."""
        if len(set(self.images)) != len(self.images):
            raise InputError(f"bank part lists an image twice: {self.images}")
        rows = {image: [] for image in self.images}
        for row, source in enumerate(self.sources):
            if source not in rows:
                raise InputError(f"bank part: entry {row} comes from image {source}, which the part does not list")
            rows[source].append(row)
        return [BankPart(self.vectors[r], self.labels[r], self.kinds[r], [image] * len(r), [image])
                for image, r in ((image, np.asarray(rows[image], np.int64)) for image in self.images)]

    def save(self, path) -> Path:
        """Write the part directory atomically (a temporary sibling renamed into place, part.json written last);
        an existing `path` is refused."""
        path = Path(path)
        if path.exists():
            raise BankError(f"{path} exists: a bank part is never overwritten")
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            np.save(staging / "vectors.npy", self.vectors)
            np.save(staging / "labels.npy", self.labels)
            np.save(staging / "kinds.npy", self.kinds)
            (staging / "sources.json").write_text(json.dumps(self.sources))
            record = {"format": PART_FORMAT, "version": PARTS_VERSION, "size": len(self), "dim": self.dim,
                      "images": self.images, "files": {name: _digest(staging / name) for name in PART_FILES}}
            (staging / "part.json").write_text(json.dumps(_sealed(record)))
            os.replace(staging, path)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return path

    @classmethod
    def load(cls, path) -> "BankPart":
        """Read a part directory; BankError unless it is complete (part.json present) and its files match it."""
        path = Path(path)
        try:
            record = json.loads((path / "part.json").read_text())
        except (OSError, ValueError, RecursionError) as error:
            raise BankError(f"{path} is not a complete bank part (no readable part.json): {error}") from error
        if not isinstance(record, dict) or record.get("format") != PART_FORMAT:
            raise BankError(f"{path}: not a {PART_FORMAT} directory")
        _check_parts_version(record, path / "part.json")
        _check_seal(record, path / "part.json", "rebuild the parts")
        files = record.get("files")
        for name in PART_FILES:
            if not (path / name).is_file() or not isinstance(files, dict) or _digest(path / name) != files.get(name):
                raise BankError(f"{path}: {name} is missing, truncated or corrupt")
        try:
            part = cls(np.load(path / "vectors.npy", allow_pickle=False), np.load(path / "labels.npy"),
                       np.load(path / "kinds.npy"), json.loads((path / "sources.json").read_text()),
                       record.get("images", []))
        except (ValueError, OSError) as error:
            raise BankError(f"{path}: cannot read bank part: {error}") from error
        if len(part) != record.get("size") or part.dim != record.get("dim"):
            raise BankError(f"{path}: part.json says {record.get('size')} x {record.get('dim')}, the files hold "
                            f"{len(part)} x {part.dim}")
        return part


def bank_parts(samples: Iterable, backbone, class_names: Sequence[str], config: Config | None = None,
               proposer=None, progress: bool = True, total: int | None = None) -> Iterator[BankPart]:
    """Featurise samples (as `FeatureBank.build` takes them) one batch of `config.batch_size` at a time: one
    BankPart per batch, in input order. proposer: a Proposer for region entries, or None (resolve "embedded" with
    engine.models.embedded.resolve_proposer first)."""
    config = config or Config()
    class_names = tuple(class_names)
    batch: list = []
    if total is None and hasattr(samples, "__len__"):
        total = len(samples)
    with tqdm(total=total, desc="building feature bank", unit="img", disable=not progress) as bar:
        for sample in samples:
            batch.append(sample)
            if len(batch) == config.batch_size:
                yield featurise_batch(batch, backbone, proposer, class_names, config)
                bar.update(len(batch))
                batch = []
        if batch:
            yield featurise_batch(batch, backbone, proposer, class_names, config)
            bar.update(len(batch))


def save_parts(parts: Sequence[BankPart], path, class_names: Sequence[str], backbone_record: dict,
               config: Config, overwrite: bool = False) -> Path:
    """Write a parts directory: part-000000/, part-000001/, ... in order and parts.json (what they were built with:
    classes, backbone, config; and the part names), staged in a temporary sibling and renamed into place, so a
    parts directory without parts.json, or half of one, never appears at `path`. With `overwrite`, an existing
    parts directory (and only that) is replaced."""
    path = Path(path)
    if path.exists():
        if not overwrite:
            raise BankError(f"{path} exists; pass overwrite=True (--overwrite) to replace the parts there")
        if not (path / "parts.json").is_file():
            raise BankError(f"{path} is not a bank parts directory (no parts.json): refusing to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        names = [f"part-{i:06d}" for i in range(len(parts))]
        for name, part in zip(names, parts):
            part.save(staging / name)
        record = {"format": PARTS_FORMAT, "version": PARTS_VERSION, "class_names": list(class_names),
                  "backbone": dict(backbone_record), "config": config.to_dict(), "parts": names,
                  "entries": int(sum(len(p) for p in parts)), "images": int(sum(len(p.images) for p in parts))}
        (staging / "parts.json").write_text(json.dumps(_sealed(record), indent=2))
        _swap_in(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return path


def load_parts(path) -> tuple[list[BankPart], dict]:
    """The parts of a parts directory, in order, and its parts.json record (class_names, backbone, config);
    BankError if parts.json is missing or a part it lists is missing or incomplete."""
    path = Path(path)
    file = path / "parts.json"
    try:
        record = json.loads(file.read_text())
    except (OSError, ValueError, RecursionError) as error:
        raise BankError(f"{path} is not a complete bank parts directory (no readable parts.json): {error}") from error
    if not isinstance(record, dict) or record.get("format") != PARTS_FORMAT:
        raise BankError(f"{path}: not a {PARTS_FORMAT} directory")
    _check_parts_version(record, file)
    _check_seal(record, file, "rebuild the parts")
    kinds = {"parts": list, "class_names": list, "backbone": dict, "config": dict}
    wrong = [f"{key}: {type(record[key]).__name__ if key in record else 'missing'}" for key, kind in kinds.items()
             if not isinstance(record.get(key), kind)]
    if wrong:
        raise BankError(f"{file}: expected {', '.join(f'{k} (a {v.__name__})' for k, v in kinds.items())}; got "
                        f"{', '.join(wrong)}")
    return [BankPart.load(_part_dir(path, name, file)) for name in record["parts"]], record


def _part_dir(path: Path, name, file: Path) -> Path:
    """The directory of part `name` listed in `file`: a plain name of a directory inside `path`, never a path (a
    hand-made parts.json naming "../elsewhere" or a link out of the folder would load entries from outside it)."""
    plain = isinstance(name, str) and name not in ("", ".", "..") and Path(name).name == name and "\\" not in name
    if not plain or (path / name).resolve().parent != path.resolve():
        raise BankError(f"{file}: part {name!r} is not the name of a directory inside {path}")
    return path / name


def _check_parts_version(record: dict, file: Path) -> None:
    """BankError unless a parts.json or part.json record is of this engine's PARTS_VERSION."""
    if record.get("version") != PARTS_VERSION:
        reason = OLD_PARTS.get(record.get("version"))
        raise BankError(f"{file}: bank parts format version {record.get('version')}, this engine reads version "
                        f"{PARTS_VERSION}" + (f" ({reason})" if reason else "") + "; rebuild the parts "
                        "(moduseg build-bank --keep-parts)")


def merge_parts(*groups: Sequence[BankPart]) -> list[BankPart]:
    """The parts of several builds (shards, or an old bank's and new images'), in the order given; InputError if an
    image was featurised in two of them (it would count twice in outlier rejection and retrieval)."""
    seen: dict[str, int] = {}
    for g, group in enumerate(groups):
        for part in group:
            for image in part.images:
                if seen.setdefault(image, g) != g:
                    raise InputError(f"image {image} is in parts of two builds ({seen[image]} and {g}): merge "
                                     "builds of disjoint images only")
    return [part for group in groups for part in group]


def featurise_batch(batch, backbone, proposer, class_names: Sequence[str], config: Config) -> BankPart:
    """The BankPart of a batch of samples: purified class prototypes and, with a proposer, region entries."""
    vectors: list[np.ndarray] = []
    entries: list[BankEntry] = []
    images = [s.image for s in batch]
    # non-finite features are not an error here: their vectors are dropped like empty ones (the method's rule)
    features = checked_features(backbone, images, [f"image {s.id}" for s in batch], finite=False)
    proposals = [None] * len(batch)
    finite = [i for i, f in enumerate(features) if np.isfinite(f).all()]  # the others give no entry at all
    if proposer is not None and finite:
        shared = {}
        if getattr(proposer, "uses_features", False):
            shared = dict(features=[features[i] for i in finite], stride=backbone.stride, groups=backbone.groups)
        for i, made in zip(finite, proposer.propose([images[i] for i in finite], **shared)):
            proposals[i] = made
    pooling = dict(pooling=config.pooling, eps=config.smfa_eps,
                   groups=backbone.groups if config.normalize_layers else (), num_threads=config.num_threads)
    for sample, image, feature_map, regions in zip(batch, images, features, proposals):
        mask = np.asarray(sample.mask)
        if mask.shape != image.shape[:2]:
            raise InputError(f"mask of image {sample.id}: shape {mask.shape}, the image is {image.shape[:2]}")
        allowed = {0, *(int(c) for c in sample.labels)}
        unknown = [c for c in allowed if not 0 <= c < len(class_names)]
        if unknown:
            raise InputError(f"labels of image {sample.id}: class ids {unknown} outside 0..{len(class_names) - 1}")
        values = np.unique(mask)
        stray = values[(values != IGNORE) & ((values < 0) | (values >= len(class_names)))]
        if len(stray):
            raise InputError(f"mask of image {sample.id}: values {stray.tolist()} are neither classes "
                             f"(0..{len(class_names) - 1}) nor void ({IGNORE})")
        named = [_class_regions(mask, allowed, config)]
        if regions is not None:
            named.append(_named_regions(mask, allowed, regions, len(class_names), config))
        for (atoms, members, class_ids), kind in zip(named, KINDS):
            if not len(class_ids):
                continue
            means = ops.soft_mask_pool(feature_map, atoms, members, backbone.stride, normalize=False, **pooling)
            usable = np.isfinite(means).all(axis=1) & (np.linalg.norm(means, axis=1) > config.min_vector_norm)
            pooled = ops.soft_mask_pool(feature_map, atoms, members, backbone.stride, **pooling)
            vectors.append(pooled[usable])
            entries.extend(BankEntry(sample.id, int(c), kind) for c in np.asarray(class_ids)[usable])
    dim = int(backbone.dim)
    return BankPart(np.concatenate(vectors) if vectors else np.zeros((0, dim), np.float32),
                    [e.class_id for e in entries], [KINDS.index(e.kind) for e in entries],
                    [e.image_id for e in entries], [s.id for s in batch])


def _class_regions(mask: np.ndarray, allowed: set, config: Config):
    """SBP of each allowed class of a mask: the purified masks (disjoint) as atoms, one region each, and their
    classes."""
    class_ids, atoms = [], np.zeros(mask.shape, np.int32)
    for class_id in np.unique(mask):
        if class_id == IGNORE or int(class_id) not in allowed:
            continue
        purified = purify(mask == class_id, config)
        if purified is not None:
            class_ids.append(int(class_id))
            atoms[purified] = len(class_ids)  # atom 0: the rest of the image
    return atoms, np.eye(len(class_ids), len(class_ids) + 1, 1, dtype=bool), class_ids


def _named_regions(mask: np.ndarray, allowed: set, proposals, num_classes: int, config: Config):
    """The proposals of at least min_area pixels whose majority class (void not counted) is allowed and covers at
    least `region_purity` of them, with that class."""
    majority, purity = proposals.majority(mask, num_classes)
    named = ((proposals.areas() >= config.min_area) & (purity >= config.region_purity)
             & np.isin(majority, sorted(allowed)))
    return proposals.atoms, proposals.members[named], majority[named]


#: how a bank stores its search index (manifest "index_storage"), and the files that adds to the vectors, labels,
#: kinds and sources every bank holds. The vectors are never stored twice:
#: "exact": Config.index "Flat", searched from vectors.npy (engine.search.FlatIndex), nothing more stored;
#: "ivf-lists": an IVF-Flat index, whose codes would be the vectors again: the trained index without its lists, and
#:     each vector's list (8 bytes a vector); load refills the lists from vectors.npy, no training or assignment;
#: "codes": any other FAISS index (IVF-PQ, scalar quantizers...), written whole: codes, not vectors (an HNSW,Flat
#:     or other index keeping raw vectors would hold a second copy);
#: "ondisk": an IVF index (IVF-PQ) whose inverted lists are a file of their own, memory-mapped at load
#:     (FeatureBank.save(ondisk=True), for banks larger than memory).
INDEX_STORAGE = {"exact": (), "ivf-lists": ("index.faiss", "ivf_lists.npy"), "codes": ("index.faiss",),
                 "ondisk": ("index.faiss", "index" + ONDISK_SUFFIX)}
#: what a bank directory may hold: anything else there means it is not (only) a bank, and it is never deleted
BANK_FILES = {"manifest.json", "vectors.npy", "labels.npy", "kinds.npy", "sources.json",
              *(name for names in INDEX_STORAGE.values() for name in names)}
#: FeatureBank.load's checks: sizes and head/tail hashes ("quick"), or every byte ("full")
VERIFY = ("quick", "full")
#: bytes hashed at each end of a file by the quick check; a file of at most twice this is hashed whole
HASH_BLOCK = 1 << 20


def _index_storage(bank: "FeatureBank", ondisk: bool | None) -> str:
    """How FeatureBank.save stores the bank's index (a key of INDEX_STORAGE)."""
    if bank.config.index == "Flat":
        if ondisk:
            raise InputError("ondisk=True needs an IVF index (Config.index \"IVF16384,PQ64\"), not \"Flat\"")
        return "exact"
    if ondisk is None:
        ondisk = bank._index is not None and ondisk_data_file(bank._index) is not None
    if ondisk:
        return "ondisk"
    faiss = require("faiss", "the bank's FAISS index")
    ivf = faiss.try_extract_index_ivf(bank.index)
    return "ivf-lists" if ivf is not None and isinstance(faiss.downcast_index(bank.index), faiss.IndexIVFFlat) \
        else "codes"

def _write_index(bank: "FeatureBank", staging: Path, final: Path, storage: str, shard_rows: int) -> None:
    """The index files of `storage` into `staging` (renamed to `final` afterwards)."""
    if storage == "exact":
        return
    faiss = require("faiss", "the bank's FAISS index")
    # an on-disk bank is built here from the vectors, never first in memory
    index = bank._index if storage == "ondisk" and bank._index is None else bank.index
    if storage != "ondisk" and ondisk_data_file(index) is not None:
        index = make_faiss_index(bank.vectors, bank.config)  # an on-disk index saved in memory: lists of its own
    if storage == "codes":
        faiss.write_index(index, str(staging / "index.faiss"))
    elif storage == "ivf-lists":
        # the vectors are the IVF-Flat lists' codes: store the trained index without them, and each vector's list
        lists = np.empty(len(bank), np.int64)
        invlists = index.invlists
        for number in range(index.nlist):
            rows = faiss.rev_swig_ptr(invlists.get_ids(number), invlists.list_size(number))
            lists[rows] = number
        empty = faiss.clone_index(index)
        empty.reset()
        faiss.write_index(empty, str(staging / "index.faiss"))
        np.save(staging / "ivf_lists.npy", lists)
    else:
        if index is None or ondisk_data_file(index) is None:
            index = build_ondisk_index(bank.vectors, bank.config, staging / "index.faiss", shard_rows)
        # the index file records where its lists are: where they will be once the bank is renamed into place
        write_ondisk_index(index, staging / "index.faiss", recorded=final.absolute() / "index.faiss")


def _swap_in(staging: Path, path: Path) -> None:
    """Rename the finished directory `staging` to `path`. An existing `path` is renamed aside first and deleted only
    once the new one is in place (put back if that rename fails), so a crash at any point leaves a whole directory at
    `path` or beside it, never half of one."""
    old = None
    if path.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
        os.replace(path, old / path.name)
    try:
        os.replace(staging, path)
    except BaseException:
        if old is not None and not path.exists():
            os.replace(old / path.name, path)  # the old directory back in place
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _bank_files(storage: str) -> tuple[str, ...]:
    """The files listed in the manifest of a bank with this index storage."""
    return ("vectors.npy", "labels.npy", "kinds.npy", "sources.json", *INDEX_STORAGE[storage])


def _write_vectors(file: Path, vectors: np.ndarray) -> None:
    """vectors.npy written a block of rows at a time (a memory-mapped bank is never read whole), each block checked
    for NaN and inf first."""
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False,
              "shape": tuple(int(n) for n in vectors.shape)}
    with open(file, "wb") as handle:
        np.lib.format.write_array_header_2_0(handle, header)
        for start in range(0, len(vectors), BLOCK_ROWS):
            block = np.ascontiguousarray(vectors[start:start + BLOCK_ROWS], np.float32)
            if not np.isfinite(block).all():
                raise BankError(f"bank vectors contain NaN or inf (rows {start}..{start + len(block) - 1})")
            handle.write(block.tobytes())


def _read_index(path: Path, storage: str, bank: "FeatureBank"):
    """The index of a bank directory as INDEX_STORAGE stores it (None for "exact": nothing to read)."""
    if storage == "exact":
        return None
    faiss = require("faiss", "the bank's FAISS index")
    if storage == "ondisk":
        index = read_ondisk_index(path / "index.faiss")
        lists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(index).invlists)
        have = (path / ("index" + ONDISK_SUFFIX)).stat().st_size
        if have < lists.totsize:  # a mapped file shorter than its lists would crash the first search that reads them
            raise BankError(f"{path}: index{ONDISK_SUFFIX} holds {have} bytes, its lists need {lists.totsize}")
        return index
    index = faiss.read_index(str(path / "index.faiss"))
    if storage == "ivf-lists":
        ivf = faiss.try_extract_index_ivf(index)
        lists = np.load(path / "ivf_lists.npy", allow_pickle=False)
        if ivf is None or index.ntotal or lists.shape != (len(bank),) or lists.dtype != np.int64 or (
                len(lists) and (lists.min() < 0 or lists.max() >= ivf.nlist)):
            raise BankError(f"{path}: ivf_lists.npy ({lists.shape}, {lists.dtype}) must give each of the "
                            f"{len(bank)} vectors one of the empty IVF index's lists")
        for start in range(0, len(bank), BLOCK_ROWS):  # the lists refilled in row order, as they were built
            block = np.ascontiguousarray(bank.vectors[start:start + BLOCK_ROWS], np.float32)
            assign = np.ascontiguousarray(lists[start:start + len(block)])
            index.add_core(len(block), faiss.swig_ptr(block), None, faiss.swig_ptr(assign))
    return index


def _check_index(path: Path, index, bank: "FeatureBank") -> None:
    """BankError unless `index` is an inner-product index of the bank's size and width (the vectors are stored
    once, so there is no second copy to compare)."""
    faiss = require("faiss", "the bank's FAISS index")

    if index.ntotal != len(bank) or index.d != bank.dim or index.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise BankError(f"{path}: index.faiss holds {index.ntotal} x {index.d} (metric {index.metric_type}), the "
                        f"vectors are {len(bank)} x {bank.dim} under inner product")


def _check_replaceable(path: Path) -> None:
    """BankError unless `path` is a bank directory (its manifest says so) holding only a bank's files."""
    if not path.is_dir():
        raise BankError(f"{path} exists and is not a bank directory: refusing to replace it")
    try:
        format_ = json.loads((path / "manifest.json").read_text()).get("format")
    except (OSError, ValueError, AttributeError):
        format_ = None
    others = sorted(p.name for p in path.iterdir() if p.name not in BANK_FILES)
    if format_ != FORMAT or others:
        what = f"holds {others[:5]}" if others else "has no bank manifest"
        raise BankError(f"{path} is not a feature bank ({what}): refusing to replace it; choose another --out")


def _content_sha256(record: dict) -> str:
    """sha256 of a record's canonical JSON (sorted keys, no spaces, ASCII), its SEAL left out."""
    body = {key: value for key, value in record.items() if key != SEAL}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def _sealed(record: dict) -> dict:
    """`record` with its SEAL: the files' checksums cover the data, the seal covers what names and describes it
    (class names, config, backbone, the checksums themselves)."""
    return {**record, SEAL: _content_sha256(record)}


def _check_seal(record: dict, file: Path, remedy: str) -> None:
    """BankError unless `record` (read from `file`) holds its SEAL and the seal matches its content."""
    if SEAL not in record:
        raise BankError(f"{file} is not sealed (no {SEAL}); {remedy}")
    if record[SEAL] != _content_sha256(record):
        raise BankError(f"{file} was changed after it was written (its {SEAL} does not match its content: class "
                        f"names, config or checksums edited, or the file damaged); {remedy}")


def _digest(file: Path) -> dict:
    return {"sha256": file_sha256(file), "bytes": file.stat().st_size}


def _ends(file: Path, block: int) -> dict:
    """sha256 of a file's first and last `block` bytes."""
    size = file.stat().st_size
    with open(file, "rb") as handle:
        head = hashlib.sha256(handle.read(block)).hexdigest()
        handle.seek(max(0, size - block))
        tail = hashlib.sha256(handle.read(block)).hexdigest()
    return {"head_sha256": head, "tail_sha256": tail}


def _seal(file: Path) -> dict:
    """A bank file's manifest record: size and full sha256, plus for a file longer than 2 HASH_BLOCK the sha256 of
    its first and last HASH_BLOCK bytes (the quick check), with the block size used."""
    record = _digest(file)
    if record["bytes"] > 2 * HASH_BLOCK:
        record.update(block=HASH_BLOCK, **_ends(file, HASH_BLOCK))
    return record


def _verify(path: Path, name: str, expected, verify: str) -> None:
    """BankError unless bank file `name` matches its manifest record (_seal): size and head/tail hashes ("quick";
    a small file's full hash), or size and full hash ("full")."""
    file = path / name
    if not file.is_file():
        raise BankError(f"{path}: missing {name}")
    if not isinstance(expected, dict):
        raise BankError(f"{path}: the manifest's record of {name} is not a checksum record")
    size = file.stat().st_size
    if size != expected.get("bytes"):
        raise BankError(f"{path}: {name} is truncated or corrupt (expected {expected.get('bytes')} bytes, found "
                        f"{size})")
    block = expected.get("block")
    if verify == "quick" and isinstance(block, int) and block > 0 and size > 2 * block:
        actual, keys = _ends(file, block), ("head_sha256", "tail_sha256")
    else:
        actual, keys = _digest(file), ("sha256",)
    for key in keys:
        if actual[key] != expected.get(key):
            where = {"head_sha256": f"in its first {block} bytes", "tail_sha256": f"in its last {block} bytes"}
            raise BankError(f"{path}: {name} is corrupt {where.get(key, '')}".rstrip() + f" (sha256 "
                            f"{str(expected.get(key))[:12]}…, found {actual[key][:12]}…)")
