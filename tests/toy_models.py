"""A tiny deterministic backbone for tests of the bank and the pipeline (no model weights): each stride x stride
patch's feature is its mean colour and a constant, so regions of different colours retrieve each other exactly."""

import numpy as np

from engine.models.base import Backbone
from engine.utils import check_image, pad_to_multiple


class ColorBackbone(Backbone):
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


def scene(height=96, width=128, rng=None, classes=(1, 2)):
    """An image on a grey background with one rectangle per class, and its label map."""
    rng = rng or np.random.default_rng()
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


CLASSES = ("background", "red", "green", "blue")


def toy_samples(count=6, rng=None):
    """Bank samples: scenes with two of the three colour classes each, labels from their masks."""
    from engine.data import Sample

    rng = rng or np.random.default_rng()
    samples = []
    for i in range(count):
        classes = [(1, 2), (2, 3), (1, 3)][i % 3]
        image, label = scene(rng=rng, classes=classes)
        samples.append(Sample(f"img{i}", image, list(classes), label))
    return samples


def toy_bank(count=9):
    """A bank of `count` toy scenes; K = 3 since every class has only a few vectors."""
    from engine import Config, FeatureBank

    return FeatureBank.build(toy_samples(count), ColorBackbone(), CLASSES, Config(min_area=100, top_k=3),
                             progress=False)


def copy_small_voc(voc, root, train=6, val=3):
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
