"""engine.models.clip_masker: correlation attention against a loop, and ClipPseudoMasker on a randomly initialised
CLIPModel of tiny width/depth (the ViT-B/16 layout) with a character-level tokenizer: never a class outside the
labels, background 0, the threshold, both attention variants, region restriction, a local directory, and the
open_clip path (skipped with its reason where open_clip cannot be imported). Not pseudo-mask quality."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from engine.errors import InputError, ModelError
from engine.regions import Proposals

torch = pytest.importorskip("torch", reason="the CLIP adapter needs torch")
transformers = pytest.importorskip("transformers", reason="the CLIP adapter needs transformers")

from engine.models.base import Proposer  # noqa: E402
from engine.models.clip_masker import ClipPseudoMasker, _HFTower, correlation_attention, softmax  # noqa: E402

CLASS_NAMES = ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat"]


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A ViT-B/16-layout CLIPModel (patch 16) of tiny width and depth, and a character-level CLIP tokenizer."""
    folder = tmp_path_factory.mktemp("tokenizer")
    chars = "abcdefghijklmnopqrstuvwxyz.,'- "
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = transformers.CLIPTokenizer(os.fspath(folder / "vocab.json"), os.fspath(folder / "merges.txt"))
    torch.manual_seed(0)
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=64, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=64, patch_size=16),
        projection_dim=24)
    return transformers.CLIPModel(config).eval(), tokenizer


def image(rng, height, width):
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


def test_correlation_attention_matches_a_loop():
    torch.manual_seed(1)
    q, k, v = torch.randn(3, 1, 5, 4).unbind(0)
    out = correlation_attention(q, k, v, heads=2, mode="qq+kk")
    for head in range(2):
        sl = slice(2 * head, 2 * head + 2)
        a = (q[0, :, sl] @ q[0, :, sl].T / 2 ** 0.5).softmax(-1) + (k[0, :, sl] @ k[0, :, sl].T / 2 ** 0.5).softmax(-1)
        torch.testing.assert_close(out[0, :, sl], a @ v[0, :, sl])
    allowed = torch.eye(5, dtype=torch.bool)[None]  # each token alone: qq attention returns its own value
    torch.testing.assert_close(correlation_attention(q, k, v, 2, "qq", allowed), v)
    np.testing.assert_allclose(softmax(np.array([[0.0, np.log(3.0)]])), [[0.25, 0.75]])


@pytest.mark.parametrize("attention", ["qq+kk", "qq"])
def test_labels_only_and_background_zero(rng, tiny_clip, attention):
    model, tokenizer = tiny_clip
    masker = ClipPseudoMasker(_HFTower(model, tokenizer), CLASS_NAMES, attention=attention, short_side=48)
    images = [image(rng, 40, 60), image(rng, 33, 21), image(rng, 40, 60)]
    labels = [[3, 7], [8], []]
    maps = masker.generate(images, labels)
    for label_map, picture, image_labels in zip(maps, images, labels):
        assert label_map.shape == picture.shape[:2] and label_map.dtype == np.uint8
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


def test_errors_and_local_directory(rng, tiny_clip, tmp_path):
    model, tokenizer = tiny_clip
    masker = ClipPseudoMasker(_HFTower(model, tokenizer), CLASS_NAMES, short_side=32)
    with pytest.raises(InputError, match="outside 1..8"):
        masker.generate([image(rng, 20, 20)], [[9]])
    with pytest.raises(InputError, match="0 is background"):
        masker.generate([image(rng, 20, 20)], [[0]])
    with pytest.raises(InputError, match="label lists"):
        masker.generate([image(rng, 20, 20)], [])
    for bad in (dict(attention="qk"), dict(short_side=8), dict(background_threshold=2.0),
                dict(background_names=(), background_threshold=0.0), dict(templates=["no slot"])):
        with pytest.raises(InputError):
            ClipPseudoMasker(_HFTower(model, tokenizer), CLASS_NAMES, **bad)
    with pytest.raises(InputError, match="1..254 class names"):
        ClipPseudoMasker(_HFTower(model, tokenizer), [])
    model.save_pretrained(tmp_path / "clip")
    tokenizer.save_pretrained(tmp_path / "clip")
    loaded = ClipPseudoMasker.from_pretrained(tmp_path / "clip", CLASS_NAMES, short_side=32)
    picture = image(rng, 30, 40)
    np.testing.assert_array_equal(loaded.generate([picture], [[1, 4]])[0], masker.generate([picture], [[1, 4]])[0])
    with pytest.raises(ModelError, match="CLIPModel"):
        ClipPseudoMasker.from_pretrained(tmp_path / "missing", CLASS_NAMES)


def test_region_restriction(rng, tiny_clip):
    class Halves(Proposer):
        name = "halves"

        def propose(self, images):
            picture = images[0]
            masks = np.zeros((2, *picture.shape[:2]), bool)
            masks[0, :, : picture.shape[1] // 2] = True
            masks[1, :, picture.shape[1] // 2:] = True
            return [Proposals.from_masks(masks, np.array([0.9, 0.8]))]

    model, tokenizer = tiny_clip
    plain = ClipPseudoMasker(_HFTower(model, tokenizer), CLASS_NAMES, short_side=32)
    scoped = ClipPseudoMasker(_HFTower(model, tokenizer), CLASS_NAMES, short_side=32, regions=Halves())
    picture = image(rng, 32, 64)
    allowed = scoped._allowed(picture, 1.0, (2, 4))[0]
    left = torch.tensor([1, 1, 0, 0, 1, 1, 0, 0], dtype=torch.bool)
    assert torch.equal(allowed, left[:, None] == left[None, :])
    label_map = scoped.generate([picture], [[1, 2]])[0]
    assert label_map.shape == (32, 64) and set(np.unique(label_map)) <= {0, 1, 2}
    assert not np.allclose(plain.logits(picture, [1, 2])[0], scoped.logits(picture, [1, 2])[0])


def test_open_clip_path_reports_missing_dependency_or_runs(rng):
    try:
        import open_clip  # noqa: F401
    except ImportError:
        with pytest.raises(ModelError, match="open-clip-torch"):
            ClipPseudoMasker.from_open_clip(CLASS_NAMES, pretrained=None)
        pytest.skip("open_clip not importable here (it needs torchvision): checked the error message only")
    masker = ClipPseudoMasker.from_open_clip(CLASS_NAMES, pretrained=None, short_side=64)
    label_map = masker.generate([image(rng, 40, 60)], [[2, 3]])[0]
    assert label_map.shape == (40, 60) and set(np.unique(label_map)) <= {0, 2, 3}
