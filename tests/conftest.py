"""Shared pytest setup: tests marked @pytest.mark.gpu skip unless a CUDA device is usable by the engine — torch sees
a GPU and engine._C was compiled with the CUDA kernels and finds a device."""

from __future__ import annotations

import functools

import pytest


@functools.lru_cache(maxsize=1)
def cuda_skip_reason() -> str | None:
    """None when the CUDA kernels can run here, else why the gpu tests skip."""
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "no CUDA device visible to torch"
    try:
        from engine import _C
    except ImportError as error:
        return f"engine._C is not built ({error})"
    if not _C.has_cuda():
        return "engine._C was built without CUDA kernels"
    if _C.cuda_device_count() < 1:
        return "engine._C sees no CUDA device"
    return None


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if not gpu_items:
        return
    reason = cuda_skip_reason()
    if reason is None:
        return
    marker = pytest.mark.skip(reason=f"gpu test: {reason}")
    for item in gpu_items:
        item.add_marker(marker)
