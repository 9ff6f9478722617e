"""Bank parts: a bank's entries before outlier rejection, in pieces that can be built apart (a batch of images, a
shard of a distributed build), kept on disk, merged and appended to. `FeatureBank.from_parts` makes the bank of a
sequence of them. Parts directories are sealed and written whole, as banks are (engine.bank.storage)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from ..config import Config
from ..errors import BankError, InputError
from .storage import check_seal, digest, sealed, staged

#: the kinds of bank entry, as stored in kinds.npy: "class", a purified class mask's prototype; "region", a proposer
#: region named by the mask's majority class
KINDS = ("class", "region")

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
        with staged(path) as staging:
            np.save(staging / "vectors.npy", self.vectors)
            np.save(staging / "labels.npy", self.labels)
            np.save(staging / "kinds.npy", self.kinds)
            (staging / "sources.json").write_text(json.dumps(self.sources))
            record = {"format": PART_FORMAT, "version": PARTS_VERSION, "size": len(self), "dim": self.dim,
                      "images": self.images, "files": {name: digest(staging / name) for name in PART_FILES}}
            (staging / "part.json").write_text(json.dumps(sealed(record)))
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
        check_seal(record, path / "part.json", "rebuild the parts")
        files = record.get("files")
        for name in PART_FILES:
            if not (path / name).is_file() or not isinstance(files, dict) or digest(path / name) != files.get(name):
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
    with staged(path) as staging:
        names = [f"part-{i:06d}" for i in range(len(parts))]
        for name, part in zip(names, parts):
            part.save(staging / name)
        record = {"format": PARTS_FORMAT, "version": PARTS_VERSION, "class_names": list(class_names),
                  "backbone": dict(backbone_record), "config": config.to_dict(), "parts": names,
                  "entries": int(sum(len(p) for p in parts)), "images": int(sum(len(p.images) for p in parts))}
        (staging / "parts.json").write_text(json.dumps(sealed(record), indent=2))
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
    check_seal(record, file, "rebuild the parts")
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
