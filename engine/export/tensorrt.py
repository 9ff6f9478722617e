"""TensorRT engines (plans) from the exported backbone ONNX (engine.models.runtime.TensorRTRuntime runs one).

The build parses the ONNX graph with TensorRT's parser, builds in fp16 while keeping the normalisation layers (and the
reductions and softmax they feed on) in fp32, and gives the dynamic input one optimisation profile per entry of
`profiles` (batch and padded H/W ranges; the engine pads to a multiple of the stride, so every size in range occurs).

TensorRT needs an NVIDIA GPU (and the `tensorrt` package, which NGC's images carry): `tensorrt` is imported only after a
GPU check (constructing trt.Runtime without a GPU and deleting it segfaults), and on a machine without a GPU or
without TensorRT every entry point raises ModelError with the reason. A plan is specific to the TensorRT version and
GPU that built it: build it with the TensorRT of the server that will load it (docs/serving.md), e.g. inside NGC's
tensorrt container of the server's yy.mm.

Every plan is named after the compute capability of the GPU that built it (`model.sm80.plan`: Triton's
`cc_model_filenames` picks the file for the serving GPU) and has a record beside it, `<plan>.json` (plan_record): the
TensorRT version, the GPU, the optimisation profiles and the limits they impose (min_side, max_side, max_batch), so a
plan that the server's TensorRT or GPU cannot load is visible before the server tries.

    python export/build_tensorrt.py --backbone effnet-lite2/block19 --out REPO/MODEL/1/     # -> 1/model.sm80.plan
"""

from __future__ import annotations

import datetime
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..errors import InputError, ModelError
from ..models.runtime import TensorRTLogger, cuda_device_info, tensorrt_module
from ..registry import DEFAULT_BACKBONE, backbone_spec
from ..utils import ceil_div, file_sha256


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


#: the padded side the default profile reaches (rounded up to the stride)
DEFAULT_MAX_SIDE = 1024


def default_profiles(stride: int, max_batch_size: int = 8, max_side: int = DEFAULT_MAX_SIDE) -> list[ShapeProfile]:
    """Batch 1..max_batch_size; padded H/W from one stride up to `max_side` rounded up to the stride (1024 by default:
    VOC images are at most 500 px a side, COCO 640; ADE20K's largest go beyond and need a larger max), optimum at
    batch 4, 384x512 (or less, within the range)."""
    if max_batch_size < 1 or max_side < stride:
        raise InputError(f"a profile needs max_batch_size >= 1 and max_side >= the stride {stride}; got "
                         f"{max_batch_size}, {max_side}")
    top = ceil_div(max_side, stride) * stride
    opt_h, opt_w = (min(top, ceil_div(side, stride) * stride) for side in (384, 512))
    return [ShapeProfile((1, stride, stride, 3), (min(4, max_batch_size), opt_h, opt_w, 3),
                         (max_batch_size, top, top, 3))]


def profile_limits(profiles: Sequence[ShapeProfile]) -> dict[str, int]:
    """What a plan with these profiles accepts: padded sides in [min_side, max_side], batches up to max_batch (the
    union over profiles; the engine's padded sizes are squares' sides, so one range per side)."""
    return {"min_side": min(min(p.min[1:3]) for p in profiles), "max_side": max(max(p.max[1:3]) for p in profiles),
            "max_batch": max(p.max[0] for p in profiles)}


def normalise_cc(value) -> str:
    """A compute capability as Triton's cc_model_filenames spells it: "8.6" from "8.6", "86", "sm_86", (8, 6)."""
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return f"{int(value[0])}.{int(value[1])}"
    text = str(value).strip().lower().removeprefix("sm_").removeprefix("sm")
    match = re.fullmatch(r"(\d+)\.(\d)", text) or re.fullmatch(r"(\d+)(\d)", text)
    if match is None or int(match.group(1)) < 1:
        raise InputError(f"compute capability {value!r}: expected MAJOR.MINOR, e.g. 8.0 (A100), 8.6 (A10), 8.9 (L4), "
                         f"9.0 (H100), 7.5 (T4)")
    return f"{int(match.group(1))}.{match.group(2)}"


def plan_filename(cc) -> str:
    """The plan file for a compute capability: "8.0" -> "model.sm80.plan"."""
    return "model.sm{}.plan".format(normalise_cc(cc).replace(".", ""))


def record_path(plan_path: str | os.PathLike) -> Path:
    """Where a plan's record lies: beside it, `<plan>.json`."""
    plan_path = Path(plan_path)
    return plan_path.with_name(plan_path.name + ".json")


def read_plan_record(plan_path: str | os.PathLike) -> dict | None:
    """The record beside a plan (build_engine writes it), or None when there is none."""
    path = record_path(plan_path)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ModelError(f"{path}: unreadable plan record: {error}") from error
    if not isinstance(record, dict):
        raise ModelError(f"{path}: a plan record is a JSON object")
    return record


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
                 workspace_gib: float = 4.0, max_side: int = DEFAULT_MAX_SIDE, device: int = 0) -> dict:
    """Build a TensorRT plan from `onnx_path` on GPU `device` and write it with its record; returns the record.

    plan_path: the plan file, or a directory (a Triton version directory) to write `model.smXY.plan` into, XY the
        compute capability of the GPU building it (plan_filename). The record goes beside it (`<plan>.json`).
    backbone: the backbone name, for its stride (default profiles) and input name.
    profiles: optimisation profiles of the image input (default: default_profiles(stride, max_batch_size, max_side)).
    fp16: allow fp16 kernels, normalisation layers pinned to fp32 (see _keep_fp32); False builds fp32 only.
    workspace_gib: builder scratch memory limit.
    """
    trt = tensorrt_module()
    spec = backbone_spec(backbone or DEFAULT_BACKBONE)
    profiles = list(profiles or default_profiles(spec.padding, max_batch_size, max_side))
    gpu = cuda_device_info(device)
    plan_path = Path(plan_path)
    if plan_path.is_dir():
        plan_path = plan_path / plan_filename(gpu["compute_capability"])
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
    tmp = plan_path.with_name(plan_path.name + ".tmp")
    tmp.write_bytes(bytes(serialized))
    os.replace(tmp, plan_path)
    record = {"plan": plan_path.name, "tensorrt": trt.__version__, "gpu": gpu["name"],
              "compute_capability": gpu["compute_capability"], "backbone": spec.name,
              "input": spec.input_name, **profile_limits(profiles),
              "profiles": [{k: list(v) for k, v in vars(p).items()} for p in profiles],
              "fp16": fp16, "fp32_layers": pinned, "layers": network.num_layers,
              "onnx": str(onnx_path), "onnx_sha256": file_sha256(Path(onnx_path)),
              "built": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "build_seconds": round(time.perf_counter() - start, 1), "size": plan_path.stat().st_size}
    record_path(plan_path).write_text(json.dumps(record, indent=2) + "\n")
    return record
