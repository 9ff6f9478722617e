"""A bank's directory on disk: what it holds, how it is written (staged, then swapped in whole), and the checksums
and seal that let a load refuse a truncated, corrupt or hand-edited bank.

The manifest (manifest.json) names the format and version, describes the bank (class names, backbone, config,
provenance) and records each file's size and sha256; it is sealed (SEAL: the sha256 of its own content), so class
names, config or checksums changed by hand are refused like a damaged file. Each file's size and the sha256 of its
first and last HASH_BLOCK bytes are checked at every load (`verify="quick"`), the full sha256 on request
(`verify="full"`, `moduseg verify-bank`), so loading a large bank does not read it whole. Bank parts
(engine.bank.parts) are sealed and staged the same way.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np

from ..errors import BankError, InputError
from ..ivf import row_blocks
from ..utils import file_sha256
from .index_storage import INDEX_STORAGE

FORMAT = "moduseg-feature-bank"
FORMAT_VERSION = 4  # 3: vectors stored once (no flat index.faiss), per-storage index files, quick/full checksums;
# 4: the manifest sealed (SEAL)
#: why a bank of an older format version is refused, where a reason helps
OLD_FORMATS = {3: "its manifest is not sealed: its class names and config were never checked"}
#: the key of a manifest (and of a parts directory's parts.json and part.json) holding the sha256 of the rest of it
SEAL = "seal_sha256"
#: what a bank directory may hold: anything else there means it is not (only) a bank, and it is never deleted
BANK_FILES = {"manifest.json", "vectors.npy", "labels.npy", "kinds.npy", "sources.json", "center.npy", "hubness.npy",
              *(name for names in INDEX_STORAGE.values() for name in names)}
#: FeatureBank.load's checks: sizes and head/tail hashes ("quick"), or every byte ("full")
VERIFY = ("quick", "full")
#: bytes hashed at each end of a file by the quick check; a file of at most twice this is hashed whole
HASH_BLOCK = 1 << 20


# ---------------------------------------------------------------------------------------------- writing, atomically


@contextmanager
def staged(path: Path) -> Iterator[Path]:
    """A temporary sibling directory of `path` to write a directory's files into; when the block ends it is renamed
    to `path` (`swap_in`: an existing `path` is replaced only then), and if the block raises it is deleted. So a
    half-written directory never appears at `path`. The caller decides beforehand whether `path` may be replaced."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield staging
        swap_in(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def swap_in(staging: Path, path: Path) -> None:
    """Rename the finished directory `staging` to `path`. An existing `path` is renamed aside first and deleted only
    once the new one is in place (put back if that rename fails), so a crash at any point leaves a whole directory at
    `path` or beside it, never half of one."""
    old = None
    if path.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
        os.replace(path, old / path.name)
    try:
        os.replace(staging, path)
    except BaseException:
        if old is not None and not path.exists():
            os.replace(old / path.name, path)  # the old directory back in place
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def check_replaceable(path: Path) -> None:
    """BankError unless `path` is a bank directory (its manifest says so) holding only a bank's files."""
    if not path.is_dir():
        raise BankError(f"{path} exists and is not a bank directory: refusing to replace it")
    try:
        format_ = json.loads((path / "manifest.json").read_text()).get("format")
    except (OSError, ValueError, AttributeError):
        format_ = None
    others = sorted(p.name for p in path.iterdir() if p.name not in BANK_FILES)
    if format_ != FORMAT or others:
        what = f"holds {others[:5]}" if others else "has no bank manifest"
        raise BankError(f"{path} is not a feature bank ({what}): refusing to replace it; choose another --out")


def bank_files(storage: str, centered: bool = False, hubness: bool = False) -> tuple[str, ...]:
    """The files listed in the manifest of a bank with this index storage (a key of INDEX_STORAGE), center.npy with
    them when its vectors are centred (FeatureBank.center), hubness.npy when it has hubness (FeatureBank.hubness)."""
    return ("vectors.npy", "labels.npy", "kinds.npy", "sources.json", *(["center.npy"] if centered else []),
            *(["hubness.npy"] if hubness else []), *INDEX_STORAGE[storage])


def write_vectors(file: Path, vectors: np.ndarray) -> None:
    """vectors.npy written a block of rows at a time (a memory-mapped bank is never read whole), each block checked
    for NaN and inf first."""
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False,
              "shape": tuple(int(n) for n in vectors.shape)}
    with open(file, "wb") as handle:
        np.lib.format.write_array_header_2_0(handle, header)
        for start, block in row_blocks(vectors):
            if not np.isfinite(block).all():
                raise BankError(f"bank vectors contain NaN or inf (rows {start}..{start + len(block) - 1})")
            handle.write(block.tobytes())


def write_manifest(staging: Path, manifest: dict) -> None:
    """The bank's manifest.json, written last: `manifest` with each file's checksum record and the SEAL."""
    names = bank_files(manifest["index_storage"], manifest["centered"], manifest["hubness"])
    files = {name: file_record(staging / name) for name in names}
    (staging / "manifest.json").write_text(json.dumps(sealed({**manifest, "files": files}), indent=2))


