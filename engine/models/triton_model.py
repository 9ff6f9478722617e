"""What a Triton server states about one model, and the check of a request against it before it is sent.

TritonRuntime reads a model's metadata and config once (over HTTP or gRPC, as JSON) and keeps them as a ServedModel:
its tensors, max_batch_size, string parameters and the limits the config states as parameters (`min_side` /
`max_side` of an image's padded side, e.g. a TensorRT plan's optimisation profile). `check` turns a mismatch into an
InputError naming the input, the limit and the model, instead of a server round trip.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from ..errors import InputError, ModelError

#: Triton data types the runtime sends, as NumPy types
DTYPES = {"FP32": np.float32, "FP16": np.float16, "FP64": np.float64, "INT64": np.int64, "INT32": np.int32,
          "INT8": np.int8, "UINT8": np.uint8, "BOOL": np.bool_}
#: config parameters that state limits on an image input's padded side
LIMIT_PARAMETERS = ("min_side", "max_side")


@dataclass(frozen=True)
class ServedModel:
    """One model as its server states it.

    inputs, outputs: {name: (shape with the batch dimension when the model batches (-1 = any), Triton data type)}.
    max_batch_size: the config's (0: the model does not batch). parameters: the config's, as strings.
    limits: {"min_side" / "max_side": int} of those parameters that are stated.
    """

    name: str
    inputs: dict[str, tuple[list[int], str]]
    outputs: dict[str, tuple[list[int], str]]
    max_batch_size: int = 0
    parameters: dict[str, str] | None = None
    limits: dict[str, int] | None = None
    platform: str = ""

    @classmethod
    def from_answers(cls, name: str, metadata: dict, config: dict) -> "ServedModel":
        """From the server's JSON answers to get_model_metadata and get_model_config; ModelError on a limit
        parameter that is not an integer."""
        parameters = {key: (value.get("string_value", "") if isinstance(value, dict) else str(value))
                      for key, value in (config.get("parameters") or {}).items()}
        limits = {}
        for key in LIMIT_PARAMETERS:
            value = parameters.get(key, "")
            if value:
                if not value.strip().isdigit():
                    raise ModelError(f"Triton model {name}: config parameter {key} {value!r} is not an integer")
                limits[key] = int(value)

        def tensors(entries) -> dict[str, tuple[list[int], str]]:
            return {t["name"]: ([int(d) for d in t["shape"]], t["datatype"]) for t in entries}

        return cls(name, tensors(metadata["inputs"]), tensors(metadata["outputs"]),
                   int(config.get("max_batch_size", 0) or 0), parameters, limits, metadata.get("platform", ""))

    def check(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The request's arrays checked against the model's tensors and limits (cast where safe), contiguous; or
        InputError naming the input."""
        checked, batch = {}, None
        for name, (shape, datatype) in self.inputs.items():
            array = np.asarray(inputs[name])
            dtype = DTYPES.get(datatype)
            if dtype is None:
                raise ModelError(f"Triton model {self.name}: input {name!r} has unsupported type {datatype}")
            if array.dtype != dtype:
                if not np.can_cast(array.dtype, dtype, "same_kind"):
                    raise InputError(f"input {name!r}: dtype {array.dtype} cannot be sent as {datatype} to Triton "
                                     f"model {self.name}")
                array = array.astype(dtype)
            # the metadata's shape includes the batch dimension (-1) when the model batches
            if array.ndim != len(shape) or any(want != -1 and want != got for want, got in zip(shape, array.shape)):
                raise InputError(f"input {name!r}: shape {tuple(array.shape)} does not fit Triton model "
                                 f"{self.name}'s {tuple(shape)} (-1 = any)")
            self._check_limits(name, array.shape, shape)
            if self.max_batch_size:
                if batch is not None and array.shape[0] != batch:
                    raise InputError(f"inputs disagree on the batch size: {array.shape[0]} vs {batch}")
                batch = array.shape[0]
                if batch == 0:
                    raise InputError(f"input {name!r}: empty batch")
            checked[name] = np.ascontiguousarray(array)
        return checked

    def _check_limits(self, name: str, got: tuple, want: Sequence[int]) -> None:
        """The config's min_side / max_side against an image input's padded H and W (the two dynamic dims of a
        (batch, H, W, C) input); InputError naming the limit and the model."""
        if not self.limits or len(want) != 4 or list(want[1:3]) != [-1, -1]:
            return
        height, width = int(got[1]), int(got[2])
        top, bottom = self.limits.get("max_side"), self.limits.get("min_side")
        if top is not None and max(height, width) > top:
            raise InputError(f"input {name!r}: padded image {height} x {width} exceeds max_side {top} of Triton "
                             f"model {self.name} (a limit in its config, e.g. its TensorRT profile): downscale the "
                             f"image, or serve a model made for larger images (moduseg triton-repo --max-side N)")
        if bottom is not None and min(height, width) < bottom:
            raise InputError(f"input {name!r}: padded image {height} x {width} is below min_side {bottom} of Triton "
                             f"model {self.name}")
