"""Triton model-repository generation for the backbones, config validation, and a local server over a repository.

A repository follows Triton's layout exactly, so NGC's tritonserver loads it unchanged:

    REPO/<model>/config.pbtxt
    REPO/<model>/1/model.onnx         variant "onnx":     platform "onnxruntime_onnx", KIND_GPU instances
    REPO/<model>/1/model.sm80.plan    variant "tensorrt": platform "tensorrt_plan", KIND_GPU instances, one plan per
    REPO/<model>/1/model.sm80.plan.json                   compute capability (cc_model_filenames) with its record
                                                          (TensorRT version, GPU, profile limits) beside it
    REPO/<model>/1/model.py           variant "python":   backend "python" running model.onnx (next to it) through
                                                          onnxruntime on CPU, KIND_CPU instances; optionally a packed
                                                          environment (EXECUTION_ENV_PATH) that brings onnxruntime

<model> is `<backbone with "/" -> "_">_<variant>`, e.g. `effnet-lite2_block19_onnx`. Every model has a batch dimension
(max_batch_size), dynamic batching, and -1 for H and W: the engine pads images to a multiple of the stride and sends
each padded size as its own request. Limits are config parameters the client reads (`min_side`, `max_side`: the
padded side a request may have; a TensorRT plan's optimisation profile sets them), and `model_warmup` runs a zero
batch of one and a random batch of max_batch_size (512 x 512, rounded to the stride) through each instance at load.
Each written config.pbtxt is validated by parsing it into tritonclient's ModelConfig protobuf (`validate_config`).

The python variant is the one this CPU-only workplace serves for real (tritonserver 2.51 from nvidia-pytriton, python
backend only, in its own venv made by scripts/triton_env.sh); the GPU variants are for the NGC container.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..errors import InputError, ModelError
from ..models.backbones import model_path
from ..models.runtime import tensorrt_unavailable_reason
from ..registry import DEFAULT_BACKBONE, TRITON_VARIANTS, backbone_spec, triton_model_name
from ..utils import ceil_div
from .tensorrt import (DEFAULT_MAX_SIDE, build_engine, default_profiles, normalise_cc, plan_filename,
                       profile_limits, read_plan_record, record_path)
from .triton_guard import DEFAULT_MAX_REQUEST_BYTES, HttpGuard, new_token, restricted_api_arg

LOG = logging.getLogger(__name__)
VARIANTS = TRITON_VARIANTS
#: requests of up to this many images; the dynamic batcher merges requests of equal padded size up to it.
DEFAULT_MAX_BATCH_SIZE = 8
#: how long the dynamic batcher may hold a request to fill a batch.
DEFAULT_QUEUE_DELAY_US = 2000
#: the compute capabilities a tensorrt config maps to plan files by default: T4, A100, A10 / RTX 30, L4 / L40, H100
#: (a GPU not listed loads the default model.plan)
DEFAULT_PLAN_CCS = ("7.5", "8.0", "8.6", "8.9", "9.0")
#: side of the warmup images (rounded to the backbone's padding multiple, kept within max_side)
DEFAULT_WARMUP_SIDE = 512
#: the python backend's parameter naming a packed (conda-pack) execution environment, and its model-dir variable
EXECUTION_ENV_KEY = "EXECUTION_ENV_PATH"
MODEL_DIR_VARIABLE = "$$TRITON_MODEL_DIRECTORY"
#: the server's own venv (scripts/triton_env.sh), relative to the repository root of the engine's sources.
SERVER_ENV_DIR = ".triton-venv"
SERVER_LAUNCHER = "bin/moduseg-tritonserver"
_MODEL_FILES = {"python": "model.py", "onnx": "model.onnx", "tensorrt": "model.plan"}
#: config parameters that state limits (a positive integer each) and that TritonRuntime checks requests against
LIMIT_PARAMETERS = ("min_side", "max_side")
_PYTHON_MODEL_SOURCE = Path(__file__).with_name("triton_python_model.py")


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output: name, Triton data type, dims without the batch dimension (-1 = dynamic)."""

    name: str
    dims: tuple[int, ...]
    data_type: str = "TYPE_FP32"


def backbone_io(backbone: str) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The inputs and outputs a backbone's model exposes in Triton (the names of its ONNX graph)."""
    spec = backbone_spec(backbone)
    inputs = [TensorSpec(spec.input_name, (-1, -1, 3), "TYPE_UINT8")]
    if spec.layout == "nhwc":
        outputs = [TensorSpec(spec.feature_output, (-1, -1, spec.dim))]
    else:
        outputs = [TensorSpec(spec.feature_output, (-1, spec.dim))]
    if spec.saliency_output is not None:
        outputs.append(TensorSpec(spec.saliency_output, (1, -1, -1)))
    return inputs, outputs


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _tensors(kind: str, tensors: Sequence[TensorSpec]) -> list[str]:
    lines = [f"{kind} ["]
    for i, tensor in enumerate(tensors):
        lines += ["  {", f"    name: {_quote(tensor.name)}", f"    data_type: {tensor.data_type}",
                  f"    dims: [ {', '.join(str(d) for d in tensor.dims)} ]",
                  "  }" + ("," if i < len(tensors) - 1 else "")]
    return lines + ["]"]


def _parameters(values: dict[str, str]) -> list[str]:
    lines = ["parameters ["]
    for i, (key, value) in enumerate(values.items()):
        lines += ["  {", f"    key: {_quote(key)}", f"    value: {{ string_value: {_quote(str(value))} }}",
                  "  }" + ("," if i < len(values) - 1 else "")]
    return lines + ["]"]


