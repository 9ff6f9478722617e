"""engine.models.effnet: EfficientNet-Lite2 cut after a block, behind the uint8 input stage; its family's specs; the
static SAME padding equal to TensorFlow's at every multiple of 32; the cached export against torch."""

from __future__ import annotations

import numpy as np
import pytest

from engine.constants import EFFNET_LITE_MEAN, EFFNET_LITE_STD
from engine.errors import InputError, ModelError
from engine.models import effnet
from engine.registry import backbone_spec

torch = pytest.importorskip("torch")
pytest.importorskip("efficientnet_lite_pytorch", reason="needs efficientnet-lite-pytorch (the export extra)")


@pytest.fixture(scope="module")
def trunk14():
    return effnet.trunk((14,))


def test_family_specs():
    for block, (dim, stride) in effnet.BLOCKS.items():
        spec = backbone_spec(f"effnet-lite2/block{block}")
        assert (spec.dim, spec.stride, spec.layout, spec.feature_output) == (dim, stride, "nhwc", "features")
        assert (spec.mean, spec.std) == (EFFNET_LITE_MEAN, EFFNET_LITE_STD)
        assert spec.build_onnx is not None and spec.torch_module is not None and spec.saliency_output is None
    assert effnet.BLOCKS == {14: (120, 16), 19: (208, 32), 20: (352, 32)}
    multi = backbone_spec("effnet-lite2/multilayer")
    assert (multi.dim, multi.stride, multi.padding, multi.groups) == (680, 16, 32, (208, 352, 120))
    assert multi.id == "effnet-lite2/multilayer+zeropad32"
    with pytest.raises(InputError, match="unknown backbone effnet-lite2/blockx"):
        backbone_spec("effnet-lite2/blockx")
    assert effnet.weights_file().name == "efficientnet-lite2-9656183e.pth"


def test_trunk_shapes_and_block_range(trunk14):
    x = torch.zeros(1, 3, 64, 96)
    with torch.inference_mode():
        assert trunk14(x).shape == (1, 120, 4, 6)
    with pytest.raises(ModelError, match=r"blocks 0..20, got \(21,\)"):
        effnet.trunk((21,))


def test_module_normalises_uint8_like_tensorflow_lite(rng, trunk14, monkeypatch):
    monkeypatch.setattr(effnet, "trunk", lambda blocks: trunk14 if blocks == (14,) else None)  # loaded once already
    module = effnet.module("block14")
    images = rng.integers(0, 256, (2, 64, 32, 3), dtype=np.uint8)
    pixels = (images.astype(np.float32) - 127.0) / 128.0  # TF-Lite's EfficientNet-Lite preprocessing
    with torch.inference_mode():
        got = module(torch.from_numpy(images))
        want = trunk14(torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy())).permute(0, 2, 3, 1)
    assert got.shape == (2, 4, 2, 120)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)


@pytest.mark.slow
def test_static_padding_is_tensorflow_same_padding(trunk14):
    # the export bakes SAME padding computed at 256x256; at any multiple of 32 it must equal the padding computed
    # from the actual input size (the package's dynamic-padding convolutions)
    from efficientnet_lite_pytorch import EfficientNet

    dynamic = EfficientNet.from_pretrained("efficientnet-lite2", weights_path=str(effnet.weights_file()),
                                           image_size=None).eval()
    x = torch.randn(1, 3, 160, 224, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = dynamic._swish(dynamic._bn0(dynamic._conv_stem(x)))
        for block in dynamic._blocks[:15]:
            expected = block(expected)
        got = trunk14(x)
    assert got.shape == (1, 120, 10, 14)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_multilayer_trunk_concatenates_blocks_at_the_finest_stride():
    multi = effnet.trunk((19, 20, 14))
    x = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        out = multi(x)
        parts = [effnet.trunk((b,))(x) for b in (19, 20, 14)]
    assert out.shape == (1, 680, 4, 6)
    repeat = lambda t: t.repeat_interleave(2, 2).repeat_interleave(2, 3)  # noqa: E731
    torch.testing.assert_close(out, torch.cat([repeat(parts[0]), repeat(parts[1]), parts[2]], 1))


def test_cached_export_records_its_verification():
    import json

    from engine.models.backbones import model_path
    from engine.models.torch_modules import EXPORT_TOLERANCE

    path = model_path("effnet-lite2/block19")
    meta = json.loads(path.with_name(path.name + ".json").read_text())
    assert meta["model"] == "efficientnet-lite2" and meta["blocks"] == [19] and meta["export_version"] == 2
    # verified against torch within tolerance x the output's magnitude (features reach tens): a small absolute diff
    assert meta["tolerance"] == EXPORT_TOLERANCE and 0 <= meta["max_abs_diff"] < 100 * EXPORT_TOLERANCE
