"""engine.models.sam_proposer: the pure helpers (box NMS, stability score, point grid, mask boxes) against hand
values, and SamProposer on a randomly initialised tiny SamModel (no real weights here): shapes, filters, objectness,
atom-form proposals, loading from a local directory. Not mask quality."""

from __future__ import annotations

import numpy as np
import pytest

from engine.errors import InputError, ModelError
from engine.models.sam_proposer import SamProposer, box_nms, mask_boxes, point_grid, stability_score
from engine.regions import Proposals


def test_box_nms_stability_and_grid_helpers():
    boxes = np.array([[0, 0, 9, 9], [1, 1, 10, 10], [20, 20, 29, 29], [0, 0, 9, 9]], np.float32)
    scores = np.array([0.5, 0.9, 0.8, 0.1])
    assert box_nms(boxes, scores, 0.5).tolist() == [1, 2]  # 1 suppresses 0 and 3 (IoU 81/119, 81/119)
    assert box_nms(boxes, scores, 1.0).tolist() == [1, 2, 0, 3]
    assert box_nms(np.zeros((0, 4)), np.zeros(0), 0.5).tolist() == []
    assert box_nms(boxes, np.ones(4), 0.99).tolist() == [0, 1, 2]  # equal scores: index order; 3 duplicates 0
    masks = np.zeros((2, 8, 8), bool)
    masks[0, 2:5, 3:7] = True
    assert mask_boxes(masks).tolist() == [[3, 2, 6, 4], [0, 0, 0, 0]]
    logits = np.array([[[3.0, 0.5, -0.5, -3.0]]])
    assert stability_score(logits, 0.0, 1.0).tolist() == [pytest.approx(1 / 3)]
    assert stability_score(np.full((1, 2, 2), -5.0), 0.0, 1.0).tolist() == [0.0]  # empty at both thresholds
    grid = point_grid(2)
    assert grid.tolist() == [[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.75, 0.75]]


@pytest.fixture(scope="module")
def tiny_sam():
    """A randomly initialised SamModel of tiny width and depth (the helpers above need neither torch nor
    transformers; the proposer does)."""
    torch = pytest.importorskip("torch", reason="the SAM adapter needs torch")
    transformers = pytest.importorskip("transformers", reason="the SAM adapter needs transformers")
    torch.manual_seed(0)
    vision = transformers.SamVisionConfig(hidden_size=32, output_channels=32, num_hidden_layers=2,
                                          num_attention_heads=2, image_size=64, patch_size=16, window_size=2,
                                          global_attn_indexes=[1], num_pos_feats=16, mlp_dim=64)
    prompt = transformers.SamPromptEncoderConfig(hidden_size=32, image_size=64, patch_size=16, mask_input_channels=4)
    decoder = transformers.SamMaskDecoderConfig(hidden_size=32, mlp_dim=64, num_hidden_layers=2, num_attention_heads=2,
                                                iou_head_hidden_dim=32)
    config = transformers.SamConfig(vision_config=vision.to_dict(), prompt_encoder_config=prompt.to_dict(),
                                    mask_decoder_config=decoder.to_dict())
    return transformers.SamModel(config).eval()


LOOSE = dict(points_per_side=3, points_per_batch=4, pred_iou_thresh=0.0, stability_score_thresh=0.0)


def test_sam_proposer_shapes_filters_and_objectness(rng, tiny_sam):
    images = [rng.integers(0, 256, (40, 60, 3), dtype=np.uint8), rng.integers(0, 256, (50, 30, 3), dtype=np.uint8)]
    loose = SamProposer(tiny_sam, box_nms_thresh=1.0, **LOOSE)
    assert loose.input_size == 64
    result = loose.propose(images)
    for proposals, picture in zip(result, images):
        assert isinstance(proposals, Proposals) and proposals.shape == picture.shape[:2]
        assert proposals.masks.dtype == bool and proposals.masks.shape[1:] == picture.shape[:2]
        assert 1 <= len(proposals) <= 3 * 9
        assert proposals.objectness.dtype == np.float32
        assert ((proposals.objectness >= 0) & (proposals.objectness <= 1)).all()
        assert proposals.masks.reshape(len(proposals), -1).any(1).all()  # no empty masks
    # NMS only removes; impossible thresholds give empty proposals of the image's size
    nms = SamProposer(tiny_sam, box_nms_thresh=0.3, **LOOSE).propose(images[:1])[0]
    assert len(nms) <= len(result[0])
    strict = SamProposer(tiny_sam, points_per_side=3, pred_iou_thresh=1.0, stability_score_thresh=1.0)
    assert strict.propose(images[:1])[0].masks.shape == (0, 40, 60)
    pixels, resized = loose.preprocess(images[1])
    assert pixels.shape == (1, 3, 64, 64) and resized == (64, 38) and not pixels[0, :, :, 38:].any()
    for bad in (dict(pred_iou_thresh=1.5), dict(points_per_side=0)):
        with pytest.raises(InputError):
            SamProposer(tiny_sam, **bad)


def test_sam_proposer_from_a_local_directory(rng, tiny_sam, tmp_path):
    picture = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    tiny_sam.save_pretrained(tmp_path / "sam")
    loaded = SamProposer.from_pretrained(tmp_path / "sam", box_nms_thresh=1.0, **LOOSE)
    want = SamProposer(tiny_sam, box_nms_thresh=1.0, **LOOSE).propose([picture])[0]
    got = loaded.propose([picture])[0]
    np.testing.assert_array_equal(got.masks, want.masks)
    np.testing.assert_allclose(got.objectness, want.objectness, atol=1e-6)
    with pytest.raises(ModelError, match="cannot load SamModel"):
        SamProposer.from_pretrained(tmp_path / "missing")