def check_gpus(gpus: Sequence[int] | None) -> None:
    """InputError unless `gpus` is None or a non-empty list of GPU ids >= 0."""
    if gpus is not None and (not list(gpus) or any(int(g) < 0 for g in gpus)):
        raise InputError(f"gpus must be a non-empty list of GPU ids >= 0, got {list(gpus)}")


def instance_group(count: int, kind: str, gpus: Sequence[int] | None = None) -> list[str]:
    """config.pbtxt lines of one instance group: `count` instances of `kind` ("KIND_CPU" or "KIND_GPU"), on `gpus`
    (KIND_GPU only; None: count instances on every GPU the server sees)."""
    check_gpus(gpus)
    if gpus is not None and kind != "KIND_GPU":
        raise InputError(f"gpus {list(gpus)} are for KIND_GPU instances, not {kind}")
    lines = ["instance_group [", "  {", f"    count: {count}", f"    kind: {kind}"]
    if gpus is not None:
        lines.append(f"    gpus: [ {', '.join(str(int(g)) for g in gpus)} ]")
    return lines + ["  }", "]"]


def _warmup(inputs: Sequence[TensorSpec], side: int, max_batch_size: int) -> list[str]:
    """model_warmup entries: zeros at batch 1 and random data at max_batch_size, every dynamic dim at `side`."""
    entries = [("zeros", 1, "zero_data: true")]
    if max_batch_size > 1:
        entries.append(("random", max_batch_size, "random_data: true"))
    lines = ["model_warmup ["]
    for i, (kind, batch, data) in enumerate(entries):
        lines += ["  {", f'    name: "{kind}_batch{batch}_{side}x{side}"', f"    batch_size: {batch}"]
        for tensor in inputs:
            dims = ", ".join(str(side if d == -1 else d) for d in tensor.dims)
            lines += ["    inputs {", f"      key: {_quote(tensor.name)}", "      value {",
                      f"        data_type: {tensor.data_type}", f"        dims: [ {dims} ]", f"        {data}",
                      "      }", "    }"]
        lines.append("  }" + ("," if i < len(entries) - 1 else ""))
    return lines + ["]"]


def render_config(name: str, variant: str, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec],
                  max_batch_size: int = DEFAULT_MAX_BATCH_SIZE, instances: int = 1,
                  queue_delay_us: int = DEFAULT_QUEUE_DELAY_US, num_threads: int = 0,
                  gpus: Sequence[int] | None = None, *, warmup_side: int = DEFAULT_WARMUP_SIDE,
                  min_side: int = 0, max_side: int = 0, plans: dict[str, str] | None = None,
                  execution_env: str | None = None) -> str:
    """config.pbtxt text of one model.

    variant: "python" (backend python, CPU instances), "onnx" (onnxruntime_onnx) or "tensorrt" (tensorrt_plan), the
        last two with GPU instances.
    max_batch_size: largest batch per execution; requests are merged up to it by the dynamic batcher. A TensorRT plan
        must have been built with a profile whose max batch is at least this.
    instances: model instances (per GPU for the GPU variants; parallel CPU executions for python).
    queue_delay_us: how long the dynamic batcher may wait to fill a batch (latency it may add).
    num_threads: intra-op threads per instance, 0 = the runtime's choice (python: onnxruntime in model.py; onnx: the
        ONNX Runtime backend's `intra_op_thread_count`).
    gpus: GPU ids for the GPU variants' instance group (None: every visible GPU).
    warmup_side: side of the warmup images (dynamic dims set to it): a zero batch of 1 and a random batch of
        max_batch_size run through every instance at load; 0: no model_warmup.
    min_side, max_side: the padded side a request may have, as config parameters the client checks (0: not stated).
    plans: tensorrt: {compute capability "8.0": plan file in the version directory} (cc_model_filenames); None maps
        DEFAULT_PLAN_CCS to plan_filename(cc). model.plan stays the default for any other GPU.
    execution_env: python: EXECUTION_ENV_PATH, a conda-pack archive (or unpacked directory) with the packages
        model.py imports (onnxruntime, numpy); an absolute path or one under $$TRITON_MODEL_DIRECTORY.
    """
    if variant not in VARIANTS:
        raise InputError(f"unknown Triton variant {variant!r}; known variants: {', '.join(VARIANTS)}")
    if max_batch_size < 1 or instances < 1 or queue_delay_us < 0 or num_threads < 0:
        raise InputError(f"max_batch_size and instances must be >= 1, queue_delay_us and num_threads >= 0; got "
                         f"{max_batch_size}, {instances}, {queue_delay_us}, {num_threads}")
    if warmup_side < 0 or min_side < 0 or max_side < 0 or (max_side and min_side > max_side) or \
            (max_side and warmup_side > max_side):
        raise InputError(f"need 0 <= min_side <= max_side and a warmup side within max_side; got min_side "
                         f"{min_side}, max_side {max_side}, warmup_side {warmup_side}")
    check_gpus(gpus)
    if execution_env is not None and variant != "python":
        raise InputError(f"an execution environment ({EXECUTION_ENV_KEY}) is for the python variant, not {variant}")
    if plans is not None and variant != "tensorrt":
        raise InputError(f"plan files per compute capability are for the tensorrt variant, not {variant}")
    lines = [f"# generated by moduseg triton-repo ({variant} variant)", f"name: {_quote(name)}"]
    if variant == "python":
        lines.append('backend: "python"')
    elif variant == "onnx":
        lines += ['platform: "onnxruntime_onnx"', 'default_model_filename: "model.onnx"']
    else:
        lines += ['platform: "tensorrt_plan"', 'default_model_filename: "model.plan"']
        if plans is None:
            plans = {cc: plan_filename(cc) for cc in DEFAULT_PLAN_CCS}
        plans = {normalise_cc(cc): file for cc, file in plans.items()}
        lines.append("cc_model_filenames [")
        for i, cc in enumerate(sorted(plans, key=lambda c: tuple(int(x) for x in c.split(".")))):
            lines += ["  {", f"    key: {_quote(cc)}", f"    value: {_quote(plans[cc])}",
                      "  }" + ("," if i < len(plans) - 1 else "")]
        lines.append("]")
    lines.append(f"max_batch_size: {max_batch_size}")
    lines += _tensors("input", inputs) + _tensors("output", outputs)
    lines += ["dynamic_batching {", f"  max_queue_delay_microseconds: {queue_delay_us}", "}"]
    lines += instance_group(instances, "KIND_CPU" if variant == "python" else "KIND_GPU",
                            gpus if variant != "python" else None)
    parameters: dict[str, str] = {}
    if variant == "python":
        parameters.update(onnx_file="model.onnx", num_threads=str(num_threads))
        if execution_env is not None:
            parameters[EXECUTION_ENV_KEY] = check_execution_env(execution_env)
    elif variant == "onnx" and num_threads:
        parameters["intra_op_thread_count"] = str(num_threads)  # the ONNX Runtime backend's own parameter
    if min_side:
        parameters["min_side"] = str(min_side)
    if max_side:
        parameters["max_side"] = str(max_side)
    if parameters:
        lines += _parameters(parameters)
    if warmup_side:
        lines += _warmup(inputs, warmup_side, max_batch_size)
    return "\n".join(lines) + "\n"


