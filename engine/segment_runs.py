"""A run of segmentation over files into a folder, whoever segments (this process or Ray's actors): which inputs are
still to do (resume), each one's outputs written or its failure recorded, and the run's summary."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence


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


def segment_items(engine, todo: list, out: Path, with_overlay: bool, batch_size: int, progress: bool) -> dict:
    """Segment `todo` ((Input, provenance) pairs) with `engine` and write each one's outputs; any exception while
    reading, segmenting or writing an item is that item's failure. Returns {image path: reason, "" when written}.
    What segment_files runs, and each Ray actor on its batch."""
    from tqdm.auto import tqdm

    from .outputs import write_outputs
    from .batches import Skipped

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
    from .batches import Skipped

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