# ---------------------------------------------------------------------------------------------------- reading


def read_manifest(path: Path, verify: str = "quick") -> dict:
    """The manifest of bank directory `path`, once its format, version and seal are checked, it lists exactly the
    bank's files, and each file matches its record (`verify_file`); BankError naming the first problem."""
    if verify not in VERIFY:
        raise InputError(f"verify must be one of {VERIFY}, got {verify!r}")
    manifest_file = path / "manifest.json"
    if not manifest_file.is_file():
        raise BankError(f"{path} is not a feature bank (no manifest.json)")
    try:
        manifest = json.loads(manifest_file.read_text())
    except (ValueError, RecursionError) as error:  # JSONDecodeError, UnicodeDecodeError, nesting too deep
        raise BankError(f"{manifest_file} is corrupt: {error}") from error
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BankError(f"{path}: not a {FORMAT} directory")
    if manifest.get("version") != FORMAT_VERSION:
        reason = OLD_FORMATS.get(manifest.get("version"))
        raise BankError(f"{path}: bank format version {manifest.get('version')}, this engine reads "
                        f"version {FORMAT_VERSION}" + (f" ({reason})" if reason else "") + "; rebuild the bank")
    check_seal(manifest, manifest_file, "rebuild the bank")
    storage = manifest.get("index_storage")
    if storage not in INDEX_STORAGE:
        raise BankError(f"{path}: unknown index storage {storage!r}; known: {sorted(INDEX_STORAGE)}")
    expected_files = set(bank_files(storage, manifest.get("centered") is True, manifest.get("hubness") is True))
    files = manifest.get("files")
    if not isinstance(files, dict) or set(files) != expected_files:
        raise BankError(f"{path}: the manifest must list checksums of exactly {sorted(expected_files)}, it "
                        f"lists {sorted(files or {})}")
    for name, expected in files.items():
        verify_file(path, name, expected, verify)
    return manifest


# --------------------------------------------------------------------------------------------- checksums and seal


def _content_sha256(record: dict) -> str:
    """sha256 of a record's canonical JSON (sorted keys, no spaces, ASCII), its SEAL left out."""
    body = {key: value for key, value in record.items() if key != SEAL}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def sealed(record: dict) -> dict:
    """`record` with its SEAL: the files' checksums cover the data, the seal covers what names and describes it
    (class names, config, backbone, the checksums themselves)."""
    return {**record, SEAL: _content_sha256(record)}


def check_seal(record: dict, file: Path, remedy: str) -> None:
    """BankError unless `record` (read from `file`) holds its SEAL and the seal matches its content."""
    if SEAL not in record:
        raise BankError(f"{file} is not sealed (no {SEAL}); {remedy}")
    if record[SEAL] != _content_sha256(record):
        raise BankError(f"{file} was changed after it was written (its {SEAL} does not match its content: class "
                        f"names, config or checksums edited, or the file damaged); {remedy}")


def digest(file: Path) -> dict:
    """A file's size and full sha256."""
    return {"sha256": file_sha256(file), "bytes": file.stat().st_size}


def _ends(file: Path, block: int) -> dict:
    """sha256 of a file's first and last `block` bytes."""
    size = file.stat().st_size
    with open(file, "rb") as handle:
        head = hashlib.sha256(handle.read(block)).hexdigest()
        handle.seek(max(0, size - block))
        tail = hashlib.sha256(handle.read(block)).hexdigest()
    return {"head_sha256": head, "tail_sha256": tail}


def file_record(file: Path) -> dict:
    """A bank file's manifest record: size and full sha256, plus for a file longer than 2 HASH_BLOCK the sha256 of
    its first and last HASH_BLOCK bytes (the quick check), with the block size used."""
    record = digest(file)
    if record["bytes"] > 2 * HASH_BLOCK:
        record.update(block=HASH_BLOCK, **_ends(file, HASH_BLOCK))
    return record


def verify_file(path: Path, name: str, expected, verify: str) -> None:
    """BankError unless bank file `name` matches its manifest record (`file_record`): size and head/tail hashes
    ("quick"; a small file's full hash), or size and full hash ("full")."""
    file = path / name
    if not file.is_file():
        raise BankError(f"{path}: missing {name}")
    if not isinstance(expected, dict):
        raise BankError(f"{path}: the manifest's record of {name} is not a checksum record")
    size = file.stat().st_size
    if size != expected.get("bytes"):
        raise BankError(f"{path}: {name} is truncated or corrupt (expected {expected.get('bytes')} bytes, found "
                        f"{size})")
    block = expected.get("block")
    if verify == "quick" and isinstance(block, int) and block > 0 and size > 2 * block:
        actual, keys = _ends(file, block), ("head_sha256", "tail_sha256")
    else:
        actual, keys = digest(file), ("sha256",)
    for key in keys:
        if actual[key] != expected.get(key):
            where = {"head_sha256": f"in its first {block} bytes", "tail_sha256": f"in its last {block} bytes"}
            raise BankError(f"{path}: {name} is corrupt {where.get(key, '')}".rstrip() + f" (sha256 "
                            f"{str(expected.get(key))[:12]}…, found {actual[key][:12]}…)")
