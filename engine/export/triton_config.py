"""Triton model configs (config.pbtxt) as tritonclient's `ModelConfig` protobuf: one builder for every model this
package writes, its text form, and the checks Triton's loader would make.

`model_config` builds the message of any model: the backbones' variants (`backbone_config`: ONNX Runtime and
TensorRT on GPU instances, the python backend running the ONNX graph on CPU instances) and the whole-segmentation
python model (engine.export.triton_segment), whose image input allows ragged batches. Every model has a batch
dimension (max_batch_size), dynamic batching, and -1 for H and W: the engine pads images to a multiple of the stride
and sends each padded size as its own request. Limits are config parameters the client reads (`min_side`,
`max_side`: the padded side a request may have; a TensorRT plan's optimisation profile sets them), and
`model_warmup` runs a zero batch of one and a random batch of max_batch_size through each instance at load.

`to_text` serialises a message with protobuf's text format; `validate_config` parses config.pbtxt text (a
repository written by hand or by an older engine) and `check_config` checks a message, written here or parsed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from ..errors import InputError, ModelError
from ..models.triton_model import LIMIT_PARAMETERS
from ..registry import TRITON_VARIANTS, backbone_spec
from .tensorrt import normalise_cc, plan_filename

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
#: how each backbone variant is served: (backend, platform, default model file)
_SERVED_BY = {"python": ("python", "", ""), "onnx": ("", "onnxruntime_onnx", "model.onnx"),
              "tensorrt": ("", "tensorrt_plan", "model.plan")}


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output: name, Triton data type, dims without the batch dimension (-1 = dynamic);
    ragged: the dynamic batcher may merge requests whose dynamic dims differ (the model takes them one by one)."""

    name: str
    dims: tuple[int, ...]
    data_type: str = "TYPE_FP32"
    ragged: bool = False


def pb():
    """tritonclient's generated model_config_pb2 (ModelError naming the extra when tritonclient is missing)."""
    try:
        from tritonclient.grpc import model_config_pb2
    except ImportError as error:
        raise ModelError("Triton configs need tritonclient: pip install 'moduseg-engine[triton]' "
                         "(tritonclient[http,grpc])") from error
    return model_config_pb2


def check_gpus(gpus: Sequence[int] | None) -> None:
    """InputError unless `gpus` is None or a non-empty list of GPU ids >= 0."""
    if gpus is not None and (not list(gpus) or any(int(g) < 0 for g in gpus)):
        raise InputError(f"gpus must be a non-empty list of GPU ids >= 0, got {list(gpus)}")


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


def model_config(name: str, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec], *, backend: str = "",
                 platform: str = "", default_model_filename: str = "",
                 max_batch_size: int = DEFAULT_MAX_BATCH_SIZE, instances: int = 1, kind: str = "KIND_CPU",
                 gpus: Sequence[int] | None = None, queue_delay_us: int = DEFAULT_QUEUE_DELAY_US,
                 parameters: Mapping[str, object] | None = None, warmup_side: int = 0,
                 plans: Mapping[str, str] | None = None):
    """The ModelConfig of one model: served by `backend` or `platform`, batched up to max_batch_size by the
    dynamic batcher (waiting at most queue_delay_us), `instances` instances of `kind` ("KIND_CPU", "KIND_GPU"; on
    `gpus`, None = every GPU the server sees), string `parameters`, `plans` ({compute capability: plan file},
    cc_model_filenames), and warmup_side > 0: model_warmup of zeros at batch 1 and random data at max_batch_size,
    every dynamic dim at warmup_side."""
    if max_batch_size < 1 or instances < 1 or queue_delay_us < 0 or warmup_side < 0:
        raise InputError(f"max_batch_size and instances must be >= 1, queue_delay_us and warmup_side >= 0; got "
                         f"{max_batch_size}, {instances}, {queue_delay_us}, {warmup_side}")
    check_gpus(gpus)
    if gpus is not None and kind != "KIND_GPU":
        raise InputError(f"gpus {list(gpus)} are for KIND_GPU instances, not {kind}")
    types = pb()
    config = types.ModelConfig(name=name, backend=backend, platform=platform,
                               default_model_filename=default_model_filename, max_batch_size=max_batch_size)
    for cc in sorted(plans or {}, key=lambda c: tuple(int(x) for x in c.split("."))):
        config.cc_model_filenames[cc] = plans[cc]
    for target, tensors in ((config.input, inputs), (config.output, outputs)):
        for tensor in tensors:
            added = target.add(name=tensor.name, data_type=types.DataType.Value(tensor.data_type), dims=tensor.dims)
            if tensor.ragged:
                added.allow_ragged_batch = True
    config.dynamic_batching.SetInParent()  # present even when the delay is 0
    config.dynamic_batching.max_queue_delay_microseconds = queue_delay_us
    config.instance_group.add(count=instances, kind=types.ModelInstanceGroup.Kind.Value(kind),
                              gpus=[int(g) for g in gpus or []])
    for key, value in (parameters or {}).items():
        config.parameters[key].string_value = str(value)
    if warmup_side:
        samples = [("zeros", 1, "zero_data"), ("random", max_batch_size, "random_data")][:1 + (max_batch_size > 1)]
        for label, batch, data in samples:
            sample = config.model_warmup.add(name=f"{label}_batch{batch}_{warmup_side}x{warmup_side}",
                                             batch_size=batch)
            for tensor in inputs:
                entry = sample.inputs[tensor.name]
                entry.data_type = types.DataType.Value(tensor.data_type)
                entry.dims.extend(warmup_side if d == -1 else d for d in tensor.dims)
                setattr(entry, data, True)
    return config


