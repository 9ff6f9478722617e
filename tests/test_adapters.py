"""Adapters for the paper's model families (DINOv2/DINOv3/C-RADIO backbones, SAM and Mask2Former proposers, CLIP
pseudo-masks), run with randomly initialised tiny configs of the same architectures: no real weights exist here, so
these check shapes, dtypes, label filtering, knobs, save/load and export, not quality."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the model adapters need torch")
transformers = pytest.importorskip("transformers", reason="the model adapters need transformers")

from engine.errors import InputError, ModelError  # noqa: E402
from engine.models.base import Proposals  # noqa: E402

RNG = np.random.default_rng(0)


def random_image(height: int, width: int) -> np.ndarray:
    return RNG.integers(0, 256, (height, width, 3), dtype=np.uint8)


def tiny_vit_kwargs(patch: int) -> dict:
    return dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=patch,
                image_size=4 * patch)


# ---------------------------------------------------------------- backbones

def dinov2(registers: int = 0):
    torch.manual_seed(0)
    if registers:
        config = transformers.Dinov2WithRegistersConfig(num_register_tokens=registers, **tiny_vit_kwargs(14))
        return transformers.Dinov2WithRegistersModel(config).eval()
    return transformers.Dinov2Model(transformers.Dinov2Config(**tiny_vit_kwargs(14))).eval()


@pytest.mark.parametrize("registers", [0, 4])
def test_dinov2_features_shape_and_token_dropping(registers):
    from engine.models.hf_backbones import HFViTBackbone

    model = dinov2(registers)
    backbone = HFViTBackbone(model, name="dinov2-tiny", layer=None, batch_size=2)
    assert (backbone.id, backbone.stride, backbone.dim) == ("dinov2-tiny/final+zeropad14", 14, 32)
    assert backbone.prefix_tokens == 1 + registers
    images = [random_image(40, 60), random_image(28, 30), random_image(40, 60)]
    features = backbone.features(images)
    assert [f.shape for f in features] == [(3, 5, 32), (2, 3, 32), (3, 5, 32)]
    assert all(f.dtype == np.float32 and np.isfinite(f).all() for f in features)
    # the map is the model's last hidden state minus CLS/register tokens, on the zero-padded image
    pixels = backbone.preprocess([images[1]])
    with torch.no_grad():
        tokens = model(pixel_values=torch.from_numpy(pixels)).last_hidden_state[0, 1 + registers:]
    np.testing.assert_allclose(features[1], tokens.reshape(2, 3, 32).numpy(), atol=1e-5)


def test_backbone_layer_choice_and_errors():
    from engine.models.hf_backbones import HFViTBackbone

    model = dinov2()
    final = HFViTBackbone(model, name="d", layer=None).features([random_image(28, 28)])[0]
    layer1 = HFViTBackbone(model, name="d", layer=1)
    assert layer1.id == "d/layer1+zeropad14"
    assert not np.allclose(final, layer1.features([random_image(28, 28)])[0])
    with pytest.raises(InputError, match="layer"):
        HFViTBackbone(model, name="d", layer=3)
    with pytest.raises(InputError, match="HxWx3"):
        layer1.features([np.zeros((28, 28), np.uint8)])


def test_dinov3_features_with_registers_and_bf16():
    from engine.models.hf_backbones import HFViTBackbone

    if not hasattr(transformers, "DINOv3ViTModel"):
        pytest.skip(f"transformers {transformers.__version__} has no DINOv3ViTModel")
    torch.manual_seed(0)
    config = transformers.DINOv3ViTConfig(num_register_tokens=4, **tiny_vit_kwargs(16))
    model = transformers.DINOv3ViTModel(config).eval()
    backbone = HFViTBackbone(model, name="dinov3-tiny", layer=2)
    assert (backbone.id, backbone.stride, backbone.prefix_tokens) == ("dinov3-tiny/layer2+zeropad16", 16, 5)
    features = backbone.features([random_image(40, 70)])[0]
    assert features.shape == (3, 5, 32) and features.dtype == np.float32
    half = HFViTBackbone(model.to(torch.bfloat16), name="dinov3-tiny", layer=2).features([random_image(40, 70)])[0]
    assert half.shape == (3, 5, 32) and half.dtype == np.float32 and np.isfinite(half).all()


def test_backbone_from_local_directory(tmp_path):
    from engine.models.hf_backbones import HFViTBackbone

    model = dinov2(registers=4)
    model.save_pretrained(tmp_path / "dinov2-reg")
    loaded = HFViTBackbone.from_pretrained(tmp_path / "dinov2-reg", layer=2)
    assert loaded.id == "dinov2-reg/layer2+zeropad14" and loaded.prefix_tokens == 5
    image = random_image(30, 45)
    np.testing.assert_allclose(loaded.features([image])[0],
                               HFViTBackbone(model, name="x", layer=2).features([image])[0], atol=1e-5)
    with pytest.raises(ModelError, match="cannot read a model config"):
        HFViTBackbone.from_pretrained(tmp_path / "missing")


def test_dinov2_onnx_export_dynamic_hw_matches_torch(tmp_path):
    pytest.importorskip("onnxruntime", reason="the export check runs the graph with onnxruntime")
    pytest.importorskip("onnxscript", reason="torch.onnx.export(dynamo=True) needs onnxscript")
    from engine.models.backbones import ModelBackbone
    from engine.models.hf_backbones import HFViTBackbone
    from engine.models.runtime import OnnxRuntime

    backbone = HFViTBackbone(dinov2(registers=0), name="dinov2-tiny", layer=1)
    path = backbone.export_onnx(tmp_path / "dinov2.onnx")
    exported = ModelBackbone(backbone.spec, OnnxRuntime(path))
    assert exported.id == backbone.id
    # sizes other than the export example's, two in one batch
    images = [random_image(40, 60), random_image(70, 29), random_image(40, 60)]
    for ours, theirs in zip(exported.features(images), backbone.features(images)):
        assert ours.shape == theirs.shape
        np.testing.assert_allclose(ours, theirs, atol=1e-4)


def test_radio_adapter_on_a_stand_in_with_radio_call_contract():
    from engine.models.hf_backbones import RadioBackbone

    class StandIn(torch.nn.Module):
        """RADIO's contract: RGB in [0, 1], H and W multiples of min_resolution_step, returns (summary, tokens)."""

        patch_size, min_resolution_step = 16, 32

        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Conv2d(3, 24, 16, 16)

        def forward(self, x):
            assert x.min() >= 0 and x.max() <= 1 and x.shape[-1] % 32 == 0 and x.shape[-2] % 32 == 0
            tokens = self.proj(x).flatten(2).transpose(1, 2)
            return tokens.mean(1), tokens

    backbone = RadioBackbone(StandIn(), name="c-radio-standin")
    assert (backbone.id, backbone.dim, backbone.stride) == ("c-radio-standin/final+zeropad16", 24, 16)
    features = backbone.features([random_image(40, 70), random_image(16, 16)])
    assert [f.shape for f in features] == [(3, 5, 24), (1, 1, 24)]


