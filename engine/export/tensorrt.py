"""TensorRT engines (plans) from the exported backbone ONNX, and a TensorRTRuntime that runs one.

The build parses the ONNX graph with TensorRT's parser, builds in fp16 while keeping the normalisation layers (and the
reductions and softmax they feed on) in fp32, and gives the dynamic input one optimisation profile per entry of
`profiles` (batch and padded H/W ranges; the engine pads to a multiple of the stride, so every size in range occurs).

TensorRT cannot be installed in this workplace and needs an NVIDIA GPU: `tensorrt` is imported only after a GPU check
(constructing trt.Runtime without a GPU and deleting it segfaults), and every entry point raises ModelError with the
reason elsewhere. A plan is specific to the TensorRT version and GPU that built it: build it with the TensorRT of the
server that will load it (docs/serving.md), e.g. inside the NGC tritonserver container.

    python -m engine.export.tensorrt --backbone effnet-lite2/block19 --out model.plan
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ..errors import InputError, ModelError
from ..models.runtime import Runtime


@dataclass(frozen=True)
class ShapeProfile:
    """One TensorRT optimisation profile of the image input: (batch, 3, H, W) at minimum, optimum and maximum."""

    min: tuple[int, int, int, int]
    opt: tuple[int, int, int, int]
    max: tuple[int, int, int, int]

    def __post_init__(self) -> None:
        if not all(len(s) == 4 for s in (self.min, self.opt, self.max)) or \
                not all(a <= b <= c for a, b, c in zip(self.min, self.opt, self.max)) or min(self.min) < 1:
            raise InputError(f"shape profile needs positive (B, 3, H, W) with min <= opt <= max, got "
                             f"{self.min} / {self.opt} / {self.max}")


def default_profiles(stride: int, max_batch_size: int = 8) -> list[ShapeProfile]:
    """Batch 1..max_batch_size; padded H/W from one stride up to 1024 rounded up to the stride (VOC images are at most
    500 px a side, COCO 640; ADE20K's largest go beyond and need a larger max), optimum at batch 4, 384x512."""
    top = -(-1024 // stride) * stride
    opt_h, opt_w = -(-384 // stride) * stride, -(-512 // stride) * stride
    return [ShapeProfile((1, 3, stride, stride), (min(4, max_batch_size), 3, opt_h, opt_w),
                         (max_batch_size, 3, top, top))]


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


def tensorrt_unavailable_reason() -> str | None:
    """None when TensorRT can run here (a GPU and the tensorrt package), else why not."""
    reason = gpu_unavailable_reason()
    if reason is not None:
        return f"TensorRT needs an NVIDIA GPU: {reason}"
    if importlib.util.find_spec("tensorrt") is None:
        return "the tensorrt Python package is not installed (pip install tensorrt, on a machine with a GPU)"
    return None


def _tensorrt():
    reason = tensorrt_unavailable_reason()
    if reason is not None:
        raise ModelError(reason)
    import tensorrt as trt  # only after the GPU check

    return trt


class _Logger:
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


def _keep_fp32(trt, layer) -> bool:
    """Normalisation layers and the reductions / softmax / pow / sqrt of decomposed normalisations stay in fp32: in
    fp16 their sums of squares overflow or lose the small variances."""
    kinds = {getattr(trt.LayerType, n) for n in ("NORMALIZATION", "REDUCE", "SOFTMAX") if hasattr(trt.LayerType, n)}
    if layer.type in kinds:
        return True
    name = layer.name.lower()
    return any(key in name for key in ("norm", "layernorm", "batchnorm", "reducemean", "pow", "sqrt", "softmax"))


def build_engine(onnx_path: str | os.PathLike, plan_path: str | os.PathLike, backbone: str | None = None,
                 profiles: Sequence[ShapeProfile] | None = None, max_batch_size: int = 8, fp16: bool = True,
                 workspace_gib: float = 4.0) -> dict:
    """Build a TensorRT plan from `onnx_path` and write it to `plan_path`; returns build facts.

    backbone: the backbone name, for its stride (default profiles) and input name.
    profiles: optimisation profiles of the image input (default: default_profiles(stride, max_batch_size)).
    fp16: allow fp16 kernels, normalisation layers pinned to fp32 (see _keep_fp32); False builds fp32 only.
    workspace_gib: builder scratch memory limit.
    """
    trt = _tensorrt()
    from ..models.backbones import DEFAULT_BACKBONE, _spec

    spec = _spec(backbone or DEFAULT_BACKBONE)
    profiles = list(profiles or default_profiles(spec.stride, max_batch_size))
    logger = _Logger(trt)
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH"):  # implicit in TensorRT 10, required before
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(Path(onnx_path).read_bytes()):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise ModelError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    pinned = 0
    if fp16:
        if not builder.platform_has_fast_fp16:
            raise ModelError("this GPU has no fast fp16; build with fp16=False")
        config.set_flag(trt.BuilderFlag.FP16)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        for index in range(network.num_layers):
            layer = network.get_layer(index)
            if _keep_fp32(trt, layer):
                layer.precision = trt.float32
                for out in range(layer.num_outputs):
                    if layer.get_output(out).dtype in (trt.float32, trt.float16):
                        layer.set_output_type(out, trt.float32)
                pinned += 1
    for shape in profiles:
        profile = builder.create_optimization_profile()
        profile.set_shape(spec.input_name, shape.min, shape.opt, shape.max)
        config.add_optimization_profile(profile)
    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ModelError(f"TensorRT failed to build {onnx_path}: {logger.messages[-10:]}")
    plan_path = Path(plan_path)
    tmp = plan_path.with_name(plan_path.name + ".tmp")
    tmp.write_bytes(bytes(serialized))
    os.replace(tmp, plan_path)
    return {"plan": str(plan_path), "tensorrt": trt.__version__, "fp16": fp16, "fp32_layers": pinned,
            "layers": network.num_layers, "profiles": [vars(p) for p in profiles],
            "build_seconds": round(time.perf_counter() - start, 1), "size": plan_path.stat().st_size}


class TensorRTRuntime(Runtime):
    """Runs a TensorRT plan on the GPU with torch CUDA tensors as buffers (the runtime face: numpy in and out).

    plan: path of the serialized engine (built by build_engine with this TensorRT version, on this GPU model).
    Each call picks the first optimisation profile whose range holds the input shape.
    """

    name = "tensorrt"

    def __init__(self, plan: str | os.PathLike) -> None:
        trt = _tensorrt()
        try:
            import torch
        except ImportError as error:
            raise ModelError("TensorRTRuntime uses torch CUDA tensors as buffers: install torch with CUDA") from error
        if not torch.cuda.is_available():
            raise ModelError("TensorRTRuntime: torch sees no CUDA GPU")
        self._trt, self._torch = trt, torch
        self._logger = _Logger(trt)
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
                   self._trt.int32: torch.int32, self._trt.int64: torch.int64}
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

    def run(self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
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
            self._stream.synchronize()
        return {name: results[name].float().cpu().numpy() for name in requested}

    def describe(self) -> dict:
        return {**super().describe(), "plan": self.plan, "tensorrt": self._trt.__version__,
                "profiles": self.engine.num_optimization_profiles}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="build a TensorRT plan of a backbone's exported ONNX graph")
    parser.add_argument("--backbone", default=None, help="backbone name (default: effnet-lite2/block19)")
    parser.add_argument("--onnx", default=None, help="ONNX file (default: the cached export of the backbone)")
    parser.add_argument("--out", required=True, help="plan file to write (Triton: <repo>/<model>/1/model.plan)")
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--fp32", action="store_true", help="no fp16 kernels")
    args = parser.parse_args(argv)
    try:
        from ..models.backbones import DEFAULT_BACKBONE, model_path

        onnx_path = args.onnx or model_path(args.backbone or DEFAULT_BACKBONE)
        info = build_engine(onnx_path, args.out, backbone=args.backbone, max_batch_size=args.max_batch_size,
                            fp16=not args.fp32)
    except (ModelError, InputError) as error:
        print(f"tensorrt: error: {error}", file=sys.stderr)
        return 2
    print(info)
    return 0


if __name__ == "__main__":
    sys.exit(main())