def check_execution_env(value: str) -> str:
    """An EXECUTION_ENV_PATH value as the python backend takes it: an absolute path (inside the server's file
    system) or one under $$TRITON_MODEL_DIRECTORY that does not leave it; InputError otherwise."""
    value = str(value).strip()
    if value.startswith(MODEL_DIR_VARIABLE):
        rest = value[len(MODEL_DIR_VARIABLE):]
        if not rest.startswith("/") or ".." in Path(rest).parts or rest == "/":
            raise InputError(f"{EXECUTION_ENV_KEY} {value!r}: name a file or directory under "
                             f"{MODEL_DIR_VARIABLE}/ without '..' (the python backend does not allow leaving it)")
        return value
    if "TRITON_MODEL_DIRECTORY" in value:
        raise InputError(f"{EXECUTION_ENV_KEY} {value!r}: spell the variable {MODEL_DIR_VARIABLE} (in a shell, "
                         f"inside single quotes: '$$' in double quotes becomes the shell's process id)")
    if not value.startswith("/"):
        raise InputError(f"{EXECUTION_ENV_KEY} {value!r}: give an absolute path or {MODEL_DIR_VARIABLE}/FILE")
    return value


def validate_config(text: str, name: str | None = None):
    """Parse config.pbtxt text into tritonclient's ModelConfig protobuf and check what Triton needs to load it:
    a name (equal to `name`, the model directory, if given), a platform or backend, inputs and outputs with a data
    type and dims (-1 or positive), a non-negative max_batch_size. Returns the ModelConfig; raises ModelError."""
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError as error:
        raise ModelError("validating Triton configs needs tritonclient: pip install 'tritonclient[http,grpc]'") \
            from error
    config = model_config_pb2.ModelConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as error:
        raise ModelError(f"config.pbtxt of {name or 'a model'} does not parse as a Triton ModelConfig: {error}") \
            from error
    where = f"config.pbtxt of {name or config.name!r}"
    problems = []
    if not config.name:
        problems.append("no name")
    elif name is not None and config.name != name:
        problems.append(f"name {config.name!r} differs from its directory {name!r}")
    if not config.platform and not config.backend:
        problems.append("neither platform nor backend")
    if config.max_batch_size < 0:
        problems.append(f"max_batch_size {config.max_batch_size} < 0")
    for kind, tensors in (("input", config.input), ("output", config.output)):
        if not tensors:
            problems.append(f"no {kind}s")
        for tensor in tensors:
            if not tensor.name or tensor.data_type == model_config_pb2.TYPE_INVALID or not tensor.dims:
                problems.append(f"{kind} {tensor.name!r} lacks a name, a data type or dims")
            elif any(d < -1 or d == 0 for d in tensor.dims):
                problems.append(f"{kind} {tensor.name!r} has dims {list(tensor.dims)} (expected -1 or > 0)")
    if config.HasField("dynamic_batching") and config.max_batch_size < 1:
        problems.append("dynamic batching needs max_batch_size >= 1")
    problems += _check_additions(config, model_config_pb2)
    if problems:
        raise ModelError(f"{where}: {'; '.join(problems)}")
    return config