# ---------------------------------------------------------------- proposers

def tiny_sam():
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


def test_box_nms_stability_and_grid_helpers():
    from engine.models.sam_proposer import box_nms, mask_boxes, point_grid, stability_score

    boxes = np.array([[0, 0, 9, 9], [1, 1, 10, 10], [20, 20, 29, 29], [0, 0, 9, 9]], np.float32)
    scores = np.array([0.5, 0.9, 0.8, 0.1])
    assert box_nms(boxes, scores, 0.5).tolist() == [1, 2]  # 1 suppresses 0 and 3 (IoU 81/119, 81/119)
    assert box_nms(boxes, scores, 1.0).tolist() == [1, 2, 0, 3]
    assert box_nms(np.zeros((0, 4)), np.zeros(0), 0.5).tolist() == []
    masks = np.zeros((2, 8, 8), bool)
    masks[0, 2:5, 3:7] = True
    assert mask_boxes(masks).tolist() == [[3, 2, 6, 4], [0, 0, 0, 0]]
    logits = np.array([[[3.0, 0.5, -0.5, -3.0]]])
    assert stability_score(logits, 0.0, 1.0).tolist() == [pytest.approx(1 / 3)]
    grid = point_grid(2)
    assert grid.tolist() == [[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.75, 0.75]]