def to_text(config, what: str) -> str:
    """config.pbtxt text of a ModelConfig (protobuf's text format), after a comment saying `what` model it is."""
    from google.protobuf import text_format

    return f"# generated by moduseg triton-repo ({what})\n" + \
        text_format.MessageToString(config, use_short_repeated_primitives=True)


def write_config(model_dir: Path, config, what: str) -> None:
    """Check `config` (check_config, its name against the directory's) and write it as model_dir/config.pbtxt."""
    check_config(config, model_dir.name)
    (model_dir / "config.pbtxt").write_text(to_text(config, what))


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


def backbone_config(name: str, variant: str, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec],
                    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE, instances: int = 1,
                    queue_delay_us: int = DEFAULT_QUEUE_DELAY_US, num_threads: int = 0,
                    gpus: Sequence[int] | None = None, *, warmup_side: int = DEFAULT_WARMUP_SIDE,
                    min_side: int = 0, max_side: int = 0, plans: dict[str, str] | None = None,
                    execution_env: str | None = None):
    """The ModelConfig of a backbone served by `variant`.

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
    if num_threads < 0:
        raise InputError(f"num_threads must be >= 0, got {num_threads}")
    check_gpus(gpus)
    if warmup_side < 0 or min_side < 0 or max_side < 0 or (max_side and min_side > max_side) or \
            (max_side and warmup_side > max_side):
        raise InputError(f"need 0 <= min_side <= max_side and a warmup side within max_side; got min_side "
                         f"{min_side}, max_side {max_side}, warmup_side {warmup_side}")
    if execution_env is not None and variant != "python":
        raise InputError(f"an execution environment ({EXECUTION_ENV_KEY}) is for the python variant, not {variant}")
    if plans is not None and variant != "tensorrt":
        raise InputError(f"plan files per compute capability are for the tensorrt variant, not {variant}")
    if variant == "tensorrt":
        plans = {normalise_cc(cc): file for cc, file in
                 (plans if plans is not None else {cc: plan_filename(cc) for cc in DEFAULT_PLAN_CCS}).items()}
    parameters: dict[str, object] = {}
    if variant == "python":
        parameters.update(onnx_file="model.onnx", num_threads=num_threads)
        if execution_env is not None:
            parameters[EXECUTION_ENV_KEY] = check_execution_env(execution_env)
    elif variant == "onnx" and num_threads:
        parameters["intra_op_thread_count"] = num_threads  # the ONNX Runtime backend's own parameter
    parameters.update((key, value) for key, value in (("min_side", min_side), ("max_side", max_side)) if value)
    backend, platform, default_file = _SERVED_BY[variant]
    return model_config(name, inputs, outputs, backend=backend, platform=platform, default_model_filename=default_file,
                        max_batch_size=max_batch_size, instances=instances,
                        kind="KIND_CPU" if variant == "python" else "KIND_GPU",
                        gpus=gpus if variant != "python" else None, queue_delay_us=queue_delay_us,
                        parameters=parameters, warmup_side=warmup_side, plans=plans)


def validate_config(text: str, name: str | None = None):
    """Parse config.pbtxt text into a ModelConfig and check it (check_config); returns it, raises ModelError."""
    from google.protobuf import text_format

    config = pb().ModelConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as error:
        raise ModelError(f"config.pbtxt of {name or 'a model'} does not parse as a Triton ModelConfig: {error}") \
            from error
    return check_config(config, name)


def check_config(config, name: str | None = None):
    """Check what Triton needs to load a ModelConfig: a name (equal to `name`, the model directory, if given), a
    platform or backend, inputs and outputs with a data type and dims (-1 or positive), a non-negative
    max_batch_size, and what this package adds (_check_additions). Returns the config; raises ModelError."""
    types = pb()
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
            if not tensor.name or tensor.data_type == types.TYPE_INVALID or not tensor.dims:
                problems.append(f"{kind} {tensor.name!r} lacks a name, a data type or dims")
            elif any(d < -1 or d == 0 for d in tensor.dims):
                problems.append(f"{kind} {tensor.name!r} has dims {list(tensor.dims)} (expected -1 or > 0)")
    if config.HasField("dynamic_batching") and config.max_batch_size < 1:
        problems.append("dynamic batching needs max_batch_size >= 1")
    problems += _check_additions(config, types)
    if problems:
        raise ModelError(f"{where}: {'; '.join(problems)}")
    return config


def _check_additions(config, types) -> list[str]:
    """What check_config checks beyond the basics: plan files per compute capability, the limit parameters,
    the execution environment, and that each warmup sample fits the model's inputs."""
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
                problems.append(f"{where}: input {name!r} {types.DataType.Name(data.data_type)} {list(data.dims)} "
                                f"does not fit {types.DataType.Name(tensor.data_type)} {list(tensor.dims)}")
            side = max(list(data.dims)[:2] or [0])
            if limits.get("max_side") and side > limits["max_side"]:
                problems.append(f"{where}: side {side} beyond max_side {limits['max_side']}")
            if data.WhichOneof("input_data_type") is None:
                problems.append(f"{where}: input {name!r} has no data (zero_data, random_data or input_data_file)")
    return problems


def validate_repository(repo) -> dict[str, object]:
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
