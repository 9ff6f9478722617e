"""FeatureBank: the offline feature bank, L2-normalised prototypes with their class ids and provenance, built from
images with image-level labels (engine.bank.featurise, then per-class outlier rejection, then the search space:
centring and hubness), saved to and loaded from a checked bank directory (engine.bank.storage), and searched through
its index (engine.search)."""

from __future__ import annotations

import datetime
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ..arrays import contiguous, place
from ..config import Config
from ..errors import BankError, InputError
from ..ivf import make_faiss_index
from .centering import bank_center, centered
from .featurise import bank_parts
from .hubness import MAX_ROWS as MAX_HUBNESS_ROWS, hubness
from .index_storage import check_index, choose_storage, read_index, write_index
from .outliers import reject_outliers_parts
from .parts import KINDS, BankPart
from .storage import (FORMAT, FORMAT_VERSION, check_replaceable, read_manifest, staged, write_manifest,
                      write_vectors)

#: the Config fields a bank saved before they existed lacks, as that bank was built and searched: its vectors SMFA's
#: own (no centring, no hubness) and its engines painting as the paper does (no superpixel vote), or voting without
#: the unsure superpixels' own queries
FIELDS_OF_OLDER_BANKS = {"center_bank": False, "hub_neighbours": 0, "superpixel_vote": False, "unsure_margin": 0.0}


