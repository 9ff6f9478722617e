"""engine.models.embedded: the proposer on the backbone's features, on toy scenes with the toy colour backbone (no
weights): atom-form proposals, granularities, recovered objects, objectness, the merge group, determinism."""

import numpy as np
import pytest

from engine.config import Config
from engine.errors import InputError
from engine.models.embedded import EmbeddedProposer, create_proposer, resolve_proposer
from engine.regions import Proposals


@pytest.fixture
def backbone(toy):
    return toy.ColorBackbone(stride=8)


@pytest.fixture
def proposer(backbone):
    return EmbeddedProposer(backbone=backbone, n_superpixels=120, levels=(24, 12, 6, 3), min_area=50,
                            superpixel_scale=1.0)


def test_proposals_are_unions_of_superpixels_with_objectness_in_range(proposer, toy, rng):
    images = [toy.scene(rng, 120, 160)[0] for _ in range(2)]
    for image, p in zip(images, proposer.propose(images)):
        assert isinstance(p, Proposals) and len(p) > 0 and p.shape == image.shape[:2]
        assert p.num_atoms == p.atoms.max() + 1  # one atom per superpixel
        assert p.objectness.dtype == np.float32 and np.all((p.objectness >= 0) & (p.objectness <= 1))
        assert np.all(p.areas() >= proposer.min_area)
        assert len({row.tobytes() for row in p.members}) == len(p)  # a region in several cuts is emitted once


def test_given_features_are_used_instead_of_a_forward_pass(proposer, backbone, toy, rng):
    image = toy.scene(rng, 120, 160)[0]
    features = backbone.features([image])
    calls = backbone.calls
    given = proposer.propose([image], features, backbone.stride)[0]
    assert backbone.calls == calls
    own = proposer.propose([image])[0]
    assert np.array_equal(given.members, own.members) and np.array_equal(given.atoms, own.atoms)


def test_proposals_overlap_at_several_granularities_and_find_the_objects(proposer, toy, rng):
    image, label = toy.scene(rng, 120, 160)
    p = proposer.propose([image])[0]
    areas = p.areas()
    assert areas.max() > 4 * areas.min()
    assert p.members.sum(axis=0).max() >= 2  # a superpixel lies in regions of several cuts
    masks = p.masks
    for class_id in (1, 2):
        target = label == class_id
        iou = (masks & target).sum((1, 2)) / (masks | target).sum((1, 2))
        assert iou.max() > 0.7
        assert p.objectness[np.argmax(iou)] >= 0.6  # a coherent object passes the default tau_obj


def test_merge_group_selects_a_layer(proposer):
    features = np.arange(2 * 3 * 7, dtype=np.float32).reshape(2, 3, 7)
    assert np.array_equal(proposer.merge_features(features, (4, 3)), features[..., 4:])
    assert proposer.merge_features(features, ()) is features
    proposer.merge_group = 0
    assert np.array_equal(proposer.merge_features(features, (4, 3)), features[..., :4])
    proposer.merge_group = None
    assert proposer.merge_features(features, (4, 3)) is features


def test_proposer_is_deterministic(proposer, toy, rng):
    image = toy.scene(rng, 120, 160)[0]
    a, b = proposer.propose([image])[0], proposer.propose([image.copy()])[0]
    assert np.array_equal(a.members, b.members) and np.array_equal(a.objectness, b.objectness)


def test_tiny_and_thin_images_give_proposals_or_none(proposer, rng):
    for shape in [(1, 1), (2, 2), (1, 300), (300, 3)]:
        image = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
        p = proposer.propose([image])[0]
        assert p.shape == shape and np.all(p.areas() >= proposer.min_area)


def test_create_and_resolve_proposer_follow_config(backbone):
    p = create_proposer(Config(min_area=123, num_threads=2), backbone=backbone)
    assert isinstance(p, EmbeddedProposer) and p.min_area == 123 and p.num_threads == 2
    assert isinstance(resolve_proposer("embedded", Config()), EmbeddedProposer)
    assert resolve_proposer(None) is None and resolve_proposer(p) is p
    with pytest.raises(InputError, match="unknown proposer 'sam'"):
        resolve_proposer("sam")
