"""The library face under every tool: build a bank, evaluate a split, segment files to a folder.

    bank = build_bank("runs/bank", data=root, masks="pseudo").bank          # in this process, or ray=True
    miou = evaluate(Engine(bank), eval_dataset(root, "val", bank.class_names), bank.class_names).summary()["miou"]
    summary = segment_files(find_inputs(["photos/"]), "runs/out", Engine(bank), run_provenance(...))

`moduseg build-bank`, `eval` and `segment` parse their flags and call these; `moduseg report`, bench/defaults.py and
the Ray paths (engine.distributed) call them too, so each loop exists once. Where each lives: `evaluate` with the
metrics (engine.eval), `segment_to_folder` with a segmentation run's bookkeeping (engine.segment_runs), both below
engine.distributed and engine.report, which use them.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import NamedTuple, Sequence

from .config import Config
from .errors import BankError, InputError
from .eval import evaluate
from .registry import DEFAULT_BACKBONE
from .segment_runs import segment_items, segment_to_folder

__all__ = ["BuiltBank", "build_bank", "eval_dataset", "evaluate", "segment_files", "segment_to_folder"]


# ------------------------------------------------------------------------------------------------ bank builds


class BuiltBank(NamedTuple):
    """What `build_bank` made: the bank (saved), how many images its parts hold, and the seconds it took."""

    bank: object
    images: int
    seconds: float


def build_bank(out, data=None, split: str = "train", masks: str = "gt", backbone: str = DEFAULT_BACKBONE,
               config: Config | None = None, add_parts: Sequence = (), parts_dir=None, overwrite: bool = False,
               ray: bool | str = False, actors: int | None = None) -> BuiltBank:
    """Build a feature bank from split `split` of the VOC-layout data set `data` (masks "gt": its ground truth, the
    oracle bank; "pseudo": pseudo-masks from its image-level labels) and/or the parts of earlier builds
    (`add_parts`: parts directories; outlier rejection runs over the union), and save it to `out`.

    parts_dir: also keep this build's parts there (to merge or append to later). ray: False featurises in this
    process; True on a local Ray cluster (or RAY_ADDRESS); a string joins the cluster at that address, with `actors`
    actors (default one per GPU, else per CPU). An existing `out` or `parts_dir` is a BankError unless `overwrite`."""
    from .bank import FeatureBank, bank_parts, merge_parts, save_parts
    from .data import VOCDataset
    from .models import create_backbone
    from .models.embedded import resolve_proposer

    config = config or Config()
    if masks not in ("gt", "pseudo"):
        raise InputError(f"masks must be 'gt' or 'pseudo', got {masks!r}")
    for target in (Path(out), None if parts_dir is None else Path(parts_dir)):
        if target is not None and target.exists() and not overwrite:
            raise BankError(f"{target} exists; pass --overwrite to replace it")
    model = create_backbone(backbone, batch_size=config.batch_size, num_threads=config.num_threads)
    class_names, groups = _added_parts(add_parts, model)
    provenance = {"masks": masks, "added_parts": [str(Path(p).resolve()) for p in add_parts]}
    start = time.perf_counter()
    address = None if ray is True else ray or None
    if data is not None:
        dataset = VOCDataset(data, split)
        if class_names is not None and tuple(dataset.class_names) != class_names:
            raise BankError(f"{data}: classes {list(dataset.class_names)} differ from the added parts' "
                            f"{list(class_names)}")
        class_names = tuple(dataset.class_names)
        provenance.update({"data": str(Path(data).resolve()), "split": split, "images": len(dataset)})
        if ray:
            from .distributed import build_parts_ray

            groups.append(build_parts_ray(data, split, masks, backbone, config, address=address, actors=actors))
            provenance["proposer"] = "embedded" if config.region_entries else None
            provenance["ray"] = address or "local"
        else:
            samples = dataset
            if masks == "pseudo":
                from .models.pseudo_masks import pseudo_mask_samples

                samples = pseudo_mask_samples(dataset, config, backbone=model)
            proposer = resolve_proposer("embedded", config) if config.region_entries else None
            provenance["proposer"] = getattr(proposer, "name", None)
            groups.append(list(bank_parts(samples, model, class_names, config, proposer, total=len(dataset))))
    if class_names is None:
        raise InputError("build_bank: give `data` (images to featurise) and/or `add_parts` (parts to merge)")
    parts = merge_parts(*groups)
    keep = None
    if ray:
        from .distributed import reject_outliers_ray

        keep = reject_outliers_ray(parts, config, address=address)
    if parts_dir is not None:
        save_parts(parts, parts_dir, class_names, model.describe(), config, overwrite=overwrite)
    bank = FeatureBank.from_parts(parts, class_names, model.describe(), config, provenance, keep=keep)
    bank.save(out, overwrite=overwrite)
    return BuiltBank(bank, sum(len(p.images) for p in parts), time.perf_counter() - start)


def _added_parts(directories: Sequence, backbone) -> tuple[tuple | None, list]:
    """(class names, [parts of each directory]) of earlier builds, refused unless all were made with `backbone` and
    the same classes."""
    from .bank import load_parts

    class_names, groups = None, []
    for earlier in directories:
        parts, record = load_parts(earlier)
        if record["backbone"].get("id") != backbone.id or int(record["backbone"].get("dim", -1)) != backbone.dim:
            raise BankError(f"--add-parts {earlier}: built with backbone {record['backbone'].get('id')}, this build "
                            f"runs {backbone.id}")
        if class_names is not None and tuple(record["class_names"]) != class_names:
            raise BankError(f"--add-parts {earlier}: classes {record['class_names']} differ from {list(class_names)}")
        class_names = tuple(record["class_names"])
        groups.append(parts)
    return class_names, groups


# ------------------------------------------------------------------------------------------------ evaluation


def eval_dataset(data, split: str, class_names: Sequence[str]):
    """The VOCDataset of `split` of `data`, refused (InputError) unless its classes are `class_names` (the bank's)
    and every image has its ground truth."""
    from .data import VOCDataset

    dataset = VOCDataset(data, split)
    if tuple(dataset.class_names) != tuple(class_names):
        raise InputError(f"the bank's classes {list(class_names)} differ from the dataset's "
                         f"{list(dataset.class_names)}")
    missing = [i for i in dataset.ids if not dataset.mask_path(i).is_file()]
    if missing:
        raise InputError(f"--data {data} --split {split}: no ground truth for {len(missing)} of {len(dataset)} "
                         f"images ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}; expected "
                         "SegmentationClass/ID.png)")
    return dataset


# ------------------------------------------------------------------------------------------------ segmentation


def segment_files(inputs: Sequence, out, engine, run: dict, resume: bool = True, with_overlay: bool = True,
                  batch_size: int = 4, progress: bool = True) -> dict:
    """Segment `inputs` (engine.outputs.Input, from find_inputs) into `out` in this process, as `moduseg segment`
    does: `engine` an Engine (or a RemoteEngine: a server's segmentation model) segments the inputs still to do as a
    stream of `batch_size` images, and each one's outputs are written as it arrives. Resume, failures and the summary
    are engine.segment_runs.segment_to_folder's (engine.distributed.segment_ray: the same on Ray)."""
    def here(todo: list) -> dict:
        return segment_items(engine, todo, Path(out), with_overlay, batch_size, progress)

    return segment_to_folder(inputs, out, run, here, resume, with_overlay)
