"""The library face under every tool: build a bank, evaluate a split, segment files to a folder.

    bank = build_bank("runs/bank", data=root, masks="pseudo").bank          # in this process, or ray=True
    miou = evaluate(Engine(bank), eval_dataset(root, "val", bank.class_names), bank.class_names).summary()["miou"]
    summary = segment_files(find_inputs(["photos/"]), "runs/out", Engine(bank), run_provenance(...))

`moduseg build-bank`, `eval` and `segment` parse their flags and call these; `moduseg report`, bench/defaults.py and
the Ray paths (engine.distributed) call them too, so each loop exists once.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

from .config import Config
from .errors import BankError, InputError
from .registry import DEFAULT_BACKBONE


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


def evaluate(engine, samples, class_names: Sequence[str], proposals="auto", batch_size: int = 1,
             on_result: Callable | None = None, confusion=None, progress: bool = False, desc: str = "eval"):
    """The confusion matrix of `engine` over `samples` (with `.image` and `.mask`; a list or a VOCDataset, read in
    order) against their masks: the one loop over a data set that `moduseg eval`, `moduseg report` and
    bench/defaults.py run.

    proposals: "auto" (the engine's proposer), "gt" (each mask's connected components: the oracle proposals) or a
    sequence holding each sample's Proposals (computed once for many rows). batch_size: images per segment_batch
    call. on_result(sample, label_map) is called for each, in order. confusion: a ConfusionMatrix to add to (the
    held-out folds of bench/defaults.py), else a new one."""
    from tqdm.auto import tqdm

    from .eval import ConfusionMatrix
    from .models import ground_truth_proposals

    confusion = confusion if confusion is not None else ConfusionMatrix(class_names)
    given = None if isinstance(proposals, str) else iter(proposals)
    if isinstance(proposals, str) and proposals not in ("auto", "gt"):
        raise InputError(f"proposals must be 'auto', 'gt' or one Proposals per sample, got {proposals!r}")
    total = len(samples) if hasattr(samples, "__len__") else None
    with tqdm(total=total, desc=desc, unit="img", disable=not progress) as bar:
        for batch in _batches(samples, batch_size):
            if proposals == "gt":
                batch_proposals = [ground_truth_proposals(s.mask) for s in batch]
            else:
                batch_proposals = None if given is None else [next(given) for _ in batch]
            for sample, result in zip(batch, engine.segment_batch([s.image for s in batch], batch_proposals)):
                confusion.update(result.label_map, sample.mask)
                if on_result is not None:
                    on_result(sample, result.label_map)
            bar.update(len(batch))
    return confusion


def _batches(items, size: int):
    """Lists of `size` items (the last one shorter) from any iterable, read as they are needed."""
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


# ------------------------------------------------------------------------------------------------ segmentation


def segment_to_folder(inputs: Sequence, out, run: dict, segment_todo: Callable, resume: bool = True,
                      with_overlay: bool = True) -> dict:
    """Segment `inputs` (engine.outputs.Input, from find_inputs) into `out`, as `moduseg segment` does, whoever
    segments: with `resume`, an input whose record still holds (same bank or server, result-changing config and
    input file: engine.outputs.plan_run over the `run` provenance) is skipped and a stale one redone; then
    `segment_todo(todo)` segments the rest and writes their outputs, returning {image path: "" when written, else
    why it failed} (a loop here, `segment_files`; Ray actors, engine.distributed.segment_ray).

    Returns {"images", "done_before", "stale" (reason -> count of those redone), "written", "failures": [{"image",
    "reason"}, ...] in input order}; a failure of one input is recorded there, never raised."""
    from .outputs import plan_run

    plan = plan_run(inputs, out, run, resume, with_overlay)
    reasons: dict[str, str] = dict(plan.failures)  # image path -> why it failed; "" when written
    if plan.todo:
        reasons.update(segment_todo(plan.todo))
    return {"images": len(inputs), "done_before": plan.done, "stale": plan.stale,
            "written": sum(1 for item, _ in plan.todo if reasons.get(str(item.path)) == ""),
            "failures": [{"image": str(item.path), "reason": reasons[str(item.path)]} for item in inputs
                         if reasons.get(str(item.path))]}


def segment_files(inputs: Sequence, out, engine, run: dict, resume: bool = True, with_overlay: bool = True,
                  batch_size: int = 4, progress: bool = True) -> dict:
    """`segment_to_folder` in this process: `engine` an Engine (or a RemoteEngine: a server's segmentation model)
    segments the inputs as a stream of `batch_size` images, and each one's outputs are written as it arrives."""
    def here(todo: list) -> dict:
        return segment_items(engine, todo, Path(out), with_overlay, batch_size, progress)

    return segment_to_folder(inputs, out, run, here, resume, with_overlay)


def segment_items(engine, todo: list, out: Path, with_overlay: bool, batch_size: int, progress: bool) -> dict:
    """Segment `todo` ((Input, provenance) pairs) with `engine` and write each one's outputs; any exception while
    reading, segmenting or writing an item is that item's failure. Returns {image path: reason, "" when written}.
    What segment_files runs, and each Ray actor on its batch."""
    from tqdm.auto import tqdm

    from .outputs import write_outputs
    from .pipeline import Skipped

    reasons = {}
    with tqdm(total=len(todo), desc="segment", unit="img", disable=not progress) as bar:
        def finish(item, provenance, result) -> None:
            bar.update(1)
            if isinstance(result, Skipped):
                reasons[str(item.path)] = result.reason
                return
            try:
                write_outputs(item, result, out, provenance, with_overlay)
                reasons[str(item.path)] = ""
            except Exception as error:  # noqa: BLE001 - disk full, read-only folder, ...: this item's failure
                reasons[str(item.path)] = f"cannot write its outputs: {type(error).__name__}: {error}"

        _each_result(engine, todo, batch_size, finish)
    return reasons


def _each_result(engine, todo: list, batch_size: int, finish) -> None:
    """finish(item, provenance, result or Skipped) for each (item, provenance) of `todo`, in order, segmented as a
    stream. The stream's stages hand an exception on in order, so when one escapes, the results before the batch
    that raised have all arrived: that batch is redone one image at a time (the image that raises becomes a Skipped
    with the error), and the stream starts again after it."""
    from .pipeline import Skipped

    position = 0
    while position < len(todo):
        try:
            for result in engine.segment_stream([item.path for item, _ in todo[position:]], batch_size=batch_size,
                                                on_error="skip"):
                finish(*todo[position], result)
                position += 1
        except Exception:  # noqa: BLE001 - found and recorded below, image by image
            for item, provenance in todo[position:position + batch_size]:
                try:
                    result = engine.segment_batch([item.path], on_error="skip")[0]
                except Exception as error:  # noqa: BLE001 - this image's failure
                    result = Skipped(0, str(item.path), f"{type(error).__name__}: {error}")
                finish(item, provenance, result)
            position += batch_size