def test_sam_proposer_shapes_filters_and_objectness(tmp_path):
    from engine.models.sam_proposer import SamProposer

    model = tiny_sam()
    images = [random_image(40, 60), random_image(50, 30)]
    loose = SamProposer(model, points_per_side=3, points_per_batch=4, pred_iou_thresh=0.0, stability_score_thresh=0.0,
                        box_nms_thresh=1.0)
    result = loose.propose(images)
    for proposals, image in zip(result, images):
        assert isinstance(proposals, Proposals)
        assert proposals.masks.dtype == bool and proposals.masks.shape[1:] == image.shape[:2]
        assert 1 <= len(proposals) <= 3 * 9
        assert proposals.objectness.dtype == np.float32
        assert ((proposals.objectness >= 0) & (proposals.objectness <= 1)).all()
        assert proposals.masks.reshape(len(proposals), -1).any(1).all()
    # NMS only removes; impossible thresholds give empty proposals of the image's size
    nms = SamProposer(model, points_per_side=3, points_per_batch=4, pred_iou_thresh=0.0, stability_score_thresh=0.0,
                      box_nms_thresh=0.3).propose(images[:1])[0]
    assert len(nms) <= len(result[0])
    strict = SamProposer(model, points_per_side=3, pred_iou_thresh=1.0, stability_score_thresh=1.0)
    assert strict.propose(images[:1])[0].masks.shape == (0, 40, 60)
    with pytest.raises(InputError):
        SamProposer(model, pred_iou_thresh=1.5)
    model.save_pretrained(tmp_path / "sam")
    assert len(SamProposer.from_pretrained(tmp_path / "sam", points_per_side=3, pred_iou_thresh=0.0,
                                           stability_score_thresh=0.0, box_nms_thresh=1.0).propose(images[:1])[0]) \
        == len(result[0])


def tiny_mask2former():
    torch.manual_seed(0)
    swin = transformers.SwinConfig(image_size=64, embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1],
                                   window_size=2, out_features=["stage1", "stage2", "stage3", "stage4"])
    config = transformers.Mask2FormerConfig(backbone_config=swin, feature_size=32, mask_feature_size=32, hidden_dim=32,
                                            encoder_feedforward_dim=64, encoder_layers=1, decoder_layers=2,
                                            num_attention_heads=2, dim_feedforward=64, num_queries=8, num_labels=1)
    return transformers.Mask2FormerForUniversalSegmentation(config).eval()


def test_mask2former_proposer_shapes_objectness_and_knobs():
    from engine.models.mask2former_proposer import Mask2FormerProposer

    model = tiny_mask2former()
    images = [random_image(40, 60), random_image(50, 30), random_image(40, 60)]
    proposer = Mask2FormerProposer(model, short_side=64, max_size=128, batch_size=2, mask_threshold=0.5)
    result = proposer.propose(images)
    for proposals, image in zip(result, images):
        assert proposals.masks.dtype == bool and proposals.masks.shape[1:] == image.shape[:2]
        assert 1 <= len(proposals) <= 8
        assert ((proposals.objectness >= 0) & (proposals.objectness <= 1)).all()
        assert (np.diff(proposals.objectness) <= 1e-6).all()  # best query first
    assert proposer.resized_size(40, 60) == (64, 96) and proposer.resized_size(50, 200) == (32, 128)
    # batching must not change results
    alone = Mask2FormerProposer(model, short_side=64, max_size=128, batch_size=1).propose(images[:1])[0]
    np.testing.assert_allclose(alone.objectness, result[0].objectness, atol=1e-5)
    capped = Mask2FormerProposer(model, short_side=64, max_size=128, max_proposals=3, mask_quality=True)
    few = capped.propose(images[:1])[0]
    assert len(few) <= 3 and (few.objectness <= alone.objectness[:len(few)] + 1e-6).all()
    assert len(Mask2FormerProposer(model, short_side=64, max_size=128, score_threshold=1.0)
               .propose(images[:1])[0]) == 0


