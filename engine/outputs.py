"""Per-image outputs of `moduseg segment` (in-process, through a server, or on Ray: one writer for all): which inputs
a command line names, where each one's outputs go, whether an earlier run's outputs still hold, and writing them.

Naming. Each input has a key: its path relative to the argument it was found under, suffix kept — below a folder
argument, below a glob's leading folder (the components before the first wildcard), a file argument's own name, a
manifest entry's path relative to the manifest's folder (an entry outside that folder: its absolute path without the
leading /). Under OUT it writes KEY.png (label map), KEY.overlay.png and KEY.json (the record), so `a/x.jpg` gives
`OUT/a/x.jpg.png` and `x.jpg` beside `x.png` cannot share outputs. A key depends on nothing but the input's own path
and its argument, so adding a file never moves another's outputs, and a symlink is named by its own name. Beside
them, once per run: OUT/classes.json (each class id's name and colour in the label maps) and OUT/failures.jsonl.

Refused before any work (OutputConflict, the CLI's usage error): an OUT equal to or inside a folder searched for
inputs, an input folder or named input inside OUT, two inputs whose outputs would share a file (or take a run file's
name). So an output never replaces an input and
a rerun never reads its own outputs; a file reached through a symlink or a recursive glob that lies inside OUT is
skipped. A write that would leave OUT through a symlinked folder inside it fails that item.

Each file is written to a hidden temporary name and renamed into place, the JSON record last, so a record means
"done". The record's provenance — the bank's id (or the server), the config fields that change results and the
input's size and mtime, how its pictures were drawn (palette, overlay opacity) — is what a resumed run compares: an
item whose record no longer matches is redone (stale). Failures go to OUT/failures.jsonl.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .errors import InputError
from .palettes import PALETTES, palette_for
from .utils import compress_rle

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
FAILURES_FILE = "failures.jsonl"
#: the run's class list beside the label maps: class id -> name and colour
CLASSES_FILE = "classes.json"
#: what each input's outputs add to its key: label map, overlay, record (OutputFiles' order)
OUTPUT_SUFFIXES = (".png", ".overlay.png", ".json")
#: how overlays are drawn unless asked otherwise: the class names' own palette, colours at half opacity
DEFAULT_RENDERING = {"palette": "auto", "opacity": 0.5}
#: Config fields that never change a result (how work is batched and threaded; a size limit refuses, it does not
#: change), left out of a record's provenance so that changing them does not redo finished images
RESULT_NEUTRAL = ("batch_size", "num_threads", "max_image_pixels")
#: the provenance parts a resumed run compares, in the order a stale record's reason names the first that differs
PROVENANCE_PARTS = ("bank", "server", "config", "output_mode", "rendering", "input")
#: how a JSON record gives each segment's mask (Result.segments' output modes that are JSON)
RECORD_MASK_MODES = ("uncompressed_rle", "coco_rle")


class OutputConflict(InputError):
    """The inputs and the output folder of a run contradict each other (outputs would replace inputs, or be read as
    inputs by a rerun, or two inputs would share outputs): a usage error, nothing is written."""


@dataclass(frozen=True)
class Input:
    """An image to segment: `path` as found (absolute, symlinks not resolved) and `key`, the relative path that
    names its outputs under OUT."""

    path: Path
    key: Path


@dataclass(frozen=True)
class OutputFiles:
    label_map: Path
    overlay: Path
    record: Path


# --------------------------------------------------------------------------------------------------- inputs


def find_inputs(specs, manifest=None, out=None) -> list[Input]:
    """The images named by files, folders (searched recursively for IMAGE_SUFFIXES; symlinked folders are not
    entered) and glob patterns, in order, then those a manifest file lists; each path once, keyed by the first
    argument that found it. A spec matching nothing is an InputError; a manifest's paths are not checked here (a
    missing or unreadable one is recorded as a failure when it is segmented). With `out`, the conflicts the module
    docstring lists are an OutputConflict."""
    out_real = os.path.realpath(out) if out is not None else None
    found: dict[str, Input] = {}

    def add(path: str, key: str, scanned: bool) -> None:
        path = os.path.abspath(path)
        if out_real is not None and _within(os.path.realpath(path), out_real):
            if scanned:  # an earlier run's output met through a symlink or a recursive glob: never an input
                return
            raise OutputConflict(f"input {path} lies inside --out {out}: outputs could replace it; give an --out "
                                 "outside the inputs")
        key = Path(key)
        if key.is_absolute() or ".." in key.parts or not key.parts or key.name in ("", "."):
            raise OutputConflict(f"input {path}: cannot name its outputs inside --out from {key}")
        found.setdefault(path, Input(Path(path), key))

    for spec in specs:
        path = Path(spec)
        if path.is_dir():
            _check_apart(spec, spec, out, out_real)
            for file, key in _walk(spec):
                add(file, key, scanned=True)
        elif path.is_file() or path.is_symlink():  # a dangling or looping link is recorded when segmented
            add(spec, path.name, scanned=False)
        elif glob.has_magic(spec):
            root = _glob_root(spec)
            _check_apart(root, spec, out, out_real)
            for match in sorted(glob.glob(spec, recursive=True)):
                if os.path.isfile(match) or (os.path.islink(match) and not os.path.isdir(match)):
                    add(match, os.path.relpath(match, root), scanned=True)
        else:
            raise InputError(f"{spec}: no such image file, folder or glob match")
    if manifest is not None:
        folder = os.path.abspath(Path(manifest).parent)
        for entry in read_manifest(manifest):
            path = os.path.abspath(os.path.join(folder, entry))
            inside = _within(path, folder) and path != folder
            add(path, os.path.relpath(path, folder) if inside else os.path.splitdrive(path)[1].lstrip(os.sep),
                scanned=False)
    if not found:
        raise InputError(f"no image files in {list(specs)}" + (f" or {manifest}" if manifest is not None else ""))
    _check_output_names(found.values(), out)
    return list(found.values())


def _check_output_names(inputs, out) -> None:
    """OutputConflict if two inputs would write one file (one key; or keys like x and x.overlay, whose label map and
    overlay share a name) or an input's outputs would take a run file's name (a top-level input named classes)."""
    owners: dict[Path, Input | None] = {Path(CLASSES_FILE): None, Path(FAILURES_FILE): None}
    for item in inputs:
        files = output_files(item.key, "")
        for name in (files.label_map, files.overlay, files.record):
            first = owners.setdefault(name, item)
            if first is None:
                raise OutputConflict(f"{item.path} would write {Path(out or 'OUT') / name}, the run's own "
                                     f"{name} file: rename it, or give the folder holding it")
            if first is not item:
                raise OutputConflict(f"{first.path} and {item.path} would both write "
                                     f"{Path(out or 'OUT') / name}: give the folder holding both (outputs keep the "
                                     "path below it), or segment them into separate --out folders")


def read_manifest(path) -> list[str]:
    """The image paths a manifest file lists, one a line (blank lines and lines starting with # skipped); a relative
    path is relative to the manifest's folder. Bytes that are not UTF-8 are kept as the file system's own (a name in
    any encoding can be listed). An unreadable or empty manifest is an InputError."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8", errors="surrogateescape").splitlines()
    except OSError as error:
        raise InputError(f"--manifest {path}: cannot read it: {error}") from error
    entries = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    if not entries:
        raise InputError(f"--manifest {path} lists no image paths (one a line)")
    return entries


