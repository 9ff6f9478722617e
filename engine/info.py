"""What a bug report needs, as torch.utils.collect_env gives it: `moduseg info [--json]`.

    info = collect()          # a JSON-ready dict
    print(format_text(info))  # the same, for a person

It records the engine's version, Python and the platform, NumPy, the compiled extension (whether it imports, which
ops have CUDA launchers and for which architectures, its CUDA runtime, OpenMP, the GPUs it sees), the runtimes found
(onnxruntime, FAISS, TensorRT, torch, torchvision, CuPy, the Triton client) and the GPUs as the driver reports them.
Every probe is guarded: a runtime that is absent is recorded as not installed, one that fails to import or to answer
is recorded with its error, and the report goes on. Nothing is built or run on a GPU (TensorRT is imported, never
asked for a Runtime or Builder: those crash the process on a machine without a GPU).
"""

from __future__ import annotations

import ctypes
import importlib
import importlib.metadata
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Callable

from . import __version__

#: runtimes probed, in report order (module names)
RUNTIMES = ("onnxruntime", "faiss", "tensorrt", "torch", "torchvision", "cupy", "tritonclient")
#: environment variables that change what the engine builds or sees, reported when set
ENVIRONMENT = ("MODUSEG_CUDA", "CUDA_VISIBLE_DEVICES", "CUDA_HOME", "OMP_NUM_THREADS", "MODUSEG_CACHE",
               "MODUSEG_DATA")
_NVIDIA_SMI_FIELDS = ("index", "name", "driver_version", "memory.total", "compute_cap")


def collect() -> dict:
    """Everything format_text shows, as a dict of plain JSON values."""
    extension, cuda_kernels = _extension()
    # which installed distributions provide each module: two of them (onnxruntime and onnxruntime-gpu, faiss-cpu and
    # faiss-gpu-cu12) shadowing each other is a common cause of GPU bugs, so the report names them all
    try:
        providers = importlib.metadata.packages_distributions()
    except Exception:  # broken metadata of some unrelated package: the versions still come from the modules
        providers = {}
    return {
        "engine": {"version": __version__, "path": str(Path(__file__).resolve().parent)},
        "python": {"version": platform.python_version(), "implementation": platform.python_implementation(),
                   "executable": sys.executable},
        "platform": {"system": platform.platform(), "machine": platform.machine()},
        "numpy": _guard(_numpy),
        "extension": extension,
        "cuda_kernels": cuda_kernels,
        "runtimes": {name: _runtime(name, providers) for name in RUNTIMES},
        "gpu": _guard(_driver_gpus),
        "environment": {name: os.environ[name] for name in ENVIRONMENT if name in os.environ},
    }