def test_mask2former_objectness_is_one_minus_no_object():
    from engine.models.mask2former_proposer import Mask2FormerProposer

    proposer = Mask2FormerProposer(tiny_mask2former(), short_side=64, max_size=128, mask_threshold=0.0)
    class_logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [0.0, 0.0]])  # entity, no-object
    mask_logits = torch.ones(3, 16, 24)
    proposals = proposer._postprocess(class_logits, mask_logits, (64, 96), (64, 96), (40, 60))
    expected = 1 - class_logits.softmax(-1)[:, 1]
    np.testing.assert_allclose(proposals.objectness, np.sort(expected.numpy())[::-1], atol=1e-6)
    assert proposals.masks.all()


# ---------------------------------------------------------------- CLIP pseudo-masks

CLASS_NAMES = ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat"]


def tiny_clip(tmp_path):
    """A ViT-B/16-layout CLIPModel (patch 16) of tiny width and depth, and a character-level CLIP tokenizer."""
    chars = "abcdefghijklmnopqrstuvwxyz.,'- "
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = transformers.CLIPTokenizer(os.fspath(tmp_path / "vocab.json"), os.fspath(tmp_path / "merges.txt"))
    torch.manual_seed(0)
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=64, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=64, patch_size=16),
        projection_dim=24)
    return transformers.CLIPModel(config).eval(), tokenizer


def test_correlation_attention_matches_a_loop():
    from engine.models.clip_masker import correlation_attention

    torch.manual_seed(1)
    q, k, v = torch.randn(3, 1, 5, 4).unbind(0)
    out = correlation_attention(q, k, v, heads=2, mode="qq+kk")
    for head in range(2):
        sl = slice(2 * head, 2 * head + 2)
        a = (q[0, :, sl] @ q[0, :, sl].T / 2 ** 0.5).softmax(-1) + (k[0, :, sl] @ k[0, :, sl].T / 2 ** 0.5).softmax(-1)
        torch.testing.assert_close(out[0, :, sl], a @ v[0, :, sl])
    allowed = torch.eye(5, dtype=torch.bool)[None]  # each token alone: qq attention returns its own value
    torch.testing.assert_close(correlation_attention(q, k, v, 2, "qq", allowed), v)


@pytest.mark.parametrize("attention", ["qq+kk", "qq"])
def test_clip_masker_labels_only_background_zero(tmp_path, attention):
    from engine.models.clip_masker import ClipPseudoMasker, _HFTower

    model, tokenizer = tiny_clip(tmp_path)
    masker = ClipPseudoMasker(_HFTower(model, tokenizer), CLASS_NAMES, attention=attention, short_side=48)
    images = [random_image(40, 60), random_image(33, 21), random_image(40, 60)]
    labels = [[3, 7], [8], []]
    maps = masker.generate(images, labels)
    for label_map, image, image_labels in zip(maps, images, labels):
        assert label_map.shape == image.shape[:2] and label_map.dtype == np.uint8
        assert set(np.unique(label_map)) <= {0, *image_labels}
    assert not maps[2].any()
    # without background names every pixel is a labelled class; a threshold of 1 sends every pixel to background
    only = ClipPseudoMasker(_HFTower(model, tokenizer), CLASS_NAMES, background_names=(), background_threshold=1e-9,
                            short_side=48).generate(images[:1], [[2, 5]])[0]
    assert set(np.unique(only)) <= {2, 5} and only.all()
    assert not ClipPseudoMasker(_HFTower(model, tokenizer), CLASS_NAMES, background_threshold=1.0,
                                short_side=48).generate(images[:1], [[2, 5]])[0].any()
    logits, columns = masker.logits(images[0], [3, 7])
    assert logits.shape == (40, 60, len(masker.background_names) + 2) and columns[-2:] == [3, 7]