def _check_additions(config, pb) -> list[str]:
    """What validate_config checks beyond the basics: plan files per compute capability, the limit parameters,
    the execution environment, and that each warmup sample fits the model's inputs."""
    import re

    problems = []
    for cc, file in config.cc_model_filenames.items():
        if not re.fullmatch(r"\d+\.\d", cc) or not file or "/" in file:
            problems.append(f"cc_model_filenames {cc!r}: {file!r} (expected MAJOR.MINOR: a file name)")
    if config.cc_model_filenames and config.platform != "tensorrt_plan":
        problems.append("cc_model_filenames on a model that is not a TensorRT plan")
    limits = {}
    for key in LIMIT_PARAMETERS:
        if key in config.parameters:
            value = config.parameters[key].string_value
            if not value.isdigit() or int(value) < 1:
                problems.append(f"parameter {key} {value!r} is not a positive integer")
            else:
                limits[key] = int(value)
    if limits.get("min_side", 0) > limits.get("max_side", 1 << 30):
        problems.append(f"parameter min_side {limits['min_side']} > max_side {limits['max_side']}")
    if EXECUTION_ENV_KEY in config.parameters:
        if config.backend != "python":
            problems.append(f"{EXECUTION_ENV_KEY} on a model whose backend is not python")
        try:
            check_execution_env(config.parameters[EXECUTION_ENV_KEY].string_value)
        except InputError as error:
            problems.append(str(error))
    inputs = {tensor.name: tensor for tensor in config.input}
    for sample in config.model_warmup:
        where = f"model_warmup {sample.name!r}"
        if sample.batch_size < 1 or (config.max_batch_size and sample.batch_size > config.max_batch_size):
            problems.append(f"{where}: batch_size {sample.batch_size} outside 1..{config.max_batch_size}")
        if sorted(sample.inputs) != sorted(inputs):
            problems.append(f"{where}: inputs {sorted(sample.inputs)} differ from the model's {sorted(inputs)}")
        for name, data in sample.inputs.items():
            tensor = inputs.get(name)
            if tensor is None:
                continue
            if data.data_type != tensor.data_type or len(data.dims) != len(tensor.dims) or \
                    any(d < 1 or (t != -1 and d != t) for d, t in zip(data.dims, tensor.dims)):
                problems.append(f"{where}: input {name!r} {pb.DataType.Name(data.data_type)} {list(data.dims)} does "
                                f"not fit {pb.DataType.Name(tensor.data_type)} {list(tensor.dims)}")
            side = max(list(data.dims)[:2] or [0])
            if limits.get("max_side") and side > limits["max_side"]:
                problems.append(f"{where}: side {side} beyond max_side {limits['max_side']}")
            if data.WhichOneof("input_data_type") is None:
                problems.append(f"{where}: input {name!r} has no data (zero_data, random_data or input_data_file)")
    return problems


def validate_repository(repo: str | os.PathLike) -> dict[str, object]:
    """Validate every `<model>/config.pbtxt` under `repo` and check the layout (a numbered version directory);
    returns {model name: ModelConfig}."""
    repo = Path(repo)
    if not repo.is_dir():
        raise InputError(f"Triton model repository {repo} is not a directory")
    configs = {}
    for model_dir in sorted(p for p in repo.iterdir() if p.is_dir()):
        config_path = model_dir / "config.pbtxt"
        if not config_path.is_file():
            raise ModelError(f"{model_dir}: no config.pbtxt (Triton layout: <model>/config.pbtxt, <model>/1/...)")
        configs[model_dir.name] = validate_config(config_path.read_text(), model_dir.name)
        if not any(p.is_dir() and p.name.isdigit() for p in model_dir.iterdir()):
            raise ModelError(f"{model_dir}: no numbered version directory (e.g. {model_dir / '1'})")
    if not configs:
        raise ModelError(f"Triton model repository {repo} holds no model")
    return configs


