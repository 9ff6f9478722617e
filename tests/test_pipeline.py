"""Engine end to end with a toy backbone: retrieval names proposals, filters, NMS, rasterisation, bad input."""

import numpy as np
import pytest

import engine
from engine import Engine, Proposals
from engine.errors import BankError, InputError
from engine.models import ground_truth_proposals
from toy_models import ColorBackbone, scene, toy_bank

@pytest.fixture(scope="module")
def bank():
    return toy_bank()


def test_ground_truth_proposals_give_the_ground_truth(bank):
    rng = np.random.default_rng()
    eng = Engine(bank, backbone=ColorBackbone())
    scenes = [scene(rng=rng, classes=c) for c in [(1, 2), (3,), (2, 3)]]
    results = eng.segment_batch([s[0] for s in scenes], [ground_truth_proposals(s[1]) for s in scenes])
    for (image, label), result in zip(scenes, results):
        np.testing.assert_array_equal(result.label_map, label)
        assert result.label_map.dtype == np.uint8 and result.owner.shape == label.shape
        assert sorted(result.classes.tolist()) == sorted(set(np.unique(label)) - {0})
        assert np.all(np.diff(result.confidences) <= 0)
        assert result.note == ""


def test_mixed_sizes_and_single_image(bank):
    rng = np.random.default_rng()
    eng = Engine(bank, backbone=ColorBackbone())
    small, large = scene(60, 70, rng=rng), scene(100, 150, rng=rng)
    results = eng.segment_batch([small[0], large[0]], [ground_truth_proposals(small[1]), ground_truth_proposals(large[1])])
    assert results[0].label_map.shape == (60, 70) and results[1].label_map.shape == (100, 150)
    single = eng.segment(large[0], ground_truth_proposals(large[1]))
    np.testing.assert_array_equal(single.label_map, results[1].label_map)


def test_no_proposals_is_all_background_and_said(bank):
    image, _ = scene()
    result = Engine(bank, backbone=ColorBackbone()).segment(image, Proposals.empty(*image.shape[:2]))
    assert not result.label_map.any() and len(result.classes) == 0 and "no proposals" in result.note
    assert (result.owner == -1).all()


def test_objectness_and_area_filters(bank):
    image, label = scene(classes=(1,))
    proposals = ground_truth_proposals(label)
    eng = Engine(bank, backbone=ColorBackbone())
    low = Proposals(proposals.masks, np.full(len(proposals), 0.59))
    assert "filters" in eng.segment(image, low).note
    tiny = np.zeros((1,) + label.shape, bool)
    tiny[0, :10, :10] = True  # 100 px < 300 px
    result = Engine(bank, backbone=ColorBackbone(), config=bank.config.replace(min_area=300)).segment(
        image, Proposals(tiny, [1.0]))
    assert result.num_candidates == 0 and not result.label_map.any()


def test_background_proposal_is_dropped(bank):
    image, label = scene(classes=(2,))
    proposals = ground_truth_proposals(label, include_background=True)
    result = Engine(bank, backbone=ColorBackbone()).segment(image, proposals)
    np.testing.assert_array_equal(result.label_map, label)
    assert 0 not in result.classes


def test_nms_suppresses_duplicate_and_owner_points_to_input_index(bank):
    image, label = scene(classes=(1,))
    mask = label == 1
    nearly = mask.copy()
    nearly[np.flatnonzero(mask.any(1))[0]] = False  # drop one row: IoU ~ 0.98 with `mask`
    result = Engine(bank, backbone=ColorBackbone()).segment(image, Proposals(np.stack([nearly, mask]), [1.0, 1.0]))
    assert len(result.classes) == 1
    kept = int(result.proposal_ids[0])
    assert set(np.unique(result.owner[result.label_map > 0])) == {kept}


def test_bad_inputs(bank):
    eng = Engine(bank, backbone=ColorBackbone())
    image, label = scene()
    proposals = ground_truth_proposals(label)
    for bad, message in [(image[..., 0], "grayscale"), (np.dstack([image, image[..., :1]]), "RGBA"),
                         (image.astype(np.float32), "uint8"), (image[:0], "empty"), ("x.jpg", "numpy array")]:
        with pytest.raises(InputError, match=message):
            eng.segment(bad, proposals)
    with pytest.raises(InputError, match="masks"):
        eng.segment(image, Proposals(proposals.masks[:, :-1], proposals.objectness))
    with pytest.raises(InputError, match="proposal sets"):
        eng.segment_batch([image, image], [proposals])
    with pytest.raises(InputError, match="no proposals given"):
        Engine(bank, backbone=ColorBackbone(), proposer=None).segment(image)
    with pytest.raises(InputError, match="unknown proposer"):
        Engine(bank, backbone=ColorBackbone(), proposer="sam").segment(image)
    with pytest.raises(BankError, match="test/other"):
        Engine(bank, backbone=ColorBackbone(id="test/other"))


def test_module_level_segment_batch_with_bank_directory(bank, tmp_path, monkeypatch):
    path = bank.save(tmp_path / "bank")
    monkeypatch.setattr("engine.models.create_backbone", lambda name, **kw: ColorBackbone(id=name))
    image, label = scene(classes=(3,))
    results = engine.segment_batch([image], path, proposals=[ground_truth_proposals(label)])
    np.testing.assert_array_equal(results[0].label_map, label)
    assert results[0].class_summary().keys() == {"background", "blue"}


def test_nan_or_misshapen_features_are_a_clear_error(bank):
    from engine.errors import ModelError

    class Broken(ColorBackbone):
        def __init__(self, damage):
            super().__init__()
            self.damage = damage

        def features(self, images):
            out = super().features(images)
            if self.damage == "nan":
                out[0][0, 0, 0] = np.nan
            else:
                out[0] = out[0][:-1]
            return out

    image, label = scene()
    for damage, message in (("nan", "NaN"), ("shape", "expected")):
        with pytest.raises(ModelError, match=message):
            Engine(bank, backbone=Broken(damage)).segment(image, ground_truth_proposals(label))
