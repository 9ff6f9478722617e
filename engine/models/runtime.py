"""Runtimes: the layer that only runs arrays through a model (onnxruntime, torch, TensorRT; the Triton client is in
engine.models.triton_runtime).

Every runtime has the same face: `input_names`, `output_names` and `run({name: array}) -> {name: array}`, with numpy
arrays in and out. The backbones above them own every other step (checks, padding, batching), and the graphs
normalise their own uint8 input, so swapping the runtime never changes what a model computes.
"""

from __future__ import annotations

import abc
import ctypes
import importlib.util
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ..deps import check_torch_device, require
from ..errors import InputError, ModelError

#: device names accepted by the runtimes; "tensorrt" exists for onnxruntime only.
DEVICES = ("cpu", "cuda", "tensorrt")


class Runtime(abc.ABC):
    """Runs named numpy arrays through one model and returns named numpy arrays.

    input_names / output_names: the model's graph inputs and outputs, in the model's order.
    name: the runtime's kind ("onnxruntime", "torch", ...), recorded in benchmarks and error messages.
    """

    name: str
    input_names: list[str]
    output_names: list[str]

    @abc.abstractmethod
    def run(self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Run the model on `inputs` (every input name, numpy arrays) and return the requested `outputs` (default:
        all outputs) as numpy arrays keyed by name."""

    def _check_request(self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None) -> list[str]:
        missing = [name for name in self.input_names if name not in inputs]
        if missing:
            raise InputError(f"{self.name} runtime: missing inputs {missing}; the model takes {self.input_names}")
        requested = list(self.output_names if outputs is None else outputs)
        unknown = [name for name in requested if name not in self.output_names]
        if unknown:
            raise InputError(f"{self.name} runtime: unknown outputs {unknown}; the model gives {self.output_names}")
        return requested

    def describe(self) -> dict:
        return {"runtime": self.name, "inputs": list(self.input_names), "outputs": list(self.output_names)}


def onnxruntime_providers(device: str = "cpu") -> list:
    """The onnxruntime execution providers for `device`, falling back to CPU inside onnxruntime for unsupported ops.

    Raises ModelError when the installed onnxruntime lacks the provider (CUDA/TensorRT need onnxruntime-gpu), or when
    neither onnxruntime nor onnxruntime-gpu is installed (naming the extra).
    """
    ort = require("onnxruntime", "the onnxruntime runtime")

    kind, _, index = str(device).partition(":")
    if kind not in DEVICES or (index and not index.isdigit()):
        raise InputError(f"device must be one of {DEVICES} (or 'cuda:N'), got {device!r}")
    wanted = {"cpu": [], "cuda": ["CUDAExecutionProvider"],
              "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider"]}[kind]
    available = ort.get_available_providers()
    missing = [p for p in wanted if p not in available]
    if missing:
        raise ModelError(f"onnxruntime {ort.__version__} has no {missing} (available: {available}); "
                         f"install 'moduseg-engine[gpu]' (onnxruntime-gpu; uninstall onnxruntime first: both "
                         f"provide the same module) to run on {device}")
    options = {"device_id": int(index)} if index else {}
    return [(provider, options) for provider in wanted] + ["CPUExecutionProvider"]


class OnnxRuntime(Runtime):
    """An onnxruntime InferenceSession over an ONNX file (or serialized model bytes).

    model: path to the .onnx file, or its bytes.
    device: "cpu", "cuda" (CUDAExecutionProvider) or "tensorrt" (TensorrtExecutionProvider, CUDA as fallback).
    num_threads: intra-op threads; 0 lets onnxruntime choose (one per physical core).
    """

    name = "onnxruntime"

    def __init__(self, model: str | os.PathLike | bytes, device: str = "cpu", num_threads: int = 0) -> None:
        ort = require("onnxruntime", "the onnxruntime runtime")
        if num_threads < 0:
            raise InputError(f"num_threads must be >= 0, got {num_threads}")
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(num_threads)
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        source = model if isinstance(model, bytes) else os.fspath(model)
        try:
            self.session = ort.InferenceSession(source, options, providers=onnxruntime_providers(device))
        except ModelError:
            raise
        except Exception as error:  # onnxruntime raises its own exception types for corrupt or invalid graphs
            where = "model bytes" if isinstance(model, bytes) else os.fspath(model)
            raise ModelError(f"onnxruntime cannot load {where}: {error}") from error
        self.device = device
        self.num_threads = int(num_threads)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        requested = self._check_request(inputs, outputs)
        feed = {name: np.ascontiguousarray(inputs[name]) for name in self.input_names}
        try:
            results = self.session.run(requested, feed)
        except Exception as error:
            shapes = {name: tuple(array.shape) for name, array in feed.items()}
            raise ModelError(f"onnxruntime failed on inputs {shapes}: {error}") from error
        return dict(zip(requested, results))

    def describe(self) -> dict:
        return {**super().describe(), "device": self.device, "providers": self.session.get_providers(),
                "num_threads": self.num_threads}


class TorchRuntime(Runtime):
    """A torch nn.Module run under no_grad on "cpu" or "cuda".

    module: called with the inputs as positional tensors in `input_names` order; returns one tensor or a tuple/list
        of tensors in `output_names` order.
    num_threads: torch intra-op threads (process-wide in torch); 0 leaves torch's setting alone.
    """

    name = "torch"

    def __init__(self, module, input_names: Sequence[str], output_names: Sequence[str], device: str = "cpu",
                 num_threads: int = 0) -> None:
        try:
            import torch
        except ImportError as error:
            raise ModelError("the torch runtime needs torch (pip install 'moduseg-engine[export]')") from error
        if device != "cpu" and device.split(":")[0] != "cuda":
            raise InputError(f"the torch runtime runs on 'cpu' or 'cuda' ('cuda:N'), got {device!r}")
        check_torch_device(device)  # no GPU, or no kernel image for it: a clear ModelError before the first launch
        if num_threads < 0:
            raise InputError(f"num_threads must be >= 0, got {num_threads}")
        if num_threads:
            torch.set_num_threads(int(num_threads))
        self._torch = torch
        self.module = module.eval().to(device)
        self.device = device
        self.input_names = list(input_names)
        self.output_names = list(output_names)

    @property
    def keeps_outputs_on_device(self) -> bool:
        """Whether `run_on_device` leaves the outputs on a GPU (a CUDA device)."""
        return self.device != "cpu"

    def run(self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        return {name: tensor.cpu().numpy() for name, tensor in self.run_on_device(inputs, outputs).items()}

    def run_on_device(self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict:
        """As `run`, the outputs left as float32 tensors on the runtime's device (no copy back to the host)."""
        torch = self._torch
        requested = self._check_request(inputs, outputs)
        tensors = [torch.from_numpy(np.ascontiguousarray(inputs[name])).to(self.device) for name in self.input_names]
        with torch.inference_mode():
            result = self.module(*tensors)
        if isinstance(result, torch.Tensor):
            result = (result,)
        if len(result) != len(self.output_names):
            raise ModelError(f"torch runtime: the module returned {len(result)} outputs, expected "
                             f"{len(self.output_names)} ({self.output_names})")
        named = dict(zip(self.output_names, result))
        return {name: named[name].detach().float() for name in requested}

    def describe(self) -> dict:
        return {**super().describe(), "device": self.device}


# ----------------------------------------------------------------------------------------------------- TensorRT

def gpu_unavailable_reason() -> str | None:
    """None when the CUDA driver reports at least one GPU, else why not (checked through libcuda, no framework)."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return "no NVIDIA driver (libcuda.so.1 not found)"
    if cuda.cuInit(0) != 0:
        return "the CUDA driver found no usable GPU (cuInit failed)"
    count = ctypes.c_int(0)
    if cuda.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value < 1:
        return "the CUDA driver reports no GPU"
    return None


def cuda_device_info(index: int = 0) -> dict:
    """{"name", "compute_capability": "8.0"} of CUDA device `index`, read through libcuda (no framework), for naming
    a TensorRT plan after the GPU that built it; ModelError without a GPU."""
    reason = gpu_unavailable_reason()
    if reason is not None:
        raise ModelError(reason)
    cuda = ctypes.CDLL("libcuda.so.1")
    device, major, minor = ctypes.c_int(0), ctypes.c_int(0), ctypes.c_int(0)
    if cuda.cuDeviceGet(ctypes.byref(device), int(index)) != 0:
        raise ModelError(f"the CUDA driver has no device {index}")
    # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR = 75, _MINOR = 76 (cuda.h)
    cuda.cuDeviceGetAttribute(ctypes.byref(major), 75, device)
    cuda.cuDeviceGetAttribute(ctypes.byref(minor), 76, device)
    name = ctypes.create_string_buffer(256)
    cuda.cuDeviceGetName(name, 256, device)
    return {"name": name.value.decode(errors="replace"), "compute_capability": f"{major.value}.{minor.value}"}


def tensorrt_unavailable_reason() -> str | None:
    """None when TensorRT can run here (a GPU and the tensorrt package), else why not."""
    reason = gpu_unavailable_reason()
    if reason is not None:
        return f"TensorRT needs an NVIDIA GPU: {reason}"
    if importlib.util.find_spec("tensorrt") is None:
        return "the tensorrt Python package is not installed (pip install tensorrt, on a machine with a GPU)"
    return None


def tensorrt_module():
    reason = tensorrt_unavailable_reason()
    if reason is not None:
        raise ModelError(reason)
    import tensorrt as trt  # only after the GPU check

    return trt


class TensorRTLogger:
    """A TensorRT logger collecting warnings and errors for the exception messages."""

    def __new__(cls, trt):
        class Logger(trt.ILogger):
            def __init__(self):
                trt.ILogger.__init__(self)
                self.messages: list[str] = []

            def log(self, severity, msg):
                if severity <= trt.ILogger.Severity.WARNING:
                    self.messages.append(f"{severity.name}: {msg}")

        return Logger()


class TensorRTRuntime(Runtime):
    """Runs a TensorRT plan on the GPU with torch CUDA tensors as buffers (the runtime face: numpy in and out).

    plan: path of the serialized engine (built by build_engine with this TensorRT version, on this GPU model).
    Each call picks the first optimisation profile whose range holds the input shape.
    """

    name = "tensorrt"

    def __init__(self, plan: str | os.PathLike) -> None:
        trt = tensorrt_module()
        try:
            import torch
        except ImportError as error:
            raise ModelError("TensorRTRuntime uses torch CUDA tensors as buffers: install torch with CUDA") from error
        check_torch_device("cuda")
        self._trt, self._torch = trt, torch
        self._logger = TensorRTLogger(trt)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(Path(plan).read_bytes())
        if self.engine is None:
            raise ModelError(f"TensorRT cannot load {plan} (built by another TensorRT version or GPU?): "
                             f"{self._logger.messages[-5:]}")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.plan = str(plan)
        self._profile = -1
        self._stream = torch.cuda.Stream()

    def _dtype(self, name: str):
        torch = self._torch
        mapping = {self._trt.float32: torch.float32, self._trt.float16: torch.float16,
                   self._trt.int32: torch.int32, self._trt.int64: torch.int64, self._trt.uint8: torch.uint8}
        return mapping[self.engine.get_tensor_dtype(name)]

    def _choose_profile(self, shapes: Mapping[str, tuple]) -> int:
        for index in range(self.engine.num_optimization_profiles):
            if all(all(lo <= s <= hi for lo, s, hi in zip(self.engine.get_tensor_profile_shape(name, index)[0], shape,
                                                           self.engine.get_tensor_profile_shape(name, index)[2]))
                   for name, shape in shapes.items()):
                return index
        ranges = [{n: (tuple(self.engine.get_tensor_profile_shape(n, i)[0]),
                       tuple(self.engine.get_tensor_profile_shape(n, i)[2])) for n in shapes}
                  for i in range(self.engine.num_optimization_profiles)]
        raise InputError(f"TensorRT plan {self.plan}: input shapes {dict(shapes)} are outside every optimisation "
                         f"profile {ranges}; rebuild the plan with a larger profile")

    keeps_outputs_on_device = True

    def run(self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        return {name: tensor.cpu().numpy() for name, tensor in self.run_on_device(inputs, outputs).items()}

    def run_on_device(self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict:
        """As `run`, the outputs left as float32 CUDA tensors, ready on the caller's current stream."""
        torch = self._torch
        requested = self._check_request(inputs, outputs)
        shapes = {name: tuple(np.shape(inputs[name])) for name in self.input_names}
        profile = self._choose_profile(shapes)
        with torch.cuda.stream(self._stream):
            if profile != self._profile:
                self.context.set_optimization_profile_async(profile, self._stream.cuda_stream)
                self._profile = profile
            keep = []
            for name in self.input_names:
                tensor = torch.from_numpy(np.ascontiguousarray(inputs[name])).to("cuda", self._dtype(name))
                keep.append(tensor)
                self.context.set_input_shape(name, tensor.shape)
                self.context.set_tensor_address(name, tensor.data_ptr())
            results = {}
            for name in self.output_names:
                shape = tuple(self.context.get_tensor_shape(name))
                results[name] = torch.empty(shape, dtype=self._dtype(name), device="cuda")
                self.context.set_tensor_address(name, results[name].data_ptr())
            if not self.context.execute_async_v3(self._stream.cuda_stream):
                raise ModelError(f"TensorRT execution failed on inputs {shapes}: {self._logger.messages[-5:]}")
            floats = {name: results[name].float() for name in requested}
        caller = torch.cuda.current_stream()
        caller.wait_stream(self._stream)  # the caller's stream waits for the plan; the host does not
        for tensor in floats.values():  # made on the plan's stream, used on the caller's: not reused before that
            tensor.record_stream(caller)
        return floats

    def describe(self) -> dict:
        return {**super().describe(), "plan": self.plan, "tensorrt": self._trt.__version__,
                "profiles": self.engine.num_optimization_profiles}
