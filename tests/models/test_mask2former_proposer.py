"""engine.models.mask2former_proposer: Mask2Former / EntitySeg class-agnostic proposals with a randomly initialised
tiny Mask2Former (tiny Swin backbone): resizing, batching, masks at the native resolution, objectness = 1 - p(no
object), the knobs, loading from a local directory. Not proposal quality."""

from __future__ import annotations

import numpy as np
import pytest

from engine.errors import InputError, ModelError
from engine.regions import Proposals

torch = pytest.importorskip("torch", reason="the Mask2Former adapter needs torch")
transformers = pytest.importorskip("transformers", reason="the Mask2Former adapter needs transformers")

from engine.models.mask2former_proposer import Mask2FormerProposer  # noqa: E402


@pytest.fixture(scope="module")
def tiny_mask2former():
    torch.manual_seed(0)
    swin = transformers.SwinConfig(image_size=64, embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1],
                                   window_size=2, out_features=["stage1", "stage2", "stage3", "stage4"])
    config = transformers.Mask2FormerConfig(backbone_config=swin, feature_size=32, mask_feature_size=32, hidden_dim=32,
                                            encoder_feedforward_dim=64, encoder_layers=1, decoder_layers=2,
                                            num_attention_heads=2, dim_feedforward=64, num_queries=8, num_labels=1)
    return transformers.Mask2FormerForUniversalSegmentation(config).eval()


def test_shapes_objectness_batching_and_knobs(rng, tiny_mask2former):
    images = [rng.integers(0, 256, s, dtype=np.uint8) for s in [(40, 60, 3), (50, 30, 3), (40, 60, 3)]]
    proposer = Mask2FormerProposer(tiny_mask2former, short_side=64, max_size=128, batch_size=2, mask_threshold=0.5)
    result = proposer.propose(images)
    for proposals, picture in zip(result, images):
        assert isinstance(proposals, Proposals) and proposals.shape == picture.shape[:2]
        assert proposals.masks.dtype == bool and proposals.masks.shape[1:] == picture.shape[:2]
        assert 1 <= len(proposals) <= 8
        assert ((proposals.objectness >= 0) & (proposals.objectness <= 1)).all()
        assert (np.diff(proposals.objectness) <= 1e-6).all()  # best query first
    assert proposer.resized_size(40, 60) == (64, 96) and proposer.resized_size(50, 200) == (32, 128)
    # batching must not change results
    alone = Mask2FormerProposer(tiny_mask2former, short_side=64, max_size=128, batch_size=1).propose(images[:1])[0]
    np.testing.assert_allclose(alone.objectness, result[0].objectness, atol=1e-5)
    np.testing.assert_array_equal(alone.masks, result[0].masks)
    capped = Mask2FormerProposer(tiny_mask2former, short_side=64, max_size=128, max_proposals=3, mask_quality=True)
    few = capped.propose(images[:1])[0]
    assert len(few) <= 3 and (few.objectness <= alone.objectness[:len(few)] + 1e-6).all()
    none = Mask2FormerProposer(tiny_mask2former, short_side=64, max_size=128, score_threshold=1.0)
    assert len(none.propose(images[:1])[0]) == 0 and none.propose(images[:1])[0].shape == (40, 60)
    for bad in (dict(short_side=0), dict(short_side=200, max_size=100), dict(mask_threshold=1.5)):
        with pytest.raises(InputError):
            Mask2FormerProposer(tiny_mask2former, **bad)


def test_objectness_is_one_minus_no_object(tiny_mask2former):
    proposer = Mask2FormerProposer(tiny_mask2former, short_side=64, max_size=128, mask_threshold=0.0)
    class_logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [0.0, 0.0]])  # entity, no-object
    mask_logits = torch.ones(3, 16, 24)
    proposals = proposer._postprocess(class_logits, mask_logits, (64, 96), (64, 96), (40, 60))
    expected = 1 - class_logits.softmax(-1)[:, 1]
    np.testing.assert_allclose(proposals.objectness, np.sort(expected.numpy())[::-1], atol=1e-6)
    assert proposals.masks.all() and proposals.num_atoms == 1  # identical full masks share one atom


def test_from_a_local_directory(rng, tiny_mask2former, tmp_path):
    tiny_mask2former.save_pretrained(tmp_path / "m2f")
    picture = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    loaded = Mask2FormerProposer.from_pretrained(tmp_path / "m2f", short_side=64, max_size=128)
    want = Mask2FormerProposer(tiny_mask2former, short_side=64, max_size=128).propose([picture])[0]
    got = loaded.propose([picture])[0]
    np.testing.assert_array_equal(got.masks, want.masks)
    np.testing.assert_allclose(got.objectness, want.objectness, atol=1e-6)
    with pytest.raises(ModelError, match="cannot load Mask2FormerForUniversalSegmentation"):
        Mask2FormerProposer.from_pretrained(tmp_path / "missing")
