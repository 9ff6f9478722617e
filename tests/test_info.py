"""engine.info and `moduseg info`: the report's keys and types, its JSON and text through the command, a broken probe
or a missing extension still giving a report, and the CI check that a build on a machine with nvcc holds the CUDA
kernels for every architecture the README promises."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import engine
from engine import info as engine_info

#: what CMakeLists.txt builds by default when it finds nvcc (README: install)
ARCHITECTURES = ("sm_75", "sm_80", "sm_86", "sm_89", "sm_90", "compute_90")
CUDA_OPS = ("soft_mask_pool", "mask_nms_raster", "vote", "slic", "rac_merge")
#: the values of MODUSEG_CUDA that CMakeLists.txt reads as "build without CUDA"
CUDA_OFF = re.compile(r"^(0|OFF|off|no|NO|false|FALSE)$")


@pytest.fixture(scope="module")
def report():
    return engine_info.collect()


def moduseg(*args) -> subprocess.CompletedProcess:
    # from tests/, as the suite runs, so that the installed package is the one imported
    return subprocess.run([sys.executable, "-m", "engine.cli", *args], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).parent)


def test_collect_keys_and_types(report):
    assert json.loads(json.dumps(report)) == report  # plain JSON values only
    assert report["engine"]["version"] == engine.__version__
    assert report["python"]["executable"] and isinstance(report["python"]["version"], str)
    assert {"system", "machine"} <= set(report["platform"]) and isinstance(report["numpy"]["version"], str)

    kernels = report["cuda_kernels"]
    assert set(kernels) == {"built", "architectures", "ops"}
    assert isinstance(kernels["built"], bool)
    assert all(isinstance(kernels[key], list) for key in ("architectures", "ops"))
    if not kernels["built"]:
        assert kernels["architectures"] == [] and kernels["ops"] == []

    extension = report["extension"]
    assert isinstance(extension["built"], bool)
    if extension["built"]:
        assert isinstance(extension["openmp"], bool) and "merge_regions" in extension["cpu_ops"]
        assert extension["gpus"] is None or extension["gpus"] >= 0
        assert (extension["cuda_runtime"] is not None) == kernels["built"]
    else:
        assert extension["error"] and not kernels["built"]

    assert list(report["runtimes"]) == list(engine_info.RUNTIMES)
    for name, entry in report["runtimes"].items():
        assert isinstance(entry["installed"], bool), name
        if entry["installed"] and "error" not in entry:
            assert entry["version"], name
    faiss = report["runtimes"]["faiss"]
    if faiss["installed"] and "error" not in faiss:
        assert isinstance(faiss["gpu_support"], bool) and faiss["gpus"] >= 0
    torch = report["runtimes"]["torch"]
    if torch["installed"] and "error" not in torch:
        assert isinstance(torch["cuda_available"], bool) and len(torch["devices"]) == torch["gpus"]
    gpu = report["gpu"]
    assert isinstance(gpu["gpus"], list) and (gpu["gpus"] or gpu.get("reason") or gpu.get("error"))


def test_info_json_command():
    done = moduseg("info", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert set(report["cuda_kernels"]) == {"built", "architectures", "ops"}
    assert report["engine"]["version"] == engine.__version__


def test_info_text_command():
    done = moduseg("info")
    assert done.returncode == 0, done.stderr
    assert f"moduseg-engine {engine.__version__}" in done.stdout
    for section in ("Compiled extension (engine._C)", "Runtimes", "GPUs (driver)"):
        assert section in done.stdout
    assert "CUDA kernels" in done.stdout or "built          no" in done.stdout


def test_a_failing_probe_is_recorded_not_raised(monkeypatch, report):
    def broken():
        raise RuntimeError("cannot load libfaiss_gpu.so")

    monkeypatch.setattr(engine_info, "_PROBES", {**engine_info._PROBES, "faiss": broken})
    find_spec = engine_info.importlib.util.find_spec  # faiss "installed" whether it is here or not
    monkeypatch.setattr(engine_info.importlib.util, "find_spec",
                        lambda name: object() if name == "faiss" else find_spec(name))
    entry = engine_info._runtime("faiss", {"faiss": ["faiss-gpu-cu12"]})
    assert entry["installed"] and entry["error"] == "RuntimeError: cannot load libfaiss_gpu.so"
    text = engine_info.format_text({**report, "runtimes": {**report["runtimes"], "faiss": entry}})
    assert "faiss" in text and "cannot be used: RuntimeError: cannot load libfaiss_gpu.so" in text


def test_a_missing_extension_is_reported(monkeypatch, report):
    monkeypatch.delattr(engine, "_C", raising=False)
    monkeypatch.setitem(sys.modules, "engine._C", None)  # the import system's "not importable"
    extension, kernels = engine_info._extension()
    assert extension["built"] is False and "engine._C" in extension["error"]
    assert kernels == {"built": False, "architectures": [], "ops": []}
    text = engine_info.format_text({**report, "extension": extension, "cuda_kernels": kernels})
    assert f"built          no: {extension['error']}" in text


@pytest.mark.parametrize("old_driver", [False, True])
def test_driver_gpus_from_nvidia_smi(tmp_path, monkeypatch, report, old_driver):
    # a stand-in nvidia-smi: what a driver prints for the query; one before 510 refuses the compute_cap field
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\n"
                    + ('case "$*" in *compute_cap*) echo \'Field "compute_cap" is not a valid field to query.\'; '
                       'exit 2;; esac\necho "0, NVIDIA H200, 470.82, 143771"\n' if old_driver
                       else 'echo "0, NVIDIA H200, 580.65.06, 143771, 9.0"\necho "1, NVIDIA L4, 580.65.06, 23034, 8.9"\n'))
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ.get('PATH', '')}")
    gpu = engine_info._driver_gpus()
    assert gpu["nvidia_smi"] == str(fake) and "error" not in gpu and "reason" not in gpu
    if old_driver:
        assert gpu["gpus"] == [{"index": "0", "name": "NVIDIA H200", "driver_version": "470.82", "memory_mib": "143771"}]
    else:
        assert [row["name"] for row in gpu["gpus"]] == ["NVIDIA H200", "NVIDIA L4"]
        assert gpu["gpus"][1] == {"index": "1", "name": "NVIDIA L4", "driver_version": "580.65.06",
                                  "memory_mib": "23034", "compute_cap": "8.9"}
    text = engine_info.format_text({**report, "gpu": gpu})
    assert "  GPU 0          NVIDIA H200: " in text and ("compute capability 9.0" in text) != old_driver


def _cuda_build_expected() -> str | None:
    """None when `pip install .` must have built the CUDA launchers here, else why not."""
    if shutil.which("nvcc") is None:
        return "no nvcc on PATH: the extension was built with CPU launchers only"
    if CUDA_OFF.match(os.environ.get("MODUSEG_CUDA", "")):
        return f"MODUSEG_CUDA={os.environ['MODUSEG_CUDA']}: the CUDA launchers were switched off"
    return None


def test_cuda_kernels_were_built(report):
    """The CI check of the install: with nvcc found (and CUDA not switched off) the extension holds every CUDA op for
    every default architecture. A build made with -Ccmake.define.MODUSEG_CUDA=OFF on such a machine fails here: set
    MODUSEG_CUDA=0 in the environment instead, which the test reads."""
    reason = _cuda_build_expected()
    if reason is not None:
        pytest.skip(reason)
    kernels = report["cuda_kernels"]
    assert report["extension"]["built"], report["extension"].get("error")
    assert kernels["built"] is True, f"nvcc is at {shutil.which('nvcc')} but engine._C has no CUDA launchers"
    assert set(ARCHITECTURES) <= set(kernels["architectures"]), kernels["architectures"]
    assert set(CUDA_OPS) <= set(kernels["ops"]), kernels["ops"]