def test_clip_masker_errors_and_local_directory(tmp_path):
    from engine.models.clip_masker import ClipPseudoMasker, _HFTower

    model, tokenizer = tiny_clip(tmp_path)
    masker = ClipPseudoMasker(_HFTower(model, tokenizer), CLASS_NAMES, short_side=32)
    with pytest.raises(InputError, match="outside 1..8"):
        masker.generate([random_image(20, 20)], [[9]])
    with pytest.raises(InputError, match="0 is background"):
        masker.generate([random_image(20, 20)], [[0]])
    with pytest.raises(InputError, match="label lists"):
        masker.generate([random_image(20, 20)], [])
    with pytest.raises(InputError):
        ClipPseudoMasker(_HFTower(model, tokenizer), CLASS_NAMES, attention="qk")
    model.save_pretrained(tmp_path / "clip")
    tokenizer.save_pretrained(tmp_path / "clip")
    loaded = ClipPseudoMasker.from_pretrained(tmp_path / "clip", CLASS_NAMES, short_side=32)
    image = random_image(30, 40)
    np.testing.assert_array_equal(loaded.generate([image], [[1, 4]])[0], masker.generate([image], [[1, 4]])[0])
    with pytest.raises(ModelError, match="CLIPModel"):
        ClipPseudoMasker.from_pretrained(tmp_path / "missing", CLASS_NAMES)


def test_clip_masker_region_restriction(tmp_path):
    from engine.models.base import Proposer
    from engine.models.clip_masker import ClipPseudoMasker, _HFTower

    class Halves(Proposer):
        name = "halves"

        def propose(self, images):
            image = images[0]
            masks = np.zeros((2, *image.shape[:2]), bool)
            masks[0, :, : image.shape[1] // 2] = True
            masks[1, :, image.shape[1] // 2:] = True
            return [Proposals(masks, np.array([0.9, 0.8]))]

    model, tokenizer = tiny_clip(tmp_path)
    plain = ClipPseudoMasker(_HFTower(model, tokenizer), CLASS_NAMES, short_side=32)
    scoped = ClipPseudoMasker(_HFTower(model, tokenizer), CLASS_NAMES, short_side=32, regions=Halves())
    image = random_image(32, 64)
    allowed = scoped._allowed(image, 1.0, (2, 4))[0]
    left = torch.tensor([1, 1, 0, 0, 1, 1, 0, 0], dtype=torch.bool)
    assert torch.equal(allowed, left[:, None] == left[None, :])
    label_map = scoped.generate([image], [[1, 2]])[0]
    assert label_map.shape == (32, 64) and set(np.unique(label_map)) <= {0, 1, 2}
    assert not np.allclose(plain.logits(image, [1, 2])[0], scoped.logits(image, [1, 2])[0])


def test_open_clip_path_reports_missing_dependency_or_runs():
    from engine.models.clip_masker import ClipPseudoMasker

    try:
        import open_clip  # noqa: F401
    except ImportError:
        with pytest.raises(ModelError, match="open-clip-torch"):
            ClipPseudoMasker.from_open_clip(CLASS_NAMES, pretrained=None)
        pytest.skip("open_clip not importable here (it needs torchvision): checked the error message only")
    masker = ClipPseudoMasker.from_open_clip(CLASS_NAMES, pretrained=None, short_side=64)
    label_map = masker.generate([random_image(40, 60)], [[2, 3]])[0]
    assert label_map.shape == (40, 60) and set(np.unique(label_map)) <= {0, 2, 3}