def write_repository(out: str | os.PathLike, backbone: str | None = None, variants: Sequence[str] = VARIANTS,
                     with_models: bool = True, onnx_path: str | os.PathLike | None = None,
                     plan_path: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
                     max_batch_size: int = DEFAULT_MAX_BATCH_SIZE, instances: int = 1, num_threads: int = 0,
                     cache_dir: str | os.PathLike | None = None, *, queue_delay_us: int = DEFAULT_QUEUE_DELAY_US,
                     gpus: Sequence[int] | None = None, warmup: bool = True, max_side: int | None = None,
                     plan_cc: str | Sequence[str | None] | None = None,
                     compute_capabilities: Sequence[str] = DEFAULT_PLAN_CCS,
                     execution_env: str | os.PathLike | None = None) -> dict[str, Path]:
    """Write (or refresh) a Triton model repository for `backbone` under `out`; returns {model name: model dir}.

    variants: any of "python", "onnx", "tensorrt".
    with_models: also place the model files: model.onnx (python and onnx variants; the cached export, exported first
        if missing, or `onnx_path`) and the TensorRT plans (`plan_path`, or one built here for this GPU when TensorRT
        and a GPU exist). False writes configs and model.py only (what the repository's triton_models/ holds).
    plan_path, plan_cc: plan file(s) built elsewhere, and the compute capability each was built for ("8.6"; None:
        read from the record beside the plan, `<plan>.json`, which build_engine writes). Each is placed as
        model.smXY.plan with its record (a plan without a known capability becomes the default model.plan).
    compute_capabilities: the GPUs the tensorrt config maps to plan files (cc_model_filenames), besides those of the
        plans placed here or already in the version directory.
    max_side: the largest padded side a request may have: the TensorRT profile's (default 1024, rounded up to the
        backbone's padding multiple; a placed plan's record overrides it), and stated for the python and onnx
        variants too when given (they have no limit of their own). min_side (one padding multiple) is stated for
        tensorrt.
    warmup: model_warmup of 512 x 512 images (rounded to the padding multiple), batch 1 and max_batch_size.
    execution_env: python variant: a conda-pack archive bringing model.py's imports (onnxruntime, numpy<2) for a
        server without them (NGC's -py3 image): "$$TRITON_MODEL_DIRECTORY/FILE" as it is; a local file is placed in
        the model directory (with models) and named that way; another absolute path is taken as a path on the server.
    max_batch_size, instances, num_threads, queue_delay_us, gpus: see render_config.
    """
    backbone = backbone or DEFAULT_BACKBONE
    spec = backbone_spec(backbone)  # unknown names fail here, naming the known ones
    variants = list(dict.fromkeys(variants))
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        raise InputError(f"unknown Triton variants {unknown}; choose from {', '.join(VARIANTS)}")
    if max_side is not None and max_side < spec.padding:
        raise InputError(f"max_side {max_side} is below {backbone}'s padding multiple {spec.padding}")
    plans = _plan_sources(plan_path, plan_cc)
    ccs = [normalise_cc(cc) for cc in compute_capabilities]
    inputs, outputs = backbone_io(backbone)
    out = Path(out)
    onnx_source = None
    if with_models and ({"python", "onnx"} & set(variants) or ("tensorrt" in variants and not plans)):
        if onnx_path is not None:
            onnx_source = Path(onnx_path)
            if not onnx_source.is_file():
                raise InputError(f"onnx_path {onnx_source} is not a file")
        else:
            onnx_source = model_path(backbone, cache_dir)
    common = dict(max_batch_size=max_batch_size, instances=instances, queue_delay_us=queue_delay_us, gpus=gpus)
    written = {}
    for variant in variants:
        name = triton_model_name(backbone, variant)
        model_dir = out / name
        version_dir = model_dir / "1"
        version_dir.mkdir(parents=True, exist_ok=True)
        extra: dict = {}
        limits = {"min_side": 0, "max_side": ceil_div(max_side, spec.padding) * spec.padding if max_side else 0}
        if variant == "tensorrt":
            limits = _tensorrt_files(name, version_dir, backbone, spec.padding, plans, with_models, onnx_source,
                                     max_batch_size, max_side or DEFAULT_MAX_SIDE)
            if max_side:  # a stated max_side below what the plans accept is kept: the stricter limit holds
                limits["max_side"] = min(limits["max_side"], ceil_div(max_side, spec.padding) * spec.padding)
            present = {cc for cc in ccs} | _plans_present(version_dir)
            extra["plans"] = {cc: plan_filename(cc) for cc in present}
        if variant == "python" and execution_env is not None:
            extra["execution_env"] = _execution_env(name, model_dir, execution_env, with_models)
        warmup_side = 0
        if warmup:
            warmup_side = ceil_div(DEFAULT_WARMUP_SIDE, spec.padding) * spec.padding
            if limits["max_side"] and warmup_side > limits["max_side"]:
                warmup_side = limits["max_side"] // spec.padding * spec.padding
        text = render_config(name, variant, inputs, outputs, num_threads=num_threads, warmup_side=warmup_side,
                             min_side=limits["min_side"], max_side=limits["max_side"], **common, **extra)
        validate_config(text, name)
        (model_dir / "config.pbtxt").write_text(text)
        if variant == "python":
            shutil.copyfile(_PYTHON_MODEL_SOURCE, version_dir / "model.py")
        if with_models and variant in ("python", "onnx"):
            _place(onnx_source, version_dir / "model.onnx")
        written[name] = model_dir
    return written


def _plan_sources(plan_path, plan_cc) -> list[tuple[Path, str | None]]:
    """[(plan file, compute capability or None)] from write_repository's plan_path / plan_cc (one or several)."""
    if plan_path is None:
        if plan_cc not in (None, [], ()):
            raise InputError("plan_cc (--plan-cc) names the capability of a plan given by plan_path (--plan)")
        return []
    paths = [plan_path] if isinstance(plan_path, (str, os.PathLike)) else list(plan_path)
    ccs = [plan_cc] if isinstance(plan_cc, (str, type(None))) else list(plan_cc)
    if len(ccs) == 1 and len(paths) > 1 and ccs[0] is None:
        ccs = ccs * len(paths)
    if len(ccs) != len(paths):
        raise InputError(f"{len(paths)} plan file(s) but {len(ccs)} compute capabilities: give one --plan-cc per "
                         f"--plan, in the same order")
    sources = []
    for path, cc in zip(paths, ccs):
        path = Path(path)
        if not path.is_file():
            raise InputError(f"plan {path} is not a file")
        sources.append((path, None if cc is None else normalise_cc(cc)))
    return sources


def _plans_present(version_dir: Path) -> set[str]:
    """Compute capabilities of the model.smXY.plan files already in a version directory."""
    import re

    found = set()
    for path in version_dir.glob("model.sm*.plan"):
        match = re.fullmatch(r"model\.sm(\d+)(\d)\.plan", path.name)
        if match:
            found.add(f"{int(match.group(1))}.{match.group(2)}")
    return found


