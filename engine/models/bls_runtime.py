"""A Runtime that runs a model of the same Triton server from inside a python-backend model (business logic
scripting, BLS).

The server-side segmentation model (engine.export.triton_segment_model) gives its Engine a backbone whose runtime is
this one: the backbone's checks, padding and bucketing stay the engine's, only the graph runs in the server's own
backbone model (ONNX Runtime, TensorRT or python variant), so the server batches and places it as it does for any
client.

On a GPU instance (`device_outputs=True`) `run_on_device` hands the backbone's outputs to the engine as torch CUDA
tensors: a BLS output the server left in GPU memory is taken through DLPack without a copy, one in host memory is
copied up once, so either placement works. Where a BLS output lives is the python backend's choice: by default where
the called model put it, and on servers whose `InferenceRequest` takes `preferred_memory` (23.04 on) this runtime
asks for GPU memory on its own device. (FORCE_CPU_ONLY_INPUT_TENSORS "no", which the GPU segmentation config sets,
governs the calling model's own request inputs, which then may arrive in GPU memory too; not BLS outputs.)
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from ..errors import InputError, ModelError
from .runtime import Runtime


class BLSRuntime(Runtime):
    """Runs `model_name` of the server this python-backend model lives in.

    input_names / output_names: the model's tensors (the backbone spec's names).
    pb_utils: the python backend's `triton_python_backend_utils` module (imported here when None; tests pass a fake).
    timeout_ms: per-call timeout (0: none).
    device_outputs: whether the engine should take the outputs on the device (`keeps_outputs_on_device`), through
        `run_on_device`; `run` gives NumPy arrays either way.
    device: where `run_on_device` puts the outputs: the model instance's GPU ("cuda:N"), or "cpu".
    """

    name = "triton-bls"

    def __init__(self, model_name: str, input_names: Sequence[str], output_names: Sequence[str], pb_utils=None,
                 timeout_ms: int = 0, device_outputs: bool = False, device: str = "cuda") -> None:
        kind, _, index = str(device).partition(":")
        if kind not in ("cpu", "cuda") or (index and (kind == "cpu" or not index.isdigit())):
            raise InputError(f"BLS runtime device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
        if pb_utils is None:
            import triton_python_backend_utils as pb_utils  # only inside tritonserver's python backend stub
        self.pb_utils = pb_utils
        self.model_name = model_name
        self.input_names = list(input_names)
        self.output_names = list(output_names)
        self.timeout_ms = int(timeout_ms)
        self.keeps_outputs_on_device = bool(device_outputs)
        self.device = str(device)

    def run(self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        return {name: tensor.as_numpy() for name, tensor in self._exec(inputs, outputs, on_device=False).items()}

    def run_on_device(self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict:
        """As `run`, the outputs as float32 torch tensors on `device`: GPU outputs through DLPack (no host copy),
        host outputs copied up once."""
        try:
            import torch
        except ImportError as error:
            raise ModelError("BLS outputs on the device need torch in the server's python environment") from error
        results = {}
        for name, tensor in self._exec(inputs, outputs, on_device=True).items():
            if tensor.is_cpu():
                taken = torch.from_numpy(tensor.as_numpy())
            else:
                taken = torch.from_dlpack(tensor.to_dlpack())  # shares the server's GPU buffer
            results[name] = taken.to(self.device, torch.float32)  # no-op when already there as float32
        return results

    def _exec(self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None, on_device: bool) -> dict:
        """One BLS request; {requested output name: the python backend's tensor}."""
        requested = self._check_request(inputs, outputs)
        pb = self.pb_utils
        tensors = [pb.Tensor(name, np.ascontiguousarray(inputs[name])) for name in self.input_names]
        options = {"timeout": self.timeout_ms} if self.timeout_ms else {}
        if on_device and self.device != "cpu" and hasattr(pb, "PreferredMemory"):
            # outputs in this instance's GPU memory, whatever device the called model used (python backend 23.04+)
            index = int(self.device.partition(":")[2] or 0)
            options["preferred_memory"] = pb.PreferredMemory(pb.TRITONSERVER_MEMORY_GPU, index)
        request = pb.InferenceRequest(model_name=self.model_name, inputs=tensors, requested_output_names=requested,
                                      **options)
        response = request.exec()
        if response.has_error():
            shapes = {name: list(np.shape(inputs[name])) for name in self.input_names}
            raise ModelError(f"model {self.model_name!r} of this server failed on {shapes}: "
                             f"{response.error().message()}")
        results = {}
        for name in requested:
            tensor = pb.get_output_tensor_by_name(response, name)
            if tensor is None:
                raise ModelError(f"model {self.model_name!r} of this server returned no {name!r}")
            results[name] = tensor
        return results

    def describe(self) -> dict:
        described = {**super().describe(), "model": self.model_name}
        if self.keeps_outputs_on_device:
            described["device"] = self.device
        return described
