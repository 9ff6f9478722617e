"""TensorRT engines (plans) from the exported backbone ONNX (engine.models.runtime.TensorRTRuntime runs one).

The build parses the ONNX graph with TensorRT's parser, builds in fp16 while keeping the normalisation layers (and the
reductions and softmax they feed on) in fp32, and gives the dynamic input one optimisation profile per entry of
`profiles` (batch and padded H/W ranges; the engine pads to a multiple of the stride, so every size in range occurs).

TensorRT cannot be installed in this workplace and needs an NVIDIA GPU: `tensorrt` is imported only after a GPU check
(constructing trt.Runtime without a GPU and deleting it segfaults), and every entry point raises ModelError with the
reason elsewhere. A plan is specific to the TensorRT version and GPU that built it: build it with the TensorRT of the
server that will load it (docs/serving.md), e.g. inside the NGC tritonserver container.

    python export/build_tensorrt.py --backbone effnet-lite2/block19 --out model.plan
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..errors import InputError, ModelError
from ..models.runtime import TensorRTLogger, tensorrt_module
from ..registry import DEFAULT_BACKBONE, backbone_spec
from ..utils import ceil_div


@dataclass(frozen=True)
class ShapeProfile:
    """One TensorRT optimisation profile of the image input: (batch, H, W, 3) at minimum, optimum and maximum."""

    min: tuple[int, int, int, int]
    opt: tuple[int, int, int, int]
    max: tuple[int, int, int, int]

    def __post_init__(self) -> None:
        if not all(len(s) == 4 for s in (self.min, self.opt, self.max)) or \
                not all(a <= b <= c for a, b, c in zip(self.min, self.opt, self.max)) or min(self.min) < 1:
            raise InputError(f"shape profile needs positive (B, H, W, 3) with min <= opt <= max, got "
                             f"{self.min} / {self.opt} / {self.max}")


def default_profiles(stride: int, max_batch_size: int = 8) -> list[ShapeProfile]:
    """Batch 1..max_batch_size; padded H/W from one stride up to 1024 rounded up to the stride (VOC images are at most
    500 px a side, COCO 640; ADE20K's largest go beyond and need a larger max), optimum at batch 4, 384x512."""
    top = ceil_div(1024, stride) * stride
    opt_h, opt_w = ceil_div(384, stride) * stride, ceil_div(512, stride) * stride
    return [ShapeProfile((1, stride, stride, 3), (min(4, max_batch_size), opt_h, opt_w, 3),
                         (max_batch_size, top, top, 3))]


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
    trt = tensorrt_module()
    spec = backbone_spec(backbone or DEFAULT_BACKBONE)
    profiles = list(profiles or default_profiles(spec.padding, max_batch_size))
    logger = TensorRTLogger(trt)
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
