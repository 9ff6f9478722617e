"""Per-image outputs of `moduseg segment` (in-process, through a server, or on Ray: one writer for all).

Under OUT, the image's path relative to the inputs' base folder without its suffix, then .png (label map),
_overlay.jpg and .json (record). Each file is written to a temporary name and renamed into place, the JSON record
last, so a record means "done"; failures go to OUT/failures.jsonl.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

def output_stem(path: Path, base: Path, out: Path) -> Path:
    """OUT/relative/path/name of an image's outputs, without suffix (a/x.jpg and b/x.jpg do not collide)."""
    relative = Path(path).relative_to(base)
    return out / relative.parent / relative.stem


def outputs_done(path: Path, base: Path, out: Path) -> bool:
    """Whether an image's outputs are complete: its JSON record, written last, exists."""
    stem = output_stem(path, base, out)
    return (stem.parent / f"{stem.name}.json").is_file()


def write_outputs(path: Path, result, base: Path, out: Path, with_overlay: bool = True) -> Path:
    """Write one image's outputs atomically (label map PNG, overlay JPEG if asked, JSON record last); returns the
    record's path."""
    from .data import load_image, save_label_map
    from .report import overlay

    stem = output_stem(path, base, out)
    stem.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(stem.parent / f"{stem.name}.png", lambda tmp: save_label_map(result.label_map, tmp))
    if with_overlay:
        _write_atomic(stem.parent / f"{stem.name}_overlay.jpg", lambda tmp: overlay(load_image(path), result, tmp))
    record = stem.parent / f"{stem.name}.json"
    _write_atomic(record, lambda tmp: tmp.write_text(json.dumps({"image": str(path), **result.to_dict()})))
    return record


def write_failures(out: Path, failures: list[dict]) -> Path:
    """OUT/failures.jsonl (one {"image", "reason"} object a line) written atomically; removed when there are none."""
    target = out / FAILURES_FILE
    if not failures:
        target.unlink(missing_ok=True)
        return target
    _write_atomic(target, lambda tmp: tmp.write_text("".join(json.dumps(f) + "\n" for f in failures)))
    return target


FAILURES_FILE = "failures.jsonl"


def _write_atomic(target: Path, write) -> None:
    """write(tmp) to a hidden temporary sibling with the same suffix (image writers pick the format from it), then
    rename it over `target`."""
    tmp = target.with_name(f".{target.stem}.{os.getpid()}.tmp{target.suffix}")
    try:
        write(tmp)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