def _walk(folder: str):
    """(path, key) of the image files below `folder`, folders and names sorted; os.walk does not enter symlinked
    folders (no cycles, nothing from outside the folder), while a symlinked file is an input of its own name."""
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(root, name)
            if os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES and (os.path.isfile(full) or os.path.islink(full)):
                yield full, os.path.relpath(full, folder)


def _glob_root(spec: str) -> str:
    """The leading folder of a glob pattern: its components before the first one with a wildcard."""
    parts = Path(spec).parts
    fixed = parts[:next(i for i, part in enumerate(parts) if glob.has_magic(part))]
    return str(Path(*fixed)) if fixed else "."


def _check_apart(folder: str, spec: str, out, out_real: str | None) -> None:
    """OutputConflict if OUT is `folder` (searched for inputs by argument `spec`) or inside it, or it inside OUT."""
    if out_real is None:
        return
    real = os.path.realpath(folder)
    searched = f"the input folder {folder}" + (f" (searched by {spec})" if spec != folder else "")
    if _within(out_real, real):
        raise OutputConflict(f"--out {out} {'is' if out_real == real else 'lies inside'} {searched}: a rerun would "
                             "segment its outputs and outputs could replace inputs; give an --out outside it")
    if _within(real, out_real):
        raise OutputConflict(f"{searched} lies inside --out {out}: outputs could replace inputs; give an --out "
                             "outside it")


