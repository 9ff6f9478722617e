"""engine.models.hf_backbones: the DINOv2 / DINOv3 / C-RADIO adapters with randomly initialised tiny models of the
same classes (no real weights exist here): token dropping, layer choice, dtypes, the registered families loading
weights from a local directory, the ONNX export, and a bank that rebuilds its backbone from what it recorded."""

from __future__ import annotations

import numpy as np
import pytest

from engine.constants import IMAGENET_MEAN, IMAGENET_STD
from engine.errors import InputError, ModelError

torch = pytest.importorskip("torch", reason="the model adapters need torch")
transformers = pytest.importorskip("transformers", reason="the model adapters need transformers")

from engine.models import create_backbone  # noqa: E402
from engine.models.hf_backbones import HFViTBackbone, RadioBackbone, load_radio  # noqa: E402


def tiny_vit_kwargs(patch: int) -> dict:
    return dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=patch,
                image_size=4 * patch)


def dinov2(registers: int = 0):
    torch.manual_seed(0)
    if registers:
        config = transformers.Dinov2WithRegistersConfig(num_register_tokens=registers, **tiny_vit_kwargs(14))
        return transformers.Dinov2WithRegistersModel(config).eval()
    return transformers.Dinov2Model(transformers.Dinov2Config(**tiny_vit_kwargs(14))).eval()


def image(rng, height, width):
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.mark.parametrize("registers", [0, 4])
def test_dinov2_features_shape_and_token_dropping(rng, registers):
    model = dinov2(registers)
    backbone = HFViTBackbone(model, family="dinov2", batch_size=2)
    assert (backbone.id, backbone.stride, backbone.dim) == ("dinov2/final+zeropad14", 14, 32)
    assert backbone.spec.prefix_tokens == 1 + registers and backbone.spec.weights is None
    images = [image(rng, 40, 60), image(rng, 28, 30), image(rng, 40, 60)]
    features = backbone.features(images)
    assert [f.shape for f in features] == [(3, 5, 32), (2, 3, 32), (3, 5, 32)]
    assert all(f.dtype == np.float32 and np.isfinite(f).all() for f in features)
    # the map is the model's last hidden state minus CLS/register tokens, on the zero-padded, normalised image
    padded = backbone.preprocess([images[1]])
    assert padded.dtype == np.uint8 and padded.shape == (1, 28, 42, 3)
    pixels = (padded / 255.0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    with torch.no_grad():
        tokens = model(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2)).float()).last_hidden_state
    np.testing.assert_allclose(features[1], tokens[0, 1 + registers:].reshape(2, 3, 32).numpy(), atol=1e-5)