def _guard(probe: Callable[[], dict]) -> dict:
    """probe()'s dict, or {"error": ...} when it raises; warnings it raises are kept (a CUDA initialisation warning
    is often the whole story)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = probe()
        except Exception as error:  # one broken runtime never stops the report
            result = {"error": _error_text(error)}
    messages = list(dict.fromkeys(str(w.message) for w in caught))
    if messages and isinstance(result, dict):
        result["warnings"] = messages
    return result


def _error_text(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}".strip()


def _numpy() -> dict:
    import numpy

    return {"version": numpy.__version__}


# ------------------------------------------------------------------------------------------- the extension

def _extension() -> tuple[dict, dict]:
    """(what engine._C is, its "cuda_kernels" record); the latter is {"built": False, [], []} without CUDA."""
    no_kernels = {"built": False, "architectures": [], "ops": []}
    try:
        from . import _C
    except Exception as error:  # not built, or built against another Python / a missing library
        return {"built": False, "error": _error_text(error)}, no_kernels
    extension: dict = {"built": True, "path": getattr(_C, "__file__", None)}
    try:
        built = dict(_C.build_info())
    except Exception as error:  # an extension older than build_info
        extension["error"] = _error_text(error)
        return extension, no_kernels
    cuda = bool(built.get("cuda"))
    runtime = built.get("cuda_runtime")
    extension.update({
        "cuda": cuda,
        # CUDART_VERSION: major * 1000 + minor * 10
        "cuda_runtime": f"{runtime // 1000}.{runtime % 1000 // 10}" if cuda and isinstance(runtime, int) and runtime
        else None,
        "openmp": bool(built.get("openmp")),
        "cpu_ops": list(built.get("cpu_ops", ())),
    })
    try:
        extension["gpus"] = int(_C.cuda_device_count())
    except Exception as error:
        extension["gpus"] = None
        extension["gpus_error"] = _error_text(error)
    if not cuda:
        return extension, no_kernels
    return extension, {"built": True, "architectures": list(built.get("architectures", ())),
                       "ops": list(built.get("ops", ()))}


# ------------------------------------------------------------------------------------------------- runtimes

def _runtime(name: str, providers: dict) -> dict:
    """{"installed": False}, or {"installed": True, "distributions": [...], "version", ...what the runtime says}."""
    try:
        if importlib.util.find_spec(name) is None:
            return {"installed": False}
    except (ImportError, ValueError) as error:  # a broken parent package or a module without a spec
        return {"installed": False, "error": _error_text(error)}
    entry: dict = {"installed": True, "distributions": [_distribution(d) for d in dict.fromkeys(providers.get(name, []))]}
    entry.update(_guard(_PROBES[name]))
    return entry


def _distribution(name: str) -> str:
    try:
        return f"{name} {importlib.metadata.version(name)}"
    except importlib.metadata.PackageNotFoundError:
        return name


def _onnxruntime() -> dict:
    import onnxruntime

    return {"version": onnxruntime.__version__, "providers": list(onnxruntime.get_available_providers())}


def _faiss() -> dict:
    import faiss

    gpu_support = hasattr(faiss, "StandardGpuResources")
    return {"version": getattr(faiss, "__version__", None), "gpu_support": gpu_support,
            "gpus": int(faiss.get_num_gpus()) if gpu_support else 0}


def _tensorrt() -> dict:
    # the import and the version only: trt.Runtime / trt.Builder segfault on a machine without a GPU
    import tensorrt

    return {"version": getattr(tensorrt, "__version__", None)}


def _torch() -> dict:
    import torch

    entry = {"version": torch.__version__, "cuda": torch.version.cuda, "cuda_available": False, "gpus": 0,
             "devices": []}
    entry["cuda_available"] = bool(torch.cuda.is_available())
    if entry["cuda_available"]:
        entry["gpus"] = int(torch.cuda.device_count())
        entry["architectures"] = list(torch.cuda.get_arch_list())
        for index in range(entry["gpus"]):
            major, minor = torch.cuda.get_device_capability(index)
            entry["devices"].append({"index": index, "name": torch.cuda.get_device_name(index),
                                     "compute_capability": f"{major}.{minor}"})
    return entry


def _torchvision() -> dict:
    import torchvision

    entry = {"version": torchvision.__version__, "gpu_jpeg_decode": False}
    import torch

    # decode_jpeg(device="cuda") runs nvJPEG: it needs a GPU torch sees and a torchvision that has the function
    entry["gpu_jpeg_decode"] = bool(torch.cuda.is_available() and hasattr(torchvision.io, "decode_jpeg"))
    return entry


def _cupy() -> dict:
    import cupy

    entry: dict = {"version": cupy.__version__}
    try:
        entry["gpus"] = int(cupy.cuda.runtime.getDeviceCount())
    except Exception as error:  # no driver or no GPU: CUDARuntimeError, not a broken install
        entry["gpus"] = 0
        entry["gpus_error"] = _error_text(error)
    return entry


def _tritonclient() -> dict:
    # the version from the package metadata: importing the client pulls in grpc and gevent for nothing
    return {"version": importlib.metadata.version("tritonclient")}


_PROBES: dict[str, Callable[[], dict]] = {
    "onnxruntime": _onnxruntime, "faiss": _faiss, "tensorrt": _tensorrt, "torch": _torch,
    "torchvision": _torchvision, "cupy": _cupy, "tritonclient": _tritonclient,
}


# ---------------------------------------------------------------------------------------------- the driver

def _driver_gpus() -> dict:
    """The GPUs nvidia-smi lists (with the CUDA version the driver supports), or why there are none."""
    entry: dict = {"nvidia_smi": shutil.which("nvidia-smi"), "driver_cuda": _driver_cuda_version(), "gpus": []}
    if entry["nvidia_smi"] is not None:
        rows, error = _nvidia_smi(entry["nvidia_smi"], _NVIDIA_SMI_FIELDS)
        if error is not None and "compute_cap" in error:  # drivers before 510 do not know the field
            rows, error = _nvidia_smi(entry["nvidia_smi"], _NVIDIA_SMI_FIELDS[:-1])
        if error is None:
            entry["gpus"] = rows
            return entry
        entry["error"] = error
    from .models.runtime import gpu_unavailable_reason

    entry["reason"] = gpu_unavailable_reason() or "nvidia-smi not found, but the CUDA driver reports a GPU"
    return entry


def _nvidia_smi(executable: str, fields: tuple[str, ...]) -> tuple[list[dict], str | None]:
    command = [executable, f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as error:
        return [], _error_text(error)
    if done.returncode != 0:
        return [], f"nvidia-smi exited with {done.returncode}: {(done.stdout + done.stderr).strip()}"
    rows = []
    for line in done.stdout.strip().splitlines():
        values = [value.strip() for value in line.split(",")]
        row = dict(zip(fields, values))
        if "memory.total" in row:
            row["memory_mib"] = row.pop("memory.total")
        rows.append(row)
    return rows, None


def _driver_cuda_version() -> str | None:
    """The newest CUDA the driver supports (cuDriverGetVersion; no cuInit, no device), None without a driver."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
        version = ctypes.c_int(0)
        if cuda.cuDriverGetVersion(ctypes.byref(version)) != 0:
            return None
    except (OSError, AttributeError):
        return None
    return f"{version.value // 1000}.{version.value % 1000 // 10}"


