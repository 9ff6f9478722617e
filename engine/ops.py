"""The Python face of the compiled kernels in engine._C (csrc/): validate, convert, dispatch CPU / CUDA — nothing else.

Each op returns exactly what its NumPy twin in engine.reference returns (the twins are the spec):

- soft_mask_pool     <-> reference.soft_mask_pool_reference      (SMFA: soft-masked feature aggregation)
- mask_nms_raster    <-> reference.mask_nms_raster_reference     (class-specific mask NMS + confidence-priority raster)

NumPy inputs (or CPU torch tensors) run the C++/OpenMP kernels and return NumPy arrays. CUDA torch tensors run the
CUDA kernels on the tensors' device and current stream and return CUDA torch tensors (allocated here with torch, the
kernels get raw device pointers). Masks are bool or uint8 with 0/1 values; any nonzero byte counts as covered.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import numpy as np

from engine.errors import InputError

try:
    from engine import _C
except ImportError as _error:  # not built: every op says how to build it
    _C = None
    _IMPORT_ERROR: ImportError | None = _error
else:
    _IMPORT_ERROR = None

__all__ = ["soft_mask_pool", "mask_nms_raster", "has_cuda", "cuda_available"]

_INT32 = np.iinfo(np.int32)


def _lib():
    if _C is None:
        raise ImportError(
            "engine._C (the compiled kernels) is not built: run `pip install .` or, for development, "
            f"`pip install --no-build-isolation -Ceditable.mode=inplace -e .` ({_IMPORT_ERROR})"
        )
    return _C


def has_cuda() -> bool:
    """Whether engine._C was compiled with the CUDA kernels (says nothing about a GPU being present)."""
    return _C is not None and bool(_C.has_cuda())


def cuda_available() -> bool:
    """Whether the CUDA kernels can run here: a CUDA build, a visible device, and torch with CUDA."""
    if not has_cuda() or _C.cuda_device_count() < 1:
        return False
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


# ----------------------------------------------------------------------------------------------------- validation


def _is_torch(x: Any) -> bool:
    return type(x).__module__.split(".")[0] == "torch" and hasattr(x, "data_ptr")


def _is_cuda_tensor(x: Any) -> bool:
    return _is_torch(x) and bool(getattr(x, "is_cuda", False))


def _as_numpy(x: Any) -> np.ndarray:
    if _is_torch(x):
        return x.detach().numpy()
    return np.asarray(x)


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


def _mask_shape(op: str, shape: tuple, dtype_name: str, ok_dtype: bool) -> tuple[int, int, int]:
    if len(shape) != 3:
        raise InputError(f"{op}: masks must be (N, H, W), got shape {tuple(shape)}")
    if not ok_dtype:
        raise InputError(f"{op}: masks must be bool or uint8 (0/1), got dtype {dtype_name}")
    count, height, width = (int(s) for s in shape)
    if height < 1 or width < 1:
        raise InputError(f"{op}: masks must have a nonzero height and width, got (N, H, W) = {tuple(shape)}")
    return count, height, width


def _numpy_masks(op: str, masks: Any) -> np.ndarray:
    masks = _as_numpy(masks)
    _mask_shape(op, masks.shape, str(masks.dtype), masks.dtype in (np.bool_, np.uint8))
    # A bool array is one 0/1 byte per pixel: view it as uint8 without a copy.
    return np.ascontiguousarray(masks).view(np.uint8)


def _grid(op: str, features_shape: tuple, height: int, width: int, stride: int) -> None:
    expected = (-(-height // stride), -(-width // stride))
    if tuple(int(s) for s in features_shape[:2]) != expected:
        raise InputError(
            f"{op}: features grid {tuple(features_shape[:2])} does not match masks of {height}x{width} at stride "
            f"{stride}: expected (ceil(H/stride), ceil(W/stride)) = {expected}"
        )


def _numpy_classes_scores(op: str, classes: Any, scores: Any, count: int) -> tuple[np.ndarray, np.ndarray]:
    classes = _as_numpy(classes)
    scores = _as_numpy(scores)
    if classes.shape != (count,):
        raise InputError(f"{op}: classes must be ({count},) to match masks, got shape {classes.shape}")
    if not (np.issubdtype(classes.dtype, np.integer) or (classes.size == 0 and classes.dtype == np.float64)):
        raise InputError(f"{op}: classes must be integers, got dtype {classes.dtype}")
    if count and (classes.min() < _INT32.min or classes.max() > _INT32.max):
        raise InputError(f"{op}: classes must fit in int32 (the label map's type)")
    if scores.shape != (count,):
        raise InputError(f"{op}: scores must be ({count},) to match masks, got shape {scores.shape}")
    if not (np.issubdtype(scores.dtype, np.floating) or np.issubdtype(scores.dtype, np.integer)):
        raise InputError(f"{op}: scores must be real numbers, got dtype {scores.dtype}")
    scores = np.ascontiguousarray(scores, np.float64)
    if not np.isfinite(scores).all():
        raise InputError(f"{op}: scores must be finite (found NaN or inf)")
    return np.ascontiguousarray(classes, np.int32), scores


# ----------------------------------------------------------------------------------------------------------- ops


def soft_mask_pool(features: Any, masks: Any, stride: int, eps: float = 1e-8, normalize: bool = True,
                   num_threads: int = 0):
    """SMFA: one pooled vector per mask, sum_p w_p F_p / (sum_p w_p + eps), then L2-normalised (zero stays zero).

    features: (h, w, D) float patch features (converted to float32); masks: (N, H, W) bool or uint8 at pixel
    resolution, with (h, w) = (ceil(H / stride), ceil(W / stride)); w_p is the fraction of patch p's stride x stride
    pixels the mask covers, pixels beyond H, W counting as uncovered (the image's zero padding). eps keeps an empty
    mask's vector at zero; normalize=False returns the weighted mean. num_threads: OpenMP threads (0 = default).
    Returns (N, D) float32 — NumPy on CPU, a torch CUDA tensor when features and masks are CUDA tensors.
    """
    op = "soft_mask_pool"
    stride = _int(op, "stride", stride, minimum=1)
    eps = _real(op, "eps", eps)
    num_threads = _int(op, "num_threads", num_threads, minimum=0)
    if _is_cuda_tensor(features) or _is_cuda_tensor(masks):
        return _soft_mask_pool_cuda(features, masks, stride, eps, bool(normalize))

    masks = _numpy_masks(op, masks)
    count, height, width = masks.shape
    features = _as_numpy(features)
    if features.ndim != 3:
        raise InputError(f"{op}: features must be (h, w, D), got shape {features.shape}")
    if not np.issubdtype(features.dtype, np.floating):
        raise InputError(f"{op}: features must be floating point (float32), got dtype {features.dtype}")
    _grid(op, features.shape, height, width, stride)
    features = np.ascontiguousarray(features, np.float32)
    return _lib().soft_mask_pool(features, masks, stride, eps, bool(normalize), num_threads)


def mask_nms_raster(masks: Any, classes: Any, scores: Any, iou_threshold: float, background: int = 0,
                    num_threads: int = 0):
    """Class-specific greedy mask NMS, then confidence-priority rasterisation.

    Processing order is score descending, equal scores in index order. A mask is suppressed when its IoU with an
    already kept mask of the same class is > iou_threshold (equal is kept; an empty union has IoU 0). Kept masks paint
    in processing order and a pixel keeps the first label it gets; unpainted pixels are `background`.
    masks: (N, H, W) bool or uint8; classes: (N,) integers (fit in int32); scores: (N,) finite reals.
    Returns keep (N,) bool, label_map (H, W) int32, owner (H, W) int32 (index of the painting mask, -1 if none) —
    NumPy on CPU, torch CUDA tensors when masks is a CUDA tensor.
    """
    op = "mask_nms_raster"
    iou_threshold = _real(op, "iou_threshold", iou_threshold)
    background = _int(op, "background", background)
    if not _INT32.min <= background <= _INT32.max:
        raise InputError(f"{op}: background must fit in int32, got {background}")
    num_threads = _int(op, "num_threads", num_threads, minimum=0)
    if _is_cuda_tensor(masks):
        return _mask_nms_raster_cuda(masks, classes, scores, iou_threshold, background)

    masks = _numpy_masks(op, masks)
    classes, scores = _numpy_classes_scores(op, classes, scores, masks.shape[0])
    keep, label_map, owner = _lib().mask_nms_raster(masks, classes, scores, iou_threshold, background, num_threads)
    return keep, label_map, owner


# ------------------------------------------------------------------------------------------------- CUDA dispatch


def _cuda_lib(op: str):
    lib = _lib()
    if not lib.has_cuda():
        raise InputError(
            f"{op}: got CUDA tensors, but engine._C was built without CUDA kernels (rebuild where nvcc is found, "
            "or with -Ccmake.define.MODUSEG_CUDA=ON), or pass NumPy arrays to run on the CPU"
        )
    return lib


def _cuda_masks(op: str, masks: Any, device) -> Any:
    import torch

    if not _is_cuda_tensor(masks) or masks.device != device:
        where = masks.device if _is_torch(masks) else type(masks).__name__
        raise InputError(f"{op}: masks must be a CUDA tensor on {device}, got {where}")
    _mask_shape(op, tuple(masks.shape), str(masks.dtype), masks.dtype in (torch.bool, torch.uint8))
    return masks.contiguous()


def _soft_mask_pool_cuda(features: Any, masks: Any, stride: int, eps: float, normalize: bool):
    op = "soft_mask_pool"
    import torch

    if not _is_cuda_tensor(features):
        where = features.device if _is_torch(features) else type(features).__name__
        raise InputError(f"{op}: features must be a CUDA tensor when masks is one, got {where}")
    device = features.device
    masks = _cuda_masks(op, masks, device)
    count, height, width = (int(s) for s in masks.shape)
    if features.ndim != 3:
        raise InputError(f"{op}: features must be (h, w, D), got shape {tuple(features.shape)}")
    if features.dtype != torch.float32:
        raise InputError(f"{op}: CUDA features must be float32, got {features.dtype}")
    _grid(op, tuple(features.shape), height, width, stride)
    lib = _cuda_lib(op)
    features = features.contiguous()
    grid_h, grid_w, dim = (int(s) for s in features.shape)
    out = torch.empty((count, dim), dtype=torch.float32, device=device)
    with torch.cuda.device(device):
        stream = torch.cuda.current_stream(device).cuda_stream
        lib.soft_mask_pool_cuda(features.data_ptr(), grid_h, grid_w, dim, masks.data_ptr(), count, height, width,
                                stride, eps, normalize, out.data_ptr(), stream)
    return out


def _mask_nms_raster_cuda(masks: Any, classes: Any, scores: Any, iou_threshold: float, background: int):
    op = "mask_nms_raster"
    import torch

    device = masks.device
    masks = _cuda_masks(op, masks, device)
    count, height, width = (int(s) for s in masks.shape)
    # Through NumPy unless already tensors: Python floats stay float64 (torch would make them float32).
    classes = torch.as_tensor(classes if _is_torch(classes) else np.asarray(classes), device=device)
    scores = torch.as_tensor(scores if _is_torch(scores) else np.asarray(scores), device=device)
    if tuple(classes.shape) != (count,):
        raise InputError(f"{op}: classes must be ({count},) to match masks, got shape {tuple(classes.shape)}")
    if classes.dtype.is_floating_point or classes.dtype.is_complex or classes.dtype == torch.bool:
        raise InputError(f"{op}: classes must be integers, got dtype {classes.dtype}")
    if tuple(scores.shape) != (count,):
        raise InputError(f"{op}: scores must be ({count},) to match masks, got shape {tuple(scores.shape)}")
    if scores.dtype.is_complex or scores.dtype == torch.bool:
        raise InputError(f"{op}: scores must be real numbers, got dtype {scores.dtype}")
    scores = scores.to(torch.float64).contiguous()
    if count:
        wide = classes.to(torch.int64)
        bad_classes, bad_scores = torch.stack(
            [(wide < _INT32.min).any() | (wide > _INT32.max).any(), ~torch.isfinite(scores).all()]).tolist()
        if bad_classes:
            raise InputError(f"{op}: classes must fit in int32 (the label map's type)")
        if bad_scores:
            raise InputError(f"{op}: scores must be finite (found NaN or inf)")
    classes = classes.to(torch.int32).contiguous()
    lib = _cuda_lib(op)
    keep = torch.empty((count,), dtype=torch.bool, device=device)
    label_map = torch.empty((height, width), dtype=torch.int32, device=device)
    owner = torch.empty((height, width), dtype=torch.int32, device=device)
    with torch.cuda.device(device):
        stream = torch.cuda.current_stream(device).cuda_stream
        lib.mask_nms_raster_cuda(masks.data_ptr(), count, height, width, classes.data_ptr(), scores.data_ptr(),
                                 iou_threshold, background, keep.data_ptr(), label_map.data_ptr(), owner.data_ptr(),
                                 stream)
    return keep, label_map, owner
