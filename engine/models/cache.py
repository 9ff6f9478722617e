"""The on-disk model cache and ONNX verification shared by every exported model.

Exported files live in a cache directory (`MODUSEG_CACHE`, default ~/.cache/moduseg). Each file is written to a
temporary name and renamed into place under a file lock, with a JSON sidecar holding its SHA-256 and the export
version: a concurrent first use waits instead of reading half a file, and a missing, truncated, corrupt or outdated
file is rebuilt.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..errors import ModelError
from ..registry import EXPORT_VERSION
from ..utils import file_sha256

CACHE_ENV = "MODUSEG_CACHE"


def cache_dir(path: str | os.PathLike | None = None) -> Path:
    """The model cache directory: `path`, else $MODUSEG_CACHE, else ~/.cache/moduseg (created if missing)."""
    chosen = Path(path if path is not None else os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "moduseg")
    chosen = chosen.expanduser()
    try:
        chosen.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ModelError(f"cannot create the model cache directory {chosen}: {error}") from error
    return chosen


@contextlib.contextmanager
def _file_lock(path: Path):
    """An exclusive advisory lock on `path` (POSIX flock); a no-op where fcntl is missing (rename stays atomic)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _is_intact(path: Path, meta_path: Path) -> bool:
    if not path.is_file() or not meta_path.is_file():
        return False
    try:
        meta = json.loads(meta_path.read_text())
        return (meta.get("export_version") == EXPORT_VERSION and meta.get("size") == path.stat().st_size
                and meta.get("sha256") == file_sha256(path))
    except (OSError, ValueError):
        return False


def cached_file(path: str | os.PathLike, build: Callable[[Path], dict]) -> Path:
    """Return `path` once it holds an intact export, building it first if it is missing or corrupt.

    build(tmp_path) writes the file to tmp_path (same directory) and returns metadata for the sidecar (e.g. the
    verification's max abs diff). The file and its sidecar `<path>.json` are renamed into place under `<path>.lock`.
    """
    path = Path(path)
    meta_path = path.with_name(path.name + ".json")
    path.parent.mkdir(parents=True, exist_ok=True)
    if _is_intact(path, meta_path):
        return path
    with _file_lock(path.with_name(path.name + ".lock")):
        if _is_intact(path, meta_path):  # another process finished it while we waited
            return path
        fd, tmp_name = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            info = build(tmp) or {}
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; the cache may be shared
            meta = {"export_version": EXPORT_VERSION, "file": path.name, "size": tmp.stat().st_size,
                    "sha256": file_sha256(tmp), **info}
            meta_tmp = tmp.with_suffix(".json.tmp")
            meta_tmp.write_text(json.dumps(meta, indent=2, sort_keys=True))
            os.replace(tmp, path)
            os.replace(meta_tmp, meta_path)
        finally:
            for leftover in (tmp, tmp.with_suffix(".json.tmp")):
                leftover.unlink(missing_ok=True)
    return path


def verify_onnx(onnx_path: str | os.PathLike | bytes, module, input_name: str, samples: Sequence[np.ndarray],
                tolerance: float) -> float:
    """Max |onnxruntime - torch| of the model's first output over `samples`; raises ModelError when it exceeds
    tolerance * max(1, max |torch output|) for a sample (float32 rounding grows with the output's magnitude)."""
    import onnxruntime as ort
    import torch

    source = onnx_path if isinstance(onnx_path, bytes) else os.fspath(onnx_path)
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    worst = 0.0
    for sample in samples:
        with torch.inference_mode():
            expected = module(torch.from_numpy(sample)).numpy()
        got = session.run(None, {input_name: sample})[0]
        if got.shape != expected.shape:
            raise ModelError(f"ONNX export gives shape {got.shape} for input {sample.shape}, torch {expected.shape}")
        diff = float(np.abs(got - expected).max())
        bound = tolerance * max(1.0, float(np.abs(expected).max()))
        if not diff <= bound:
            raise ModelError(f"ONNX export differs from torch by {diff:.3g} on input {sample.shape} (bound {bound:.3g} "
                             f"= {tolerance:g} x the output's magnitude)")
        worst = max(worst, diff)
    return worst
