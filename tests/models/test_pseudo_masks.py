"""engine.models.pseudo_masks: pseudo-masks from image-level labels on toy scenes, with the toy colour backbone and a
stand-in saliency model (no weights): labels respected, objects recovered, determinism, painting."""

import numpy as np
import pytest

from engine.errors import InputError
from engine.models.pseudo_masks import (EmbeddedPseudoMasker, ImageRegions, LeafDecision, NegativePool,
                                        _shrunk_map)


class ToyFocus:
    """Stands in for img-focus: saliency high on saturated pixels (the coloured rectangles), low on grey."""

    def saliency(self, images, max_side=None):
        maps = []
        for image in images:
            spread = image.astype(np.float32).max(axis=2) - image.astype(np.float32).min(axis=2)
            maps.append(np.clip(spread / 150.0, 0.05, 0.95).astype(np.float32))
        return maps


@pytest.fixture
def masker(toy):
    return EmbeddedPseudoMasker(backbone=toy.ColorBackbone(stride=8), focus=ToyFocus(), n_superpixels=120)


@pytest.fixture
def scenes(toy):
    def make(count, seed=0, classes=(1, 2), size=(120, 160)):
        rng = np.random.default_rng(seed)
        return [toy.scene(rng, *size, classes=classes) for _ in range(count)]

    return make


def test_pseudo_masks_only_use_the_image_labels(masker, scenes):
    data = scenes(3, seed=1, classes=(1, 2)) + scenes(2, seed=2, classes=(1,)) + scenes(2, seed=4, classes=(3,))
    images = [image for image, _ in data]
    labels = [[1, 2], [1, 2], [1, 2], [1], [1], [3], [3]]
    masks = masker.generate(images, labels)
    for image, mask, classes in zip(images, masks, labels):
        assert mask.shape == image.shape[:2] and mask.dtype == np.uint8
        assert set(np.unique(mask).tolist()) <= {0, 255, *classes}
    for (image, truth), mask in zip(data[3:5], masks[3:5]):  # single label: object -> the label, grey -> background
        assert np.mean(mask[truth == 1] == 1) > 0.7
        assert np.mean(mask[truth == 0] == 0) > 0.7
    truth, mask = data[0][1], masks[0]  # two labels: each object mostly gets its own class
    for class_id in (1, 2):
        assert np.mean(mask[truth == class_id] == class_id) > 0.6


def test_pseudo_masks_without_labels_are_background(masker, scenes):
    (image, _), = scenes(1, seed=6)
    mask = masker.generate([image], [[]])[0]
    assert mask.shape == image.shape[:2] and np.all(mask == 0)


def test_pseudo_masks_are_deterministic(masker, scenes):
    data = scenes(3, seed=7)
    images = [image for image, _ in data]
    labels = [[1, 2], [1], [2]]
    first = masker.generate(images, labels)
    second = masker.generate([image.copy() for image in images], labels)
    assert all(np.array_equal(a, b) for a, b in zip(first, second))


def test_paint_matches_generate_and_refuses_a_changed_image(masker, scenes):
    (image, _), = scenes(1, seed=8)
    region = masker.prepare(image, [1], keep_labels=False)
    leaf = masker.assign([region])[0]
    assert np.array_equal(masker.paint(image, leaf), masker.generate([image], [[1]])[0])
    with pytest.raises(InputError, match="was the image changed"):
        masker.paint(np.zeros((40, 40, 3), np.uint8), leaf)


def test_solve_over_another_map_equals_assign_and_unknown_steps_raise(masker, scenes):
    """engine.distributed runs EmbeddedPseudoMasker.solve with each pass's steps as Ray tasks over pickled images;
    here a map that pickles each image and runs the steps last image first, then puts them back in order."""
    import pickle

    data = scenes(3, seed=3, classes=(1, 2)) + scenes(1, seed=5, classes=(2,))
    regions = [masker.prepare(image, classes, keep_labels=False)
               for (image, _), classes in zip(data, [[1, 2], [1, 2], [1, 2], [2]])]
    passes = []

    def per_image(name, **state):
        values = [masker.step(name, pickle.loads(pickle.dumps(r)), **state) for r in reversed(regions)]
        return values[::-1]

    got = masker.solve(per_image, [1, 2], regions[0].features.shape[1], on_pass=lambda: passes.append(1))
    want = masker.assign(regions)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        for name in ("labels", "best", "margin", "saliency", "saliency_map"):
            assert np.array_equal(getattr(a, name), getattr(b, name))
    assert len(passes) == masker.passes() and any((leaf.labels == 1).any() for leaf in got)
    with pytest.raises(ValueError, match="unknown step 'desicde'"):
        masker.step("desicde", regions[0])