@dataclass
class FeatureBank:
    """L2-normalised prototypes (M, dim) with their class ids (0 = background) and provenance.

    `backbone` is the backbone's `describe()` dict (id, dim, stride, groups, padding); an engine refuses a bank whose
    backbone id or dimension differs from its own. `sources`: the image id of each vector; `kinds`: each vector's
    kind, an index into KINDS. `center`: the mean the vectors were centred on (engine.bank.centering), which queries
    are centred on before a search (`center_queries`); None for a bank whose vectors are SMFA's own. The bank's
    `config.center_bank` says which: a copy of a centred bank's vectors must carry its center. `hubness`: each
    vector's mean similarity to its Config.hub_neighbours nearest others (engine.bank.hubness), or None.
    """

    vectors: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]
    backbone: dict
    config: Config = field(default_factory=Config)
    sources: list[str] = field(default_factory=list)
    provenance: dict = field(default_factory=dict)
    kinds: np.ndarray | None = None
    center: np.ndarray | None = None
    hubness: np.ndarray | None = None

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
        self.center = _finite_or_none("center", self.center, self.vectors.shape[1])
        self.hubness = _finite_or_none("hubness", self.hubness, len(self.labels))
        if self.config.center_bank != (self.center is not None):  # the config says what the vectors are
            self.config = self.config.replace(center_bank=self.center is not None)
        if self.hubness is None and self.config.hub_neighbours:
            self.config = self.config.replace(hub_neighbours=0)
        self._index = None
        self._centers: dict = {}  # Place -> the center there (center_queries)

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
        from ..models.embedded import resolve_proposer

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
        per-class outlier rejection over all of them (`reject_outliers_parts`). Merging shards or appending images is this
        call over the parts of each, so outlier rejection sees the union, as one build over all images would.

        backbone_record: the backbone's `describe()` dict. keep: a keep-mask over the concatenated entries computed
        elsewhere (the Ray build runs the same steps as tasks); None computes it here.
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
            keep = reject_outliers_parts(parts, config)
        keep = np.asarray(keep, bool)
        if keep.shape != labels.shape:
            raise InputError(f"keep-mask of {keep.shape} for {len(labels)} bank entries")
        if not keep.any():
            raise InputError("no bank vector survived: every class mask was smaller than "
                             f"min_area={config.min_area} px after erosion (or there were no samples)")
        record = dict(provenance or {})
        record.setdefault("created", datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
        record["vectors_before_outlier_rejection"] = int(len(matrix))
        # after outlier rejection, which compares SMFA's own vectors
        vectors, center, scores = search_space(matrix[keep], backbone_record, config)
        return cls(vectors, labels[keep], tuple(class_names), dict(backbone_record), config,
                   [sources[i] for i in np.flatnonzero(keep)], record, kinds[keep], center, scores)

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

    def center_queries(self, queries):
        """Queries pooled as the bank's vectors were, moved into the bank's search space: centred on the bank's
        center (where the queries live) when it has one, else as they are."""
        if self.center is None:
            return queries
        where = place(queries)
        if where not in self._centers:  # copied to a device once, not with every batch
            self._centers[where] = contiguous(self.center, np.float32, where)
        return centered(queries, self._centers[where], self.config.layer_groups(self.backbone.get("groups", ())))

    def search_offsets(self, config: Config | None = None) -> np.ndarray | None:
        """What a search adds to each vector's similarity: -config.hub_penalty x its hubness (engine.bank.hubness),
        or None without hubness or penalty. config: the searching engine's (default the bank's)."""
        penalty = (config or self.config).hub_penalty
        return None if self.hubness is None or not penalty else -penalty * self.hubness

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

    @property
    def built_index(self):
        """The bank's FAISS index if there is one yet (loaded with the bank, or built by `index`), else None: never
        builds one (saving an on-disk bank builds its index from the vectors instead)."""
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
            check_replaceable(path)
        storage = choose_storage(self, ondisk)
        with staged(path) as staging:
            write_vectors(staging / "vectors.npy", self.vectors)
            if self.center is not None:
                np.save(staging / "center.npy", self.center)
            if self.hubness is not None:
                np.save(staging / "hubness.npy", self.hubness)
            np.save(staging / "labels.npy", self.labels)
            np.save(staging / "kinds.npy", self.kinds)
            (staging / "sources.json").write_text(json.dumps(self.sources))
            write_index(self, staging, path, storage, shard_rows)
            write_manifest(staging, {
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
                "centered": self.center is not None,
                "hubness": self.hubness is not None,
            })
        return path

    @classmethod
    def load(cls, path, backbone=None, verify: str = "quick") -> "FeatureBank":
        """Read a bank directory, verifying format, version, that the manifest lists exactly the bank's files and
        their checksums, and the index against the vectors; with `backbone`, also that it matches. The vectors are
        memory-mapped (read as searches need them).

        verify: "quick" checks each file's size and the sha256 of its first and last HASH_BLOCK bytes (the whole
        file's for small ones): a truncated, extended or replaced file is refused without reading the bank whole;
        "full" rehashes every byte (a file corrupted in its middle too); `moduseg verify-bank` runs it."""
        path = Path(path)
        manifest = read_manifest(path, verify)
        try:
            config = Config.from_dict({**FIELDS_OF_OLDER_BANKS, **manifest["config"]})
            center = np.load(path / "center.npy", allow_pickle=False) if manifest.get("centered") is True else None
            scores = np.load(path / "hubness.npy", allow_pickle=False) if manifest.get("hubness") is True else None
            bank = cls(np.load(path / "vectors.npy", mmap_mode="r", allow_pickle=False),
                       np.load(path / "labels.npy", allow_pickle=False),
                       manifest["class_names"], manifest["backbone"], config,
                       json.loads((path / "sources.json").read_text()), manifest.get("provenance", {}),
                       np.load(path / "kinds.npy", allow_pickle=False), center, scores)
            index = read_index(path, manifest["index_storage"], bank)
        except (KeyError, ValueError, TypeError, AttributeError, OSError, RuntimeError) as error:
            raise BankError(f"{path}: cannot read bank: {error}") from error
        if index is not None:
            check_index(path, index, bank)
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


def search_space(vectors: np.ndarray, backbone_record: dict, config: Config) -> tuple:
    """A new bank's vectors in its search space: (vectors, center, hubness), centred on their mean under
    Config.center_bank (engine.bank.centering) and their hubness scored there under Config.hub_neighbours
    (engine.bank.hubness); center and hubness are None where off."""
    center = scores = None
    if config.center_bank:
        center = bank_center(vectors)
        vectors = centered(vectors, center, config.layer_groups(backbone_record.get("groups", ())))
    if config.hub_neighbours and len(vectors) > MAX_HUBNESS_ROWS:
        warnings.warn(f"a bank of {len(vectors):,} vectors gets no hubness (Config.hub_neighbours): the exact search "
                      f"of the bank against itself is quadratic, allowed up to {MAX_HUBNESS_ROWS:,} vectors; its "
                      "searches have no hubness penalty", stacklevel=4)
    elif config.hub_neighbours:
        scores = hubness(vectors, config.hub_neighbours)
    return vectors, center, scores


def _finite_or_none(name: str, values, length: int) -> np.ndarray | None:
    """A bank's optional per-dimension or per-vector array as float32 of `length` finite numbers, or None."""
    if values is None:
        return None
    values = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
    if len(values) != length or not np.isfinite(values).all():
        raise BankError(f"bank {name} of {values.size} numbers must be {length} finite numbers")
    return values
