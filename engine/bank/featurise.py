"""Featurisation: bank images with their (pseudo-)masks and image-level labels turned into bank entries, one batch
at a time.

Per image and allowed class: semantic boundary purification (engine.bank.purification) → soft-masked feature
aggregation (SMFA: area-interpolated mask weights over the backbone's patch grid, weighted mean, L2-normalised) → one
vector per (image, class) plus one background vector per image. Region entries (Config.region_entries, on by
default): the proposer's own regions in each bank image, each named by the (pseudo-)mask's majority class when at
least `region_purity` of it has that class, join the class prototypes. Queries at inference are such regions too
(parts, stuff, whole objects), so they meet bank entries of their own kind.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import numpy as np
from tqdm.auto import tqdm

from .. import ops
from ..config import Config
from ..constants import IGNORE
from ..errors import InputError
from ..models.base import checked_features
from .parts import KINDS, BankPart
from .purification import purify


@dataclass
class BankEntry:
    """Where one bank vector came from: its image, its class, and its kind ("class": a purified class mask's
    prototype; "region": a proposer region named by the mask's majority)."""

    image_id: str
    class_id: int
    kind: str = "class"


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
                   groups=config.layer_groups(backbone.groups), num_threads=config.num_threads)
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