def _reference_paint(decision, superpixel_labels, pixel_saliency):
    """LeafDecision.paint written pixel by pixel from its docstring."""
    out = np.zeros(superpixel_labels.shape, np.uint8)
    for (y, x), s in np.ndenumerate(superpixel_labels):
        z = decision.margin[s] + decision.weight * (pixel_saliency[y, x] - decision.saliency[s])
        out[y, x] = decision.best[s] if z > decision.band else (255 if abs(z) <= decision.band else 0)
    return out


def test_pixel_level_paint_matches_a_reference():
    """The pixel-level decision against a per-pixel loop: a pixel's z is its superpixel's plus weight x (its
    saliency - the superpixel's mean saliency), decided by the same band."""
    import cv2

    rng = np.random.default_rng(11)
    height, width, n = 37, 50, 9
    labels = rng.integers(0, n, (height, width)).astype(np.int32)
    saliency_map = rng.integers(0, 256, (10, 13)).astype(np.uint8)
    decision = LeafDecision(labels=rng.choice([0, 3, 7, 255], n).astype(np.uint8),
                            best=rng.choice([3, 7], n).astype(np.uint8),
                            margin=rng.uniform(-0.3, 0.3, n).astype(np.float32),
                            saliency=rng.uniform(0, 1, n).astype(np.float32), band=0.05, weight=1.5,
                            saliency_map=saliency_map)
    pixel_saliency = cv2.resize(saliency_map.astype(np.float32) / 255.0, (width, height),
                                interpolation=cv2.INTER_LINEAR)
    painted = decision.paint(labels)
    assert painted.dtype == np.uint8 and painted.shape == (height, width)
    assert np.array_equal(painted, _reference_paint(decision, labels, pixel_saliency))
    # weight 0 (or no map): every pixel takes its superpixel's label
    for off in (LeafDecision(**{**decision.__dict__, "weight": 0.0}),
                LeafDecision(**{**decision.__dict__, "saliency_map": None})):
        assert np.array_equal(off.paint(labels), decision.labels[labels])


def test_pixel_level_decision_splits_a_superpixel_by_saliency(masker, scenes):
    """Where the saliency map is flat inside each superpixel the pixel-level painting equals the superpixel-level
    one; pixel_saliency=0 is the superpixel-level masker; the shrunk map round-trips within uint8 precision."""
    data = scenes(3, seed=9, classes=(1, 2))
    images = [image for image, _ in data]
    labels = [[1, 2], [1], [2]]
    flat = EmbeddedPseudoMasker(backbone=masker.backbone, focus=masker.focus, n_superpixels=120, pixel_saliency=0.0)
    regions = [flat.prepare(image, classes) for image, classes in zip(images, labels)]
    assert all(r.saliency_map is None for r in regions)
    for decision, r in zip(flat.assign(regions), regions):
        assert np.array_equal(decision.paint(r.labels), decision.labels[r.labels])
        flat_map = LeafDecision(**{**decision.__dict__, "weight": 1.5,
                                   "saliency_map": np.full((4, 4), 128, np.uint8)})
        flat_map.saliency = np.full_like(decision.saliency, 128 / 255.0)
        assert np.array_equal(flat_map.paint(r.labels), decision.labels[r.labels])
    masks = masker.generate(images, labels)  # the default: pixel-level
    assert all(set(np.unique(m).tolist()) <= {0, 255, *c} for m, c in zip(masks, labels))
    ramp = np.tile(np.linspace(0, 1, 64, dtype=np.float32), (48, 1))
    assert _shrunk_map(ramp).shape == (12, 16)
    assert np.abs(_shrunk_map(ramp) / 255.0 - ramp[::4, ::4]).max() < 0.03


def _unit_rows(rng, n, dim):
    x = rng.normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_negative_pool_matches_a_loop_and_has_no_evidence_for_a_class_in_every_image():
    """NegativePool.nearest_absent against its definition, superpixel by superpixel: the largest similarity to a
    pooled superpixel whose image's labels lack the class; None where a class is in every pooled image."""
    rng = np.random.default_rng(21)
    labels = [[1, 2], [2], [1, 3], [3], [2, 3]]
    samples = [(_unit_rows(rng, int(rng.integers(1, 6)), 8), classes) for classes in labels]
    pool = NegativePool.reduce(samples, 4, 8)
    assert pool.features.shape == (sum(len(f) for f, _ in samples), 8) and pool.present.shape == (len(pool.features), 4)
    queries = _unit_rows(rng, 7, 8)
    got = pool.nearest_absent(queries, [1, 3])
    for i, q in enumerate(queries):
        for j, c in enumerate([1, 3]):
            want = max(float(q @ row) for f, classes in samples if c not in classes for row in f)
            assert abs(got[i, j] - want) < 1e-5
    everywhere = NegativePool.reduce([(f, [*c, 1]) for f, c in samples], 4, 8)
    assert everywhere.nearest_absent(queries, [1, 2]) is None and everywhere.nearest_absent(queries, []) is None
    capped = NegativePool.reduce(samples, 4, 8, limit=5)  # evenly spaced rows of the whole pool
    rows = NegativePool.sample_rows(len(pool.features), 5)
    assert np.array_equal(capped.features, pool.features[rows]) and np.array_equal(capped.present, pool.present[rows])
    empty = NegativePool.reduce([], 4, 8)
    assert empty.features.shape == (0, 8) and empty.nearest_absent(queries, [1]) is None