def _tensorrt_files(name: str, version_dir: Path, backbone: str, multiple: int, plans, with_models: bool,
                    onnx_source: Path | None, max_batch_size: int, max_side: int) -> dict[str, int]:
    """Place (or build) the tensorrt variant's plans with their records; returns the limits the config states:
    the profile's padded-side range, narrowed to what every placed plan accepts."""
    limits = profile_limits(default_profiles(multiple, max_batch_size, max_side))
    if with_models:
        for source, cc in plans:
            record = read_plan_record(source)
            known = record.get("compute_capability") if record else None
            if cc is not None and known is not None and normalise_cc(known) != cc:
                raise InputError(f"plan {source} was built on compute capability {known} "
                                 f"({record.get('gpu', 'GPU unknown')}), not {cc} as --plan-cc says")
            cc = cc or (normalise_cc(known) if known else None)
            if record is not None and record.get("max_batch") is not None and \
                    int(record["max_batch"]) < max_batch_size:
                raise InputError(f"plan {source} takes batches up to {record['max_batch']}, less than "
                                 f"max_batch_size {max_batch_size}: lower --max-batch-size or rebuild the plan")
            target = version_dir / (plan_filename(cc) if cc else "model.plan")
            if cc is None:
                LOG.warning("%s: %s has no compute capability (no --plan-cc, no record): placed as the default "
                            "model.plan, loaded on any GPU the config does not map", name, source)
            if record is None:
                record = {"plan": target.name, "tensorrt": None, "compute_capability": cc,
                          "note": f"placed from {source} without its build record: the TensorRT version that "
                                  f"built it is unknown; it must equal the server's"}
                LOG.warning("%s: %s has no record (%s): its TensorRT version is unknown", name, source,
                            record_path(source).name)
            _place(source, target)
            record_path(target).write_text(json.dumps({**record, "plan": target.name}, indent=2) + "\n")
        if not plans:
            reason = tensorrt_unavailable_reason()
            if reason is not None:
                LOG.warning("%s: config only, no plan (%s); build one where TensorRT and a GPU are, with the "
                            "server's TensorRT version (docs/serving.md)", name, reason)
            else:
                build_engine(onnx_source, version_dir, backbone=backbone, max_batch_size=max_batch_size,
                             max_side=max_side)
    # the limits every plan in the version directory accepts (placed now or earlier): the config states those
    recorded = [r for r in plan_records(version_dir.parent).values()
                if r is not None and r.get("min_side") is not None and r.get("max_side") is not None]
    if recorded:
        limits["min_side"] = max(int(r["min_side"]) for r in recorded)
        limits["max_side"] = min(int(r["max_side"]) for r in recorded)
        small = [r for r in recorded if r.get("max_batch") is not None and int(r["max_batch"]) < max_batch_size]
        if small:
            raise InputError(f"plan {small[0].get('plan')} in {version_dir} takes batches up to "
                             f"{small[0]['max_batch']}, less than max_batch_size {max_batch_size}")
    return limits


def _execution_env(name: str, model_dir: Path, value, with_models: bool) -> str:
    """The EXECUTION_ENV_PATH value for write_repository's execution_env (see there)."""
    text = os.fspath(value)
    if text.startswith(MODEL_DIR_VARIABLE) or "TRITON_MODEL_DIRECTORY" in text:
        return check_execution_env(text)
    local = Path(text)
    if local.is_file():
        if with_models:
            _place(local, model_dir / local.name)
        else:
            LOG.warning("%s: configs only: copy %s to %s before serving", name, local, model_dir / local.name)
        return f"{MODEL_DIR_VARIABLE}/{local.name}"
    if not local.is_absolute():
        raise InputError(f"execution environment {text!r} is not a file here; give an archive to place in the "
                         f"model directory, an absolute path on the server, or {MODEL_DIR_VARIABLE}/FILE")
    LOG.info("%s: %s=%s is not here: taken as a path on the server", name, EXECUTION_ENV_KEY, text)
    return check_execution_env(str(local))


def plan_version_problems(repo: str | os.PathLike, tensorrt_version: str) -> list[str]:
    """Plans under `repo` (a repository or one model directory) that a server with TensorRT `tensorrt_version`
    (e.g. "10.5.0", from the NGC release notes of its yy.mm) would refuse to deserialize: built by another version
    (compared on the components both give: "10.5" matches "10.5.0.18"), or of unknown version."""
    want = str(tensorrt_version).strip().split(".")
    repo = Path(repo)
    model_dirs = [repo] if (repo / "config.pbtxt").is_file() else sorted(p for p in repo.iterdir() if p.is_dir())
    problems = []
    for model_dir in model_dirs:
        for plan, record in plan_records(model_dir).items():
            where = f"{model_dir.name}/{plan}"
            built = (record or {}).get("tensorrt")
            if not built:
                problems.append(f"{where}: TensorRT version unknown (no build record)")
                continue
            have = str(built).split(".")
            common = min(len(want), len(have))
            if have[:common] != want[:common]:
                problems.append(f"{where}: built by TensorRT {built} on {record.get('gpu', 'an unknown GPU')}, the "
                                f"server has {tensorrt_version}: rebuild it in nvcr.io/nvidia/tensorrt of the "
                                f"server's yy.mm")
    return problems


def plan_records(model_dir: str | os.PathLike) -> dict[str, dict | None]:
    """{plan file name: its record or None} of every plan in a tensorrt model's version directories: what to
    compare with the server's TensorRT version before loading."""
    records = {}
    for plan in sorted(Path(model_dir).glob("[0-9]*/*.plan")):
        records[str(plan.relative_to(model_dir))] = read_plan_record(plan)
    return records