# ------------------------------------------------------------------------------------------------------ text

def format_text(info: dict) -> str:
    """The report of collect() as aligned lines, one section per part."""
    python, system, extension = info["python"], info["platform"], info["extension"]
    lines = [f"moduseg-engine {info['engine']['version']} ({info['engine']['path']})",
             _row("Python", f"{python['version']} {python.get('implementation', '')} ({python['executable']})"),
             _row("Platform", f"{system['system']} ({system['machine']})"),
             _row("NumPy", info["numpy"].get("version") or info["numpy"].get("error")),
             "", "Compiled extension (engine._C)"]
    if not extension["built"]:
        lines.append(_row("built", f"no: {extension.get('error')}", 2))
    else:
        kernels = info["cuda_kernels"]
        lines.append(_row("built", f"yes ({extension.get('path')})", 2))
        if "error" in extension:
            lines.append(_row("error", extension["error"], 2))
        lines.append(_row("CUDA kernels", f"yes: {', '.join(kernels['ops'])} for {', '.join(kernels['architectures'])}"
                          if kernels["built"] else "no (CPU launchers only)", 2))
        if kernels["built"]:
            lines.append(_row("CUDA runtime", f"{extension.get('cuda_runtime')} (static)", 2))
        lines.append(_row("OpenMP", _yes_no(extension.get("openmp")), 2))
        lines.append(_row("CPU ops", ", ".join(extension.get("cpu_ops", [])), 2))
        gpus = extension.get("gpus")
        lines.append(_row("GPUs seen", gpus if gpus is not None else extension.get("gpus_error"), 2))
    lines += ["", "Runtimes"]
    for name, entry in info["runtimes"].items():
        lines.append(_row(name, _runtime_text(name, entry), 2))
        lines += [_row("", f"warning: {message}", 2) for message in entry.get("warnings", [])]
    gpu = info["gpu"]
    lines += ["", "GPUs (driver)"]
    if gpu.get("driver_cuda"):
        lines.append(_row("driver CUDA", gpu["driver_cuda"], 2))
    for row in gpu.get("gpus", []):
        details = [f"compute capability {row['compute_cap']}" if "compute_cap" in row else None,
                   f"{row['memory_mib']} MiB" if "memory_mib" in row else None,
                   f"driver {row['driver_version']}" if "driver_version" in row else None]
        lines.append(_row(f"GPU {row.get('index')}", f"{row.get('name')}: "
                          + ", ".join(d for d in details if d), 2))
    for key in ("error", "reason"):
        if gpu.get(key):
            lines.append(_row("none" if key == "reason" else "nvidia-smi", gpu[key], 2))
    if info.get("environment"):
        lines += ["", "Environment"] + [_row(name, value, 2) for name, value in info["environment"].items()]
    return "\n".join(lines)


def _row(label: str, value, indent: int = 0) -> str:
    return f"{' ' * indent}{label:<{16 - indent}} {value}"


def _yes_no(value) -> str:
    return "yes" if value else "no"


def _runtime_text(name: str, entry: dict) -> str:
    if not entry.get("installed"):
        return "not installed" + (f" ({entry['error']})" if entry.get("error") else "")
    version = entry.get("version") or "?"
    sources = entry.get("distributions") or []
    # the providing packages when they say more than the version does: a CPU or GPU build, or two that shadow
    shown = len(sources) > 1 or any(source.split(" ")[0] != name for source in sources)
    head = version + (f" (from {', '.join(sources)})" if shown else "")
    if "error" in entry:
        return f"{head}: cannot be used: {entry['error']}"
    details = {
        "onnxruntime": lambda: f"providers {', '.join(entry.get('providers', []))}",
        "faiss": lambda: f"GPU support {_yes_no(entry.get('gpu_support'))}, {entry.get('gpus', 0)} GPUs",
        "torch": lambda: f"CUDA {entry.get('cuda')}, available {_yes_no(entry.get('cuda_available'))}, "
                         f"{entry.get('gpus', 0)} GPUs"
                         + "".join(f"; {d['index']}: {d['name']} ({d['compute_capability']})"
                                   for d in entry.get("devices", [])),
        "torchvision": lambda: f"GPU JPEG decode {_yes_no(entry.get('gpu_jpeg_decode'))}",
        "cupy": lambda: f"{entry.get('gpus', 0)} GPUs"
                        + (f" ({entry['gpus_error']})" if entry.get("gpus_error") else ""),
    }.get(name)
    return head + (f": {details()}" if details else "")