def test_layer_choice_and_errors(rng):
    model = dinov2()
    picture = image(rng, 28, 28)
    final = HFViTBackbone(model).features([picture])[0]
    layer1 = HFViTBackbone(model, layer=1)
    assert layer1.id == "dinov2/layer1+zeropad14"
    with torch.no_grad():
        pixels = (picture / 255.0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
        hidden = model(pixel_values=torch.from_numpy(pixels.transpose(2, 0, 1)[None]).float(),
                       output_hidden_states=True).hidden_states[1]
    np.testing.assert_allclose(layer1.features([picture])[0], hidden[0, 1:].reshape(2, 2, 32).numpy(), atol=1e-5)
    assert not np.allclose(final, layer1.features([picture])[0])
    with pytest.raises(InputError, match=r"'layer<k>' with k in 1..2"):
        HFViTBackbone(model, layer=3)
    with pytest.raises(InputError, match="HxWx3"):
        layer1.features([np.zeros((28, 28), np.uint8)])


def test_dinov3_with_registers_and_bf16(rng):
    if not hasattr(transformers, "DINOv3ViTModel"):
        pytest.skip(f"transformers {transformers.__version__} has no DINOv3ViTModel")
    torch.manual_seed(0)
    model = transformers.DINOv3ViTModel(transformers.DINOv3ViTConfig(num_register_tokens=4, **tiny_vit_kwargs(16)))
    backbone = HFViTBackbone(model.eval(), family="dinov3", layer=2)
    assert (backbone.id, backbone.stride, backbone.spec.prefix_tokens) == ("dinov3/layer2+zeropad16", 16, 5)
    features = backbone.features([image(rng, 40, 70)])[0]
    assert features.shape == (3, 5, 32) and features.dtype == np.float32
    half = HFViTBackbone(model.to(torch.bfloat16), family="dinov3", layer=2).features([image(rng, 40, 70)])[0]
    assert half.shape == (3, 5, 32) and half.dtype == np.float32 and np.isfinite(half).all()


def test_registered_family_loads_weights_from_a_local_directory(rng, tmp_path):
    model = dinov2(registers=4)
    model.save_pretrained(tmp_path / "dinov2-reg")
    loaded = create_backbone("dinov2/layer2", runtime="torch", weights=tmp_path / "dinov2-reg")
    assert loaded.id == "dinov2/layer2@dinov2-reg+zeropad14" and loaded.spec.prefix_tokens == 5
    assert loaded.describe()["weights"] == str(tmp_path / "dinov2-reg")
    picture = image(rng, 30, 45)
    np.testing.assert_allclose(loaded.features([picture])[0], HFViTBackbone(model, layer=2).features([picture])[0],
                               atol=1e-5)
    with pytest.raises(ModelError, match="cannot load a model config"):
        create_backbone("dinov2/final", runtime="torch", weights=tmp_path / "missing")
    with pytest.raises(InputError, match="'final' or 'layer<k>'"):
        create_backbone("dinov2/layer9", runtime="torch", weights=tmp_path / "dinov2-reg")
    transformers.ViTModel(transformers.ViTConfig(**tiny_vit_kwargs(16))).save_pretrained(tmp_path / "vit")
    with pytest.raises(ModelError, match="is a 'vit' model"):
        create_backbone("dinov2/final", runtime="torch", weights=tmp_path / "vit")


def test_bank_rebuilds_its_backbone_from_the_record_through_onnx(rng, tmp_path, monkeypatch, toy):
    """A bank built with a torch backbone records name and weights; Engine(bank) recreates it with the default
    onnxruntime runtime (exported with dynamic B, H, W into a fresh cache) and gets the same features."""
    pytest.importorskip("onnxscript", reason="torch.onnx.export(dynamo=True) needs onnxscript")
    from engine import Engine, FeatureBank
    from engine.models import ground_truth_proposals
    from engine.models.runtime import OnnxRuntime

    dinov2().save_pretrained(tmp_path / "tiny")
    monkeypatch.setenv("MODUSEG_CACHE", str(tmp_path / "cache"))
    torch_backbone = create_backbone("dinov2/layer1", runtime="torch", weights=tmp_path / "tiny")
    bank = FeatureBank.build(toy.samples(rng, 3), torch_backbone, toy.CLASSES, progress=False)
    assert bank.backbone["model"] == "dinov2/layer1" and bank.backbone["weights"] == str(tmp_path / "tiny")
    assert bank.backbone_name == "dinov2/layer1"
    engine = Engine(bank, proposer=None)
    assert isinstance(engine.backbone.runtime, OnnxRuntime) and engine.backbone.id == torch_backbone.id
    assert (tmp_path / "cache" / "dinov2_layer1@tiny_v2.onnx").is_file()
    images = [image(rng, 40, 60), image(rng, 70, 29), image(rng, 40, 60)]  # not the export's example sizes
    for ours, theirs in zip(engine.backbone.features(images), torch_backbone.features(images)):
        np.testing.assert_allclose(ours, theirs, atol=1e-4)
    picture, label = toy.scene(rng)
    result = engine.segment(picture, ground_truth_proposals(label))
    assert result.label_map.shape == label.shape


class RadioStandIn(torch.nn.Module):
    """RADIO's contract: RGB in [0, 1], H and W multiples of min_resolution_step, returns (summary, tokens)."""

    patch_size, min_resolution_step = 16, 32

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Conv2d(3, 24, 16, 16)

    def forward(self, x):
        assert x.min() >= 0 and x.max() <= 1 and x.shape[-1] % 32 == 0 and x.shape[-2] % 32 == 0
        tokens = self.proj(x).flatten(2).transpose(1, 2)
        return tokens.mean(1), tokens


def test_radio_adapter_on_a_stand_in_with_radio_call_contract(rng):
    model = RadioStandIn()
    backbone = RadioBackbone(model)
    assert (backbone.id, backbone.dim, backbone.stride) == ("c-radio/final+zeropad16", 24, 16)
    pictures = [image(rng, 40, 70), image(rng, 16, 16)]
    features = backbone.features(pictures)
    assert [f.shape for f in features] == [(3, 5, 24), (1, 1, 24)]
    # RADIO sees the image padded to its step (48 x 80 -> 64 x 96); the extra tokens are cut off
    padded = np.zeros((64, 96, 3), np.float32)
    padded[:40, :70] = pictures[0] / 255.0
    with torch.no_grad():
        tokens = model.proj(torch.from_numpy(padded.transpose(2, 0, 1)[None].copy()))[0].permute(1, 2, 0)
    np.testing.assert_allclose(features[0], tokens[:3, :5].numpy(), atol=1e-5)


def test_radio_loading_needs_trust_and_a_final_member(tmp_path, monkeypatch):
    monkeypatch.delenv("MODUSEG_TRUST_REMOTE_CODE", raising=False)
    with pytest.raises(ModelError, match="trust_remote_code=True"):
        load_radio(tmp_path)
    with pytest.raises(InputError, match="member 'final'"):
        create_backbone("c-radio/layer3", weights=tmp_path)
    monkeypatch.setenv("MODUSEG_TRUST_REMOTE_CODE", "1")
    with pytest.raises(ModelError, match="cannot load C-RADIO"):
        load_radio(tmp_path / "missing")
