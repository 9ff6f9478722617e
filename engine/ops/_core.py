"""The compiled extension (engine._C) and the checks every op's face shares: arguments validated and converted
before any pointer reaches C++."""

from __future__ import annotations

import math
import operator
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..arrays import Place, contiguous, dtype_of, shape_of
from ..errors import InputError

try:
    from .. import _C
except ImportError as _error:  # not built: every op says how to build it
    _C = None
    _IMPORT_ERROR: ImportError | None = _error
else:
    _IMPORT_ERROR = None

_INT32 = np.iinfo(np.int32)
POOLINGS = ("soft", "hard")
#: the vote's methods and their codes in csrc/vote/vote.h
VOTE_METHODS = {"count": 0, "balanced": 1, "weighted": 2, "softmax": 3}
#: feature groups (backbone layers) a vector may have (csrc/smfa/smfa.h: kMaxGroups)
MAX_GROUPS = 16


def _lib():
    if _C is None:
        installed = shadowed_install()
        if installed:
            raise ImportError(
                f"engine._C (the compiled kernels) is not in {Path(__file__).parents[1]}: that is a source tree "
                f"(Python was started in its checkout, whose folder comes first on sys.path) and shadows the "
                f"installed engine in {installed}. Run from another folder, or build in place: `pip install "
                "--no-build-isolation -Ceditable.mode=inplace -e .`")
        raise ImportError(
            "engine._C (the compiled kernels) is not built: run `pip install .` or, for development, "
            f"`pip install --no-build-isolation -Ceditable.mode=inplace -e .` ({_IMPORT_ERROR})"
        )
    return _C


def shadowed_install() -> str | None:
    """The folder of an installed engine with its compiled kernels when the `engine` imported is another copy (a
    checkout's source tree), else None."""
    try:
        installed = Path(distribution("moduseg-engine").locate_file("engine"))
    except (PackageNotFoundError, TypeError):
        return None
    here = Path(__file__).resolve().parents[1]
    if not installed.is_dir() or installed.resolve() == here or not any(installed.glob("_C*")):
        return None
    return str(installed)


# ----------------------------------------------------------------------------------------------------- validation


def _int(op: str, name: str, value: Any, minimum: int | None = None) -> int:
    if isinstance(value, (bool, np.bool_)):
        raise InputError(f"{op}: {name} must be an integer, got bool {value!r}")
    try:
        result = operator.index(value)
    except TypeError:
        raise InputError(f"{op}: {name} must be an integer, got {type(value).__name__} {value!r}") from None
    if minimum is not None and result < minimum:
        raise InputError(f"{op}: {name} must be >= {minimum}, got {result}")
    return result


def _real(op: str, name: str, value: Any) -> float:
    if isinstance(value, (bool, np.bool_)):
        raise InputError(f"{op}: {name} must be a real number, got bool {value!r}")
    try:
        result = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{op}: {name} must be a real number, got {type(value).__name__} {value!r}") from None
    if math.isnan(result):
        raise InputError(f"{op}: {name} must not be NaN")
    return result


def check_regions(op: str, atoms: Any, members: Any) -> tuple[np.ndarray, np.ndarray]:
    """atoms (H, W) integer ids in [0, A) and members (N, A) bool/0-1 -> contiguous int32 and uint8 arrays."""
    atoms = np.asarray(atoms)
    members = np.asarray(members)
    if atoms.ndim != 2 or atoms.dtype.kind not in "iu":
        raise InputError(f"{op}: atoms must be an (H, W) integer map, got {atoms.dtype} {atoms.shape}")
    if atoms.shape[0] < 1 or atoms.shape[1] < 1:
        raise InputError(f"{op}: atoms must have a nonzero height and width, got {atoms.shape}")
    if members.ndim != 2 or members.dtype.kind not in "biu":
        raise InputError(f"{op}: members must be an (N, A) bool matrix, got {members.dtype} {members.shape}")
    if atoms.min() < 0 or atoms.max() >= members.shape[1]:
        raise InputError(f"{op}: atom ids must lie in [0, {members.shape[1]}) (one column of members per atom), got "
                         f"{atoms.min()}..{atoms.max()}")
    atoms = np.ascontiguousarray(atoms, dtype=np.int32)
    # a bool matrix is one 0/1 byte per entry: view it as uint8 without a copy
    members = np.ascontiguousarray(members != 0 if members.dtype != np.bool_ else members).view(np.uint8)
    return atoms, members


