"""Optional run-time dependencies and the check made before torch first uses a CUDA device.

onnxruntime and FAISS come from install extras, never from the base requirements, because their CPU and GPU builds
install the same module and shadow each other (onnxruntime and onnxruntime-gpu both provide `onnxruntime`; faiss-cpu
and faiss-gpu-cu12 both provide `faiss`):

    pip install "moduseg-engine[cpu]"     onnxruntime, faiss-cpu
    pip install "moduseg-engine[gpu]"     onnxruntime-gpu, faiss-gpu-cu12 (a CUDA machine; never together with [cpu])

`require(module)` imports one of them where it is first needed and raises ModelError naming the extra when it is
missing. `check_torch_device(device)` raises ModelError naming the GPU, its compute capability and the architectures
torch was built for when this torch has no kernel image the GPU can run (otherwise the first kernel launch fails with
CUDA's bare "no kernel image is available for execution on the device"). This module imports nothing heavy, so every
other module can use it.
"""

from __future__ import annotations

import importlib
import re
from types import ModuleType
from typing import Sequence

from .errors import InputError, ModelError

#: importable module -> (the package of the "cpu" extra, the package of the "gpu" extra) that provides it
EXTRAS = {"onnxruntime": ("onnxruntime", "onnxruntime-gpu"), "faiss": ("faiss-cpu", "faiss-gpu-cu12")}


def missing_message(module: str, purpose: str | None = None) -> str:
    """What to install for `module` (a key of EXTRAS), as the error says it."""
    cpu, gpu = EXTRAS[module]
    return (f"{purpose or 'the engine'} needs the {module!r} module, which is not installed: "
            f"pip install 'moduseg-engine[cpu]' (brings {cpu}) or, on a CUDA machine, 'moduseg-engine[gpu]' "
            f"(brings {gpu}); install one of the two extras, not both")


def require(module: str, purpose: str | None = None) -> ModuleType:
    """Import `module` ("onnxruntime", "faiss", or a submodule of one) and return it; ModelError saying which extra
    to install when it is missing, or quoting the import error when it is installed but fails to import (a GPU build
    missing its CUDA libraries, say). `purpose` names what needs it in the message."""
    top = module.split(".")[0]
    if top not in EXTRAS:
        raise InputError(f"require() knows {sorted(EXTRAS)}, not {module!r}")
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        if error.name is not None and error.name.split(".")[0] == top:
            raise ModelError(missing_message(top, purpose)) from error
        raise ModelError(f"{module} is installed but cannot be imported: {error}") from error
    except ImportError as error:
        raise ModelError(f"{module} is installed but cannot be imported (a GPU build without its CUDA libraries, or "
                         f"both the CPU and GPU packages installed?): {error}") from error


# ------------------------------------------------------------------------------------------- CUDA kernel images

_ARCH = re.compile(r"^(sm|compute)_(\d+)(\d)([af]?)$")


def parse_arch(arch: str) -> tuple[str, int, int, str] | None:
    """'sm_86' -> ('sm', 8, 6, ''); 'compute_90' -> ('compute', 9, 0, ''); 'sm_90a' -> ('sm', 9, 0, 'a');
    'sm_120' -> ('sm', 12, 0, ''). None for anything else."""
    match = _ARCH.match(arch.strip())
    if match is None:
        return None
    kind, major, minor, suffix = match.groups()
    return kind, int(major), int(minor), suffix


def arch_runs_on(arch: str, capability: tuple[int, int]) -> bool:
    """Whether code built for `arch` runs on a GPU of compute capability `capability` (major, minor).

    A binary image (sm_XY) runs on GPUs of the same major version and a minor version >= Y; an architecture-specific
    one (sm_XYa) on capability X.Y only. PTX (compute_XY) is compiled by the driver for any GPU of capability >= X.Y.
    """
    parsed = parse_arch(arch)
    if parsed is None:
        return False
    kind, major, minor, suffix = parsed
    if kind == "compute":
        return tuple(capability) >= (major, minor)
    if suffix == "a":
        return tuple(capability) == (major, minor)
    return capability[0] == major and capability[1] >= minor


def cuda_arch_problem(capability: tuple[int, int], arch_list: Sequence[str]) -> str | None:
    """None when a build for `arch_list` (torch.cuda.get_arch_list()) has code a GPU of `capability` can run, else
    why not. An empty list (a build that does not say) is given the benefit of the doubt."""
    arch_list = [a for a in arch_list if a]
    if not arch_list or any(arch_runs_on(arch, capability) for arch in arch_list):
        return None
    return (f"no kernel image for compute capability {capability[0]}.{capability[1]} among the built architectures "
            f"{', '.join(arch_list)}")


def check_torch_device(device) -> None:
    """Before torch's first work on `device`: nothing for a CPU device; ModelError when torch sees no such CUDA GPU,
    or when this torch build has no kernel image for it (naming the GPU, its capability and the built
    architectures, and what to install instead)."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return
    if not torch.cuda.is_available():
        raise ModelError(f"device {str(device)!r} requested but torch {torch.__version__} sees no CUDA GPU "
                         f"(CUDA build: {torch.version.cuda})")
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index >= torch.cuda.device_count():
        raise ModelError(f"device {str(device)!r}: torch sees {torch.cuda.device_count()} CUDA GPU(s)")
    capability = tuple(torch.cuda.get_device_capability(index))
    problem = cuda_arch_problem(capability, torch.cuda.get_arch_list())
    if problem is not None:
        raise ModelError(f"GPU {index} ({torch.cuda.get_device_name(index)}): {problem} of torch {torch.__version__} "
                         f"(CUDA {torch.version.cuda}); install a torch build that includes sm_{capability[0]}"
                         f"{capability[1]} (or PTX of an older architecture), or use device='cpu'")