def test_negative_pool_answers_are_remembered_per_array_and_not_pickled():
    import pickle

    rng = np.random.default_rng(22)
    pool = NegativePool.reduce([(_unit_rows(rng, 4, 6), [1]), (_unit_rows(rng, 3, 6), [2])], 3, 6)
    queries = _unit_rows(rng, 5, 6)
    first = pool.nearest_absent(queries, [1, 2])
    assert pool.nearest_absent(queries, [1, 2]) is first  # the same image asked again: not recomputed
    assert pool.nearest_absent(queries.copy(), [1, 2]) is not first  # another array: computed
    assert np.array_equal(pool.nearest_absent(queries, [2]), first[:, 1:])  # other classes: computed again
    copy = pickle.loads(pickle.dumps(pool))
    assert copy._asked == {} and np.array_equal(copy.nearest_absent(queries, [1, 2]), first)


def test_negative_sample_rows_spread_over_the_superpixels():
    rows = NegativePool.sample_rows(400, 45)
    assert len(rows) == 45 and rows[0] == 0 and rows[-1] == 399 and np.all(np.diff(rows) > 0)
    assert np.array_equal(NegativePool.sample_rows(5, 45), np.arange(5))
    assert len(NegativePool.sample_rows(0, 45)) == 0 and len(NegativePool.sample_rows(10, 0)) == 0


def test_class_scores_lose_the_similarity_to_the_nearest_negative():
    """The class choice: similarity - contrast x foreground mean - negative_weight x nearest_absent, per class."""
    rng = np.random.default_rng(23)
    features = _unit_rows(rng, 6, 8)
    r = ImageRegions(saliency=np.array([0.9, 0.8, 0.1, 0.7, 0.2, 0.6], np.float32), features=features,
                     area=np.ones(6), classes=[1, 2])
    pool = NegativePool.reduce([(_unit_rows(rng, 5, 8), [1]), (_unit_rows(rng, 5, 8), [2])], 3, 8)
    similarity = features @ _unit_rows(rng, 2, 8).T
    masker = EmbeddedPseudoMasker(backbone=object(), focus=object(), contrast=0.5, negative_weight=0.7)
    foreground = r.saliency >= masker.fg_threshold
    want = similarity - 0.5 * similarity[foreground].mean(axis=0) - 0.7 * pool.nearest_absent(features, [1, 2])
    assert np.allclose(masker._class_scores(r, similarity, pool), want)
    assert np.allclose(masker._class_scores(r, similarity, None), want + 0.7 * pool.nearest_absent(features, [1, 2]))


def test_negatives_zero_is_the_masker_without_the_pool_and_the_pool_is_capped(masker, scenes):
    """negatives=0 makes no sample pass and no pool (with the pool the solve equals assign: tested above); the pool
    holds no more than `negatives` superpixels once the images outnumber it."""
    data = scenes(3, seed=12, classes=(1, 2)) + scenes(2, seed=13, classes=(1,))
    labels = [[1, 2], [1, 2], [1, 2], [1], [1]]
    off = EmbeddedPseudoMasker(backbone=masker.backbone, focus=masker.focus, n_superpixels=120, negatives=0)
    regions = [off.prepare(image, classes, keep_labels=False) for (image, _), classes in zip(data, labels)]
    steps = []

    def per_image(name, **state):
        steps.append(name)
        assert name == "sample" or state.get("pool") is None
        return [off.step(name, r, **state) for r in regions]

    off.solve(per_image, [1, 2], regions[0].features.shape[1])
    assert "sample" not in steps and len(steps) == off.passes() == masker.passes() - 1
    # more images than `negatives`: one superpixel from each, then evenly spaced rows of those, `negatives` in all
    few = EmbeddedPseudoMasker(backbone=masker.backbone, focus=masker.focus, n_superpixels=120, negatives=3)
    pools = []

    def keep_pool(name, **state):
        pools.append(state.get("pool"))
        return [few.step(name, r, **state) for r in regions]

    few.solve(keep_pool, [1, 2], regions[0].features.shape[1])
    pool = next(p for p in pools if p is not None)
    assert len(pool.features) == 3 and np.array_equal(pool.features[0], regions[0].features[0])