def _within(path: str, folder: str) -> bool:
    """Whether absolute `path` is `folder` or below it."""
    return os.path.commonpath([path, folder]) == folder


# -------------------------------------------------------------------------------------------------- provenance


def bank_id(bank_dir) -> str:
    """A bank's identity: the sha256 of its manifest.json, which holds every bank file's sha256 and the bank's
    config, so a rebuilt, appended or edited bank gets another id and a copy of it the same one."""
    manifest = Path(bank_dir) / "manifest.json"
    try:
        return "sha256:" + hashlib.sha256(manifest.read_bytes()).hexdigest()
    except OSError as error:
        raise InputError(f"bank {bank_dir}: cannot read its manifest.json: {error}") from error


def run_provenance(bank: str | None = None, config=None, server: dict | None = None,
                   output_mode: str = "uncompressed_rle", palette: str = DEFAULT_RENDERING["palette"],
                   opacity: float = DEFAULT_RENDERING["opacity"]) -> dict:
    """The provenance every record of a run shares: the bank's id (`bank_id`) or the server that segmented
    ({"url", "model"}; its bank is not known to the client), the config fields that change results, how the
    records give masks (`output_mode`: "uncompressed_rle" or "coco_rle") and how the label map and overlay are drawn
    ("rendering": `palette`, one of engine.palettes.PALETTES, and the overlay's `opacity`, 0..1): write_outputs draws
    them as it says."""
    if output_mode not in RECORD_MASK_MODES:
        raise InputError(f"output_mode must be one of {RECORD_MASK_MODES} for JSON records, got {output_mode!r}")
    if palette not in PALETTES:
        raise InputError(f"palette {palette!r}: expected one of {', '.join(PALETTES)}")
    if not 0 <= opacity <= 1:
        raise InputError(f"overlay opacity {opacity!r}: expected a number from 0 (the image) to 1 (the colours)")
    inference = None if config is None else {k: v for k, v in config.to_dict().items() if k not in RESULT_NEUTRAL}
    return {"bank": bank, "server": server, "config": inference, "output_mode": output_mode,
            "rendering": {"palette": palette, "opacity": float(opacity)}}


def input_state(path) -> dict:
    """What says an input file changed: its size and modification time in ns (of the file a symlink points to)."""
    stat = os.stat(path)
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


@dataclass
class Plan:
    """What a run has to do: `todo` (each input with the provenance its record will carry), how many are `done`
    already, why the redone ones' records were stale (reason -> count), and `failures` (image path -> reason) of
    inputs that cannot even be looked at."""

    todo: list = field(default_factory=list)
    done: int = 0
    stale: Counter = field(default_factory=Counter)
    failures: dict = field(default_factory=dict)


def plan_run(inputs, out, run: dict, resume: bool = True, with_overlay: bool = True) -> Plan:
    """Sort `inputs` into done (with `resume`, a record whose provenance equals this run's: same bank or server,
    config, input size and mtime, same input path, and its label map and overlay there), todo (no record, or a
    stale one) and failures (an input that cannot be stat'ed: missing, a dangling link, a symlink loop)."""
    plan = Plan()
    for item in inputs:
        try:
            provenance = {**run, "input": input_state(item.path)}
        except OSError as error:
            plan.failures[str(item.path)] = f"cannot read image {item.path}: {error}"
            continue
        if resume:
            why = stale_reason(item, out, provenance, with_overlay)
            if why is None:
                plan.done += 1
                continue
            if why != "no record":
                plan.stale[why] += 1
        plan.todo.append((item, provenance))
    return plan


