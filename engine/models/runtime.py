"""Runtimes: the layer that only runs arrays through a model (onnxruntime, torch; a Triton client later).

Every runtime has the same face: `input_names`, `output_names` and `run({name: array}) -> {name: array}`, with numpy
arrays in and out. The backbones and proposers above them own every other step (checks, padding, batching,
normalisation), so swapping the runtime never changes what a model computes.
"""

from __future__ import annotations

import abc
import os
from typing import Mapping, Sequence

import numpy as np

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

    Raises ModelError when the installed onnxruntime lacks the provider (CUDA/TensorRT need onnxruntime-gpu).
    """
    import onnxruntime as ort

    if device not in DEVICES:
        raise InputError(f"device must be one of {DEVICES}, got {device!r}")
    wanted = {"cpu": [], "cuda": ["CUDAExecutionProvider"],
              "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider"]}[device]
    available = ort.get_available_providers()
    missing = [p for p in wanted if p not in available]
    if missing:
        raise ModelError(f"onnxruntime {ort.__version__} has no {missing} (available: {available}); "
                         f"install onnxruntime-gpu (not together with onnxruntime) to run on {device}")
    return wanted + ["CPUExecutionProvider"]


class OnnxRuntime(Runtime):
    """An onnxruntime InferenceSession over an ONNX file (or serialized model bytes).

    model: path to the .onnx file, or its bytes.
    device: "cpu", "cuda" (CUDAExecutionProvider) or "tensorrt" (TensorrtExecutionProvider, CUDA as fallback).
    num_threads: intra-op threads; 0 lets onnxruntime choose (one per physical core).
    """

    name = "onnxruntime"

    def __init__(self, model: str | os.PathLike | bytes, device: str = "cpu", num_threads: int = 0) -> None:
        try:
            import onnxruntime as ort
        except ImportError as error:  # pragma: no cover - a core dependency
            raise ModelError("the onnxruntime runtime needs the onnxruntime package") from error
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
        if device not in ("cpu", "cuda"):
            raise InputError(f"the torch runtime runs on 'cpu' or 'cuda', got {device!r}")
        if device == "cuda" and not torch.cuda.is_available():
            raise ModelError("torch runtime: device 'cuda' requested but torch sees no CUDA GPU")
        if num_threads < 0:
            raise InputError(f"num_threads must be >= 0, got {num_threads}")
        if num_threads:
            torch.set_num_threads(int(num_threads))
        self._torch = torch
        self.module = module.eval().to(device)
        self.device = device
        self.input_names = list(input_names)
        self.output_names = list(output_names)

    def run(self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
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
        return {name: named[name].detach().float().cpu().numpy() for name in requested}

    def describe(self) -> dict:
        return {**super().describe(), "device": self.device}
