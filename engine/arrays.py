"""The arrays the compiled ops take, whatever library made them: NumPy arrays on the host, torch tensors or CuPy
arrays on a CUDA device (read through `__cuda_array_interface__`, so engine._C never links against torch).

`place(x)` says where an array lives (`Place("cpu")` or `Place("cuda", index, "torch" | "cupy")`); the other
helpers read an array's address and the library's current CUDA stream, allocate outputs with the same library on the
same device, and move arrays between places. A torch tensor on the CPU is taken as the NumPy array it shares memory
with.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from .errors import InputError


@dataclass(frozen=True)
class Place:
    """Where an array lives: kind "cpu" (NumPy) or "cuda" (device `index`, made by `library` "torch" or "cupy")."""

    kind: str = "cpu"
    index: int = -1
    library: str = "numpy"

    @property
    def is_cuda(self) -> bool:
        return self.kind == "cuda"

    def __str__(self) -> str:
        return "cpu" if not self.is_cuda else f"cuda:{self.index} ({self.library})"


CPU = Place()


def _library(x) -> str:
    module = type(x).__module__.split(".")[0]
    return module if module in ("torch", "cupy") else "numpy"


def place(x) -> Place:
    """Where `x` lives; anything without `__cuda_array_interface__` (NumPy arrays, lists, CPU tensors) is the CPU."""
    if not hasattr(x, "__cuda_array_interface__"):
        return CPU
    library = _library(x)
    index = x.device.index if library == "torch" else x.device.id
    return Place("cuda", int(index or 0), library)


def common_place(name: str, arrays) -> Place:
    """The one place of several arrays, or an InputError naming them."""
    places = {place(x) for x in arrays}
    if len(places) > 1:
        raise InputError(f"{name}: arrays on different devices ({', '.join(sorted(map(str, places)))})")
    return places.pop() if places else CPU


def host(x) -> np.ndarray:
    """`x` as a NumPy array (copied from the device when it lives there)."""
    if hasattr(x, "__cuda_array_interface__"):
        return x.get() if _library(x) == "cupy" else x.cpu().numpy()
    if _library(x) == "torch":
        return x.numpy()
    return np.asarray(x)


def dtype_of(x) -> np.dtype:
    if hasattr(x, "__cuda_array_interface__"):
        return np.dtype(x.__cuda_array_interface__["typestr"])
    return np.asarray(x).dtype if _library(x) != "torch" else x.numpy().dtype


def shape_of(x) -> tuple[int, ...]:
    return tuple(int(n) for n in x.shape) if hasattr(x, "shape") else np.shape(x)


def _torch_dtype(torch, dtype):
    return torch.from_numpy(np.empty(0, dtype)).dtype


def contiguous(x, dtype, where: Place):
    """`x` on `where`, C-contiguous, of `dtype` (no copy when it already is)."""
    dtype = np.dtype(dtype)
    if not where.is_cuda:
        return np.ascontiguousarray(host(x), dtype)
    if where.library == "cupy":
        import cupy

        with cupy.cuda.Device(where.index):
            return cupy.ascontiguousarray(cupy.asarray(x), dtype)
    import torch

    if not isinstance(x, torch.Tensor):
        x = torch_view(torch, np.ascontiguousarray(x))
    return x.to(device=f"cuda:{where.index}", dtype=_torch_dtype(torch, dtype)).contiguous()


def torch_view(torch, array: np.ndarray):
    """A torch tensor sharing a NumPy array's memory, to be read (copied to a device) and never written: torch warns
    about read-only arrays (the engine's checked images are), which is moot here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)


def concatenate(arrays: list, dtype, where: Place):
    """One-dimensional arrays joined end to end on `where` (torch or CuPy on a CUDA device, else NumPy), as
    `dtype`."""
    parts = [contiguous(x, dtype, where).reshape(-1) for x in arrays]
    if not where.is_cuda:
        return np.concatenate(parts) if parts else np.zeros(0, dtype)
    if not parts:
        return empty(where, (0,), dtype)
    if where.library == "cupy":
        import cupy

        return cupy.concatenate(parts)
    import torch

    return torch.cat(parts)


def empty(where: Place, shape, dtype):
    """An uninitialised array of `shape` and `dtype` on `where`, made by its library."""
    dtype = np.dtype(dtype)
    if not where.is_cuda:
        return np.empty(shape, dtype)
    if where.library == "cupy":
        import cupy

        with cupy.cuda.Device(where.index):
            return cupy.empty(shape, dtype)
    import torch

    return torch.empty(tuple(shape), dtype=_torch_dtype(torch, dtype), device=f"cuda:{where.index}")


def address(x) -> int:
    """The address of an array's first element (0 for an empty one, which no kernel reads)."""
    if hasattr(x, "__cuda_array_interface__"):
        return int(x.__cuda_array_interface__["data"][0])
    return int(x.ctypes.data) if x.size else 0


def stream(where: Place) -> int:
    """The handle of the library's current CUDA stream on `where` (0 on the CPU): the kernels run in its order."""
    if not where.is_cuda:
        return 0
    if where.library == "cupy":
        import cupy

        with cupy.cuda.Device(where.index):
            return int(cupy.cuda.get_current_stream().ptr)
    import torch

    return int(torch.cuda.current_stream(where.index).cuda_stream)


def host_all(arrays: list) -> list[np.ndarray]:
    """Several arrays as NumPy arrays, device ones copied down together: every copy is queued (into pinned memory)
    before one wait for the stream, instead of one synchronisation per array."""
    on_device = [i for i, x in enumerate(arrays) if place(x).is_cuda]
    out = [None if i in on_device else host(x) for i, x in enumerate(arrays)]
    torch_arrays = [i for i in on_device if _library(arrays[i]) == "torch"]
    if torch_arrays:
        import torch

        copies = {}
        for i in torch_arrays:
            copies[i] = torch.empty(arrays[i].shape, dtype=arrays[i].dtype, pin_memory=True)
            copies[i].copy_(arrays[i], non_blocking=True)
        for device in {arrays[i].device for i in torch_arrays}:
            torch.cuda.current_stream(device).synchronize()
        for i, copy in copies.items():
            out[i] = copy.numpy()
    for i in on_device:
        if out[i] is None:
            out[i] = host(arrays[i])
    return out