def stale_reason(item: Input, out, provenance: dict, with_overlay: bool = True) -> str | None:
    """None when `item`'s outputs under `out` are complete and were made from the same bank, config and input as
    `provenance` says; else why not ("no record", "bank changed", "input changed", ...)."""
    files = output_files(item.key, out)
    if not files.record.is_file():
        return "no record"
    try:
        record = json.loads(files.record.read_text())
    except (OSError, ValueError):
        return "unreadable record"
    earlier = record.get("provenance") if isinstance(record, dict) else None
    if not isinstance(earlier, dict):
        return "no provenance (an older run)"
    for part in PROVENANCE_PARTS:
        if earlier.get(part) != provenance.get(part):
            return f"{part} changed"
    if record.get("image") != str(item.path):
        return "input changed"
    if not files.label_map.is_file() or (with_overlay and not files.overlay.is_file()):
        return "outputs missing"
    return None


# ------------------------------------------------------------------------------------------------------ writing


def output_files(key, out) -> OutputFiles:
    """OUT/KEY.png, OUT/KEY.overlay.png and OUT/KEY.json (the key keeps the input's suffix: x.jpg -> x.jpg.png)."""
    stem = Path(out) / key
    return OutputFiles(*(stem.with_name(stem.name + suffix) for suffix in OUTPUT_SUFFIXES))


def write_outputs(item: Input, result, out, provenance: dict, with_overlay: bool = True) -> Path:
    """Write one image's outputs atomically (label map PNG, overlay PNG if asked, JSON record last, with
    `provenance`), drawn as its "rendering" says (DEFAULT_RENDERING without one); returns the record's path. Any
    error is the caller's to record for this item."""
    from .data import load_image, save_label_map
    from .report import overlay

    files = output_files(item.key, out)
    files.record.parent.mkdir(parents=True, exist_ok=True)
    if not _within(os.path.realpath(files.record.parent), os.path.realpath(out)):
        raise InputError(f"{files.record.parent} leads outside --out {out} (a symlink): not written there")
    rendering = {**DEFAULT_RENDERING, **(provenance.get("rendering") or {})}
    palette = palette_for(result.class_names, rendering["palette"])
    # an earlier record must not vouch for files half replaced: without it the item counts as not done
    files.record.unlink(missing_ok=True)
    _write_atomic(files.label_map, lambda tmp: save_label_map(result.label_map, tmp, palette))
    if with_overlay:
        _write_atomic(files.overlay, lambda tmp: overlay(load_image(item.path), result, tmp, rendering["opacity"],
                                                         palette))
    record = {"image": str(item.path), **result.to_dict(), "provenance": provenance}
    if provenance.get("output_mode") == "coco_rle":  # in-process and served results both give uncompressed RLE
        for segment in record["segments"]:
            segment["segmentation"] = compress_rle(segment["segmentation"])
    _write_atomic(files.record, lambda tmp: tmp.write_text(json.dumps(record)))
    return files.record


def write_classes(out, class_names, palette: str = DEFAULT_RENDERING["palette"]) -> Path:
    """OUT/classes.json, written atomically (left alone when it already says the same): the palette's name and, for
    each class id, its name and colour as the run's label maps and overlays show it ({"palette": "voc", "classes": [{"id": 0, "name": "background",
    "color": [0, 0, 0]}, ...]})."""
    chosen = palette_for(class_names, palette)
    listing = {"palette": chosen.name,
               "classes": [{"id": i, "name": name, "color": list(chosen.colour(i))} for i, name in
                           enumerate(class_names)]}
    target, text = Path(out) / CLASSES_FILE, json.dumps(listing, indent=1)
    try:
        if target.read_text() == text:  # a rerun with the same classes leaves it as it was
            return target
    except (OSError, UnicodeDecodeError):
        pass
    _write_atomic(target, lambda tmp: tmp.write_text(text))
    return target


def write_failures(out: Path, failures: list[dict]) -> Path:
    """OUT/failures.jsonl (one {"image", "reason"} object a line) written atomically; removed when there are none."""
    target = Path(out) / FAILURES_FILE
    if not failures:
        target.unlink(missing_ok=True)
        return target
    _write_atomic(target, lambda tmp: tmp.write_text("".join(json.dumps(f) + "\n" for f in failures)))
    return target


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
