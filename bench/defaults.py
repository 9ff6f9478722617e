"""Measures one row of docs/decisions.md: mIoU of a setting on a VOC-layout data set, on its val split (bank from all
of train) and on held-out folds inside train (bank from the other folds), so that a default is chosen on more images
than a small val split holds. Folds: one image each on voc2012-mini (leave one out), one video sequence each on camvid
(the first six characters of the image id), where neighbouring frames are near duplicates.

    python bench/defaults.py --data ../shared/data/camvid [--masks gt|pseudo] [--proposals auto|gt]
        [--backbone effnet-lite2/multilayer] [--set top_k=5 --set region_purity=0.5 ...]
        [--proposer levels=100,50 --proposer superpixel_scale=0.5 ...] [--masker negatives=0 ...]
        [--device-proposer [--device-knob slic_compactness=5 ...]] [--no-heldout] [--json out.json]

Train masks serve only the ground-truth bank (oracle rows) and the held-out folds' scoring, as the data's README
allows; val masks only score. Features are computed once per image (engine.report.CachedBackbone).
--device-proposer segments with the GPU engine's proposer (Config.gpu_proposer: EmbeddedProposer.propose_on_device,
its steps run here on torch CPU tensors), the bank's regions still coming from the host's proposer, as a bank built
by `moduseg build-bank` has them; --device-knob sets that proposer's EmbeddedProposer knobs.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # `python bench/defaults.py` from the repository root
    sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # after site-packages: an installed engine (with its compiled _C) wins

from engine import Config, Engine, FeatureBank  # noqa: E402
from engine.apis import evaluate  # noqa: E402
from engine.data import VOCDataset  # noqa: E402
from engine.eval import ConfusionMatrix  # noqa: E402
from engine.models import create_backbone  # noqa: E402
from engine.models.embedded import create_proposer  # noqa: E402
from engine.models.pseudo_masks import EmbeddedPseudoMasker, pseudo_mask_samples  # noqa: E402
from engine.registry import DEFAULT_BACKBONE  # noqa: E402
from engine.report import CachedBackbone  # noqa: E402


def assignments(pairs: list[str]) -> dict:
    """["top_k=5", "levels=100,50"] -> {"top_k": 5, "levels": (100, 50)} (values parsed as Python literals)."""
    out = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def folds(dataset: VOCDataset) -> list[np.ndarray]:
    """Held-out folds of a train split: video sequences on CamVid, single images elsewhere."""
    if "camvid" in str(dataset.root).lower():
        sequences = [image_id[:6] for image_id in dataset.ids]
        return [np.array([s == q for s in sequences]) for q in sorted(set(sequences))]
    return [np.arange(len(dataset)) == i for i in range(len(dataset))]


class DeviceStepsOnCPU:
    """The GPU engine's proposer for a CPU engine: EmbeddedProposer.propose_on_device on torch CPU tensors (the same
    steps and kernels; only float rounding in the Lab conversion can differ from a GPU's)."""

    name = "embedded"
    uses_features = True

    def __init__(self, proposer) -> None:
        import torch

        torch.set_num_threads(1)  # the engine's own threads keep the cores busy
        self.proposer, self.torch = proposer, torch

    def propose(self, images, features, stride, groups=()):
        maps = [self.torch.from_numpy(np.ascontiguousarray(f)) for f in features]
        return self.proposer.propose_on_device(images, maps, stride, groups)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="a VOC-layout data set with train and val splits")
    parser.add_argument("--masks", choices=("gt", "pseudo"), default="gt", help="bank masks")
    parser.add_argument("--proposals", choices=("auto", "gt"), default="auto", help="embedded or ground truth")
    parser.add_argument("--backbone", default=DEFAULT_BACKBONE)
    parser.add_argument("--set", action="append", default=[], help="a Config field, e.g. top_k=5")
    parser.add_argument("--proposer", action="append", default=[], help="an EmbeddedProposer knob, e.g. levels=100,50")
    parser.add_argument("--masker", action="append", default=[],
                        help="an EmbeddedPseudoMasker knob (--masks pseudo), e.g. negatives=0")
    parser.add_argument("--device-proposer", action="store_true",
                        help="segment with the GPU engine's proposer, its steps on torch CPU tensors")
    parser.add_argument("--device-knob", action="append", default=[],
                        help="an EmbeddedProposer knob of the device proposer, e.g. slic_compactness=5")
    parser.add_argument("--no-heldout", action="store_true", help="val only")
    parser.add_argument("--json", type=Path, help="write the summaries here")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    config = Config(**assignments(args.set))
    backbone = CachedBackbone(create_backbone(args.backbone))
    proposer = create_proposer(config, **assignments(args.proposer))
    segmenter = proposer
    if args.device_proposer:
        segmenter = DeviceStepsOnCPU(create_proposer(config, on_device=True, **assignments(args.device_knob)))
    train, val = VOCDataset(args.data, "train"), VOCDataset(args.data, "val")
    truth = list(train)
    bank_samples = truth
    if args.masks == "pseudo":
        masker = EmbeddedPseudoMasker(backbone, num_threads=config.num_threads, **assignments(args.masker))
        bank_samples = list(pseudo_mask_samples(train, config, masker=masker, progress=False))

    def engine_for(use: np.ndarray) -> Engine:
        bank = FeatureBank.build([s for s, u in zip(bank_samples, use) if u], backbone, train.class_names, config,
                                 proposer=proposer, progress=False)
        return Engine(bank, backbone=backbone, proposer=segmenter, config=config)

    results = {}
    confusion = evaluate(engine_for(np.ones(len(train), bool)), list(val), train.class_names, args.proposals)
    results["val"] = confusion.summary()
    both = ConfusionMatrix(train.class_names)
    both.matrix += confusion.matrix
    if not args.no_heldout:
        held = ConfusionMatrix(train.class_names)
        for fold in folds(train):
            evaluate(engine_for(~fold), [truth[i] for i in np.flatnonzero(fold)], train.class_names, args.proposals,
                     confusion=held)
        results["heldout"] = held.summary()
        both.matrix += held.matrix
        results["both"] = both.summary()
    line = " ".join(f"{split} {summary['miou']:.1f}" for split, summary in results.items())
    print(f"{args.data.name} bank={args.masks} proposals={args.proposals} backbone={args.backbone} "
          f"set={assignments(args.set)} proposer={assignments(args.proposer)}"
          f"{f' device-proposer {assignments(args.device_knob)}' if args.device_proposer else ''}: {line} "
          f"({time.perf_counter() - start:.0f} s)")
    last = results.get("both", results["val"])
    print(" ".join(f"{name}={value:.0f}" for name, value in last["per_class"].items() if value is not None))
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"data": str(args.data), "json": str(args.json)},
                                         "results": results}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