def _place(source: Path, target: Path) -> None:
    """Copy `source` to `target` (a hard link where possible: exported graphs are tens of MB)."""
    if target.exists() and target.stat().st_size == source.stat().st_size and \
            target.stat().st_mtime >= source.stat().st_mtime:
        return
    tmp = target.with_name(target.name + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copyfile(source, tmp)
    os.replace(tmp, target)


# ----------------------------------------------------------------------------------------------------- local server

#: the environment variable naming the server venv, and the per-user venv used when neither it nor a checkout's is
ENV_VARIABLE = "MODUSEG_TRITON_ENV"
USER_ENV_DIR = "triton-venv"
#: the script that makes a server venv, shipped inside the package (scripts/triton_env.sh in a checkout runs it)
ENV_SCRIPT = Path(__file__).with_name("triton_env.sh")


def _source_root() -> Path | None:
    """The source checkout the engine runs from (an editable install), or None for an installed package."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / "pyproject.toml").is_file() and (root / "csrc").is_dir() else None


def user_env_dir() -> Path:
    """The per-user server venv: triton-venv in the engine's cache folder ($MODUSEG_CACHE, else ~/.cache/moduseg)."""
    from ..models.cache import CACHE_ENV

    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "moduseg").expanduser() / USER_ENV_DIR


def env_candidates() -> list[Path]:
    """Where the server venv is looked for, in order: $MODUSEG_TRITON_ENV alone when set; else the checkout's
    .triton-venv (when the engine runs from a checkout), then the per-user one. Never the working folder."""
    if os.environ.get(ENV_VARIABLE):
        return [Path(os.environ[ENV_VARIABLE]).expanduser()]
    root = _source_root()
    return ([root / SERVER_ENV_DIR] if root is not None else []) + [user_env_dir()]


def default_env_dir() -> Path:
    """The first of env_candidates() that holds a server venv, else the first (where one is made)."""
    candidates = env_candidates()
    return next((env for env in candidates if (env / SERVER_LAUNCHER).is_file()), candidates[0])


def server_env(env_dir: str | os.PathLike | None = None) -> Path:
    """The tritonserver launcher of the server venv (default_env_dir() by default); ModelError, naming where it
    was looked for and how to make one, if it is not there."""
    looked = [Path(env_dir)] if env_dir is not None else env_candidates()
    env = Path(env_dir) if env_dir is not None else default_env_dir()
    launcher = env / SERVER_LAUNCHER
    if not launcher.is_file():
        where = ", ".join(str(p) for p in looked)
        hint = ""
        if env_dir is None and (Path.cwd() / SERVER_ENV_DIR / SERVER_LAUNCHER).is_file():
            hint = f"; ./{SERVER_ENV_DIR} holds one: pass --env {SERVER_ENV_DIR} (or set {ENV_VARIABLE})"
        raise ModelError(f"no Triton server environment at {where}: make one with `moduseg triton-env "
                         f"--env {env}` (in a checkout: `bash scripts/triton_env.sh {env}`), or point --env or "
                         f"{ENV_VARIABLE} at one{hint}")
    return launcher


def ensure_server_env(env_dir: str | os.PathLike | None = None, script: str | os.PathLike | None = None) -> Path:
    """Make the server venv at `env_dir` (default_env_dir() by default) if it is missing or stale, and return its
    launcher. `script` defaults to the packaged triton_env.sh, which builds the engine from the checkout it runs in
    or copies the installed package; its interpreter is $PYTHON, else this one (an installed engine's compiled
    module needs the same Python version). Fast when the venv is up to date."""
    env = Path(env_dir) if env_dir is not None else default_env_dir()
    script = Path(script) if script is not None else ENV_SCRIPT
    if not script.is_file():
        raise ModelError(f"the server venv script {script} is missing: reinstall moduseg-engine")
    environment = {**os.environ, "PYTHON": os.environ.get("PYTHON") or sys.executable}
    result = subprocess.run(["bash", str(script), str(env.expanduser().resolve())], capture_output=True, text=True,
                            env=environment)
    if result.returncode != 0:
        raise ModelError(f"creating the Triton server environment {env} failed ({script}):\n"
                         f"{(result.stdout + result.stderr)[-3000:]}")
    return server_env(env)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class _Spawner:
    """Starts child processes from one thread that lives as long as this process, each with Linux's parent-death
    signal (PR_SET_PDEATHSIG) set to SIGTERM: a server started here ends when this process does, however it ends
    (kill -9 included), instead of holding its ports. The signal follows the *thread* that forked, hence the
    long-lived thread: a server started from a short-lived thread would otherwise be stopped when that thread ends.
    Elsewhere than Linux, a plain Popen."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._executor, self._pid = None, None

    def popen(self, command: list[str], **options) -> subprocess.Popen:
        prctl = _prctl()
        if prctl is None:
            return subprocess.Popen(command, **options)
        with self._lock:
            if self._executor is None or self._pid != os.getpid():  # a forked child has the object, not the thread
                from concurrent.futures import ThreadPoolExecutor

                self._executor = ThreadPoolExecutor(1, thread_name_prefix="moduseg-spawner")
                self._pid = os.getpid()
        parent = os.getpid()

        def die_with_parent() -> None:  # runs in the child between fork and exec: no locks, no allocation of note
            prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
            if os.getppid() != parent:  # the parent died before the signal was armed
                os.kill(os.getpid(), signal.SIGTERM)

        return self._executor.submit(subprocess.Popen, command, preexec_fn=die_with_parent, **options).result()


def _prctl():
    """libc's prctl on Linux, else None."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_SPAWNER = _Spawner()


