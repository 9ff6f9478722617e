"""A Runtime that runs a model of the same Triton server from inside a python-backend model (business logic
scripting, BLS).

The server-side segmentation model (engine.export.triton_segment_model) gives its Engine a backbone whose runtime is
this one: the backbone's checks, padding and bucketing stay the engine's, only the graph runs in the server's own
backbone model (ONNX Runtime, TensorRT or python variant), so the server batches and places it as it does for any
client.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from ..errors import ModelError
from .runtime import Runtime


class BLSRuntime(Runtime):
    """Runs `model_name` of the server this python-backend model lives in.

    input_names / output_names: the model's tensors (the backbone spec's names).
    pb_utils: the python backend's `triton_python_backend_utils` module (imported here when None; tests pass a fake).
    timeout_ms: per-call timeout (0: none).
    """

    name = "triton-bls"

    def __init__(self, model_name: str, input_names: Sequence[str], output_names: Sequence[str], pb_utils=None,
                 timeout_ms: int = 0) -> None:
        if pb_utils is None:
            import triton_python_backend_utils as pb_utils  # only inside tritonserver's python backend stub
        self.pb_utils = pb_utils
        self.model_name = model_name
        self.input_names = list(input_names)
        self.output_names = list(output_names)
        self.timeout_ms = int(timeout_ms)

    def run(self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        requested = self._check_request(inputs, outputs)
        pb = self.pb_utils
        tensors = [pb.Tensor(name, np.ascontiguousarray(inputs[name])) for name in self.input_names]
        options = {"timeout": self.timeout_ms} if self.timeout_ms else {}
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
            results[name] = tensor.as_numpy()
        return results

    def describe(self) -> dict:
        return {**super().describe(), "model": self.model_name}