def check_groups(op: str, groups: Any, dim: int) -> np.ndarray:
    """Feature-group widths: positive integers summing to the feature width `dim` (or none)."""
    widths = np.asarray([_int(op, "groups", g, minimum=1) for g in groups], np.int64)
    if len(widths) and widths.sum() != dim:
        raise InputError(f"{op}: feature groups {widths.tolist()} must sum to the feature width {dim}")
    return widths


def _grid(op: str, features_shape: tuple, height: int, width: int, stride: int) -> None:
    expected = (-(-height // stride), -(-width // stride))
    if tuple(int(s) for s in features_shape[:2]) != expected:
        raise InputError(
            f"{op}: features grid {tuple(features_shape[:2])} does not match an image of {height}x{width} at stride "
            f"{stride}: expected (ceil(H/stride), ceil(W/stride)) = {expected}"
        )


def _classes_scores(op: str, classes: Any, scores: Any, count: int) -> tuple[np.ndarray, np.ndarray]:
    classes = np.asarray(classes)
    scores = np.asarray(scores)
    if classes.shape != (count,):
        raise InputError(f"{op}: classes must be ({count},) to match members, got shape {classes.shape}")
    if not (np.issubdtype(classes.dtype, np.integer) or (classes.size == 0 and classes.dtype == np.float64)):
        raise InputError(f"{op}: classes must be integers, got dtype {classes.dtype}")
    if count and (classes.min() < _INT32.min or classes.max() > _INT32.max):
        raise InputError(f"{op}: classes must fit in int32 (the label map's type)")
    if scores.shape != (count,):
        raise InputError(f"{op}: scores must be ({count},) to match members, got shape {scores.shape}")
    if not (np.issubdtype(scores.dtype, np.floating) or np.issubdtype(scores.dtype, np.integer)):
        raise InputError(f"{op}: scores must be real numbers, got dtype {scores.dtype}")
    scores = np.ascontiguousarray(scores, np.float64)
    if not np.isfinite(scores).all():
        raise InputError(f"{op}: scores must be finite (found NaN or inf)")
    return np.ascontiguousarray(classes, np.int32), scores


# ----------------------------------------------------------------------------------------------------------- ops


def _regions_on(op: str, where: Place, atoms: Sequence, members: Sequence) -> tuple[list, list]:
    """Per-image atoms (int32) and members (uint8) on `where`: host arrays fully checked (check_regions), device
    arrays checked for rank and shape only (reading their values would wait for the device; the kernels ignore atom
    ids outside [0, A))."""
    if len(atoms) != len(members):
        raise InputError(f"{op}: {len(atoms)} atom maps for {len(members)} membership matrices")
    if not where.is_cuda:
        pairs = [check_regions(op, a, m) for a, m in zip(atoms, members)]
        return [a for a, _ in pairs], [m for _, m in pairs]
    for i, (a, m) in enumerate(zip(atoms, members)):
        if len(shape_of(a)) != 2 or len(shape_of(m)) != 2 or dtype_of(a).kind not in "iu" \
                or dtype_of(m).kind not in "biu" or 0 in shape_of(a):
            raise InputError(f"{op}: image {i}: atoms must be a nonempty (H, W) integer map and members an (N, A) "
                             f"bool matrix, got {dtype_of(a)} {shape_of(a)} and {dtype_of(m)} {shape_of(m)}")
    return ([contiguous(a, np.int32, where) for a in atoms],
            [contiguous(m, np.uint8, where) if dtype_of(m) != np.bool_ else contiguous(m, np.bool_, where)
             for m in members])


def _shapes(atoms: list, members: list) -> np.ndarray:
    """(B, 4) int64: height, width, regions and atoms of each image (host numbers, known without the device)."""
    return np.array([[*shape_of(a), *shape_of(m)] for a, m in zip(atoms, members)], np.int64).reshape(-1, 4)


def _ids(op: str, ids: Any, count: int) -> np.ndarray:
    ids = np.asarray(ids)
    if ids.shape != (count,) or (count and ids.dtype.kind not in "iu"):
        raise InputError(f"{op}: ids must be ({count},) integers to match members, got {ids.dtype} {ids.shape}")
    if count and (ids.min() < _INT32.min or ids.max() > _INT32.max):
        raise InputError(f"{op}: ids must fit in int32 (the owner map's type)")
    return ids


def build_info() -> dict:
    """What the compiled extension holds: {"cuda": built with CUDA launchers, "architectures": ["sm_75", ...,
    "compute_90"], "ops": ops with a CUDA launcher, "cpu_ops", "openmp", "cuda_runtime"}."""
    return dict(_lib().build_info())


def cuda_launches() -> int:
    """CUDA kernels this process's ops have launched so far (tests count the launches of a batch)."""
    return int(_lib().cuda_launches())