class LocalServer:
    """A tritonserver process over `repo`, bound to 127.0.0.1 (HTTP, gRPC and metrics ports; 0 picks a free one).

    models: load only these models (explicit model control); None loads the repository's python-backend models,
        the only backend this server build carries (the GPU variants need NGC's server).
    http_guard: put triton_guard.HttpGuard on the HTTP port (tritonserver's own HTTP port is then a private one,
        its inference API restricted to the guard): it refuses inference requests that would make tritonserver 2.51
        abort (a JSON input declaring a huge shape) and bodies over `max_request_bytes`. False: tritonserver's HTTP
        port is http_port itself, unguarded.
    start() launches it and waits until every loaded model is ready (or the process dies: its log is in the error);
    stop() ends that process by its id (SIGTERM, then SIGKILL after `grace` seconds). A context manager.

    The server runs in an empty working folder of its own (a checkout's engine/ in the caller's folder would
    otherwise shadow the installed engine in the python backend, whose sys.path starts with ''), so give paths in
    `extra_args` absolute. It gets SIGTERM if the process that started it dies (Linux), and its HTTP front closes
    when it exits.
    """

    def __init__(self, repo: str | os.PathLike, http_port: int = 0, grpc_port: int = 0, metrics_port: int = 0,
                 models: Sequence[str] | None = None, env_dir: str | os.PathLike | None = None,
                 log_path: str | os.PathLike | None = None, extra_args: Sequence[str] = (),
                 http_guard: bool = True, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES) -> None:
        self.repo = Path(repo).resolve()
        configs = validate_repository(self.repo)
        if models is None:
            models = [name for name, config in configs.items() if config.backend == "python"]
            if not models:
                raise ModelError(f"{self.repo} has no python-backend model; this local server carries the python "
                                 f"backend only (write one with `moduseg triton-repo --variants python`)")
        unknown = [name for name in models if name not in configs]
        if unknown:
            raise InputError(f"models {unknown} are not in {self.repo} (it holds {sorted(configs)})")
        self.models = list(models)
        for name in self.models:
            backbone_model = configs[name].backend == "python" and "onnx_file" in configs[name].parameters
            if backbone_model and not any((self.repo / name).glob("[0-9]*/model.onnx")):
                raise ModelError(f"{self.repo / name} has no model.onnx next to its model.py: fill the repository "
                                 f"with `moduseg triton-repo --out {self.repo}`")
        if max_request_bytes < 1:
            raise InputError(f"max_request_bytes must be >= 1, got {max_request_bytes}")
        self.launcher = server_env(env_dir)
        self.http_port = http_port or free_port()
        self.grpc_port = grpc_port or free_port()
        self.metrics_port = metrics_port or free_port()
        self.log_path = Path(log_path) if log_path else None
        self.extra_args = list(extra_args)
        self.http_guard, self.max_request_bytes = http_guard, max_request_bytes
        # guarded: tritonserver's own HTTP port is private, its inference API open to the guard's token only
        self.server_http_port = free_port() if http_guard else self.http_port
        self._token = new_token() if http_guard else None
        self.process: subprocess.Popen | None = None
        self._log = None
        self._guard: HttpGuard | None = None
        self._workdir: str | None = None

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def command(self) -> list[str]:
        guard = [restricted_api_arg(self._token)] if self.http_guard else []
        return [str(self.launcher), f"--model-repository={self.repo}",
                "--http-address=127.0.0.1", f"--http-port={self.server_http_port}",
                "--grpc-address=127.0.0.1", f"--grpc-port={self.grpc_port}",
                "--metrics-address=127.0.0.1", f"--metrics-port={self.metrics_port}",
                "--allow-metrics=true", "--allow-gpu-metrics=false", "--exit-on-error=true",
                "--strict-readiness=true", "--model-control-mode=explicit",
                *[f"--load-model={name}" for name in self.models], *guard, *self.extra_args]

    def start(self, timeout: float = 120.0) -> "LocalServer":
        if self.log_path is None:
            self.log_path = Path(tempfile.mkstemp(prefix="tritonserver-", suffix=".log")[1])
        try:
            if self.http_guard:  # first: a port in use fails here, before a server starts
                try:
                    self._guard = HttpGuard("127.0.0.1", self.http_port, self.server_http_port, self._token,
                                            max_request_bytes=self.max_request_bytes).start()
                except OSError as error:
                    raise ModelError(f"cannot serve HTTP on {self.http_url}: {error}") from error
            self._workdir = tempfile.mkdtemp(prefix="tritonserver-cwd-")
            self._log = open(self.log_path, "wb")
            self.process = _SPAWNER.popen(self.command(), stdout=self._log, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, start_new_session=True, cwd=self._workdir)
            if self._guard is not None:
                # the front closes with the server, so that nothing answers on its port for a dead server and a
                # restarted one can take the port again
                threading.Thread(target=_close_with, args=(self.process, self._guard), daemon=True,
                                 name=f"tritonserver-{self.process.pid}-watch").start()
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, timeout: float) -> None:
        import urllib.error
        import urllib.request

        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise ModelError(f"tritonserver exited with code {self.process.returncode} while loading {self.repo}:"
                                 f"\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise ModelError(f"tritonserver over {self.repo} not ready after {timeout:.0f} s:\n{self.log_tail()}")
            time.sleep(0.25)

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace")[-chars:]
        except (OSError, TypeError):
            return "(no log)"

    def stop(self, grace: float = 15.0) -> None:
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(grace)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
        guard, self._guard = self._guard, None
        if guard is not None:
            guard.stop()
        if self._log is not None:
            self._log.close()
            self._log = None
        workdir, self._workdir = self._workdir, None
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)

    def __enter__(self) -> "LocalServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _close_with(process: subprocess.Popen, guard: HttpGuard) -> None:
    process.wait()
    guard.stop()
