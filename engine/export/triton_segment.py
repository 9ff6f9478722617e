"""The server-side segmentation model of a Triton repository: config, model file and bank.

    REPO/moduseg_segment/config.pbtxt    backend "python", KIND_CPU instances (KIND_GPU with device "cuda"), ragged
                                         dynamic batching
    REPO/moduseg_segment/1/model.py      `from engine.export.triton_segment_model import TritonPythonModel`, after
                                         dropping the server's working folder from sys.path
    REPO/moduseg_segment/1/bank/         the feature bank (hard links to the bank's files where possible)

The model calls the repository's backbone model (any variant) through BLS, so the repository must hold one; the
bank lives in the version directory, so a new bank is a new version. With device "cuda" each instance runs the
engine's device pipeline on its GPU (docs/serving.md, "On a GPU").
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Sequence

from ..bank import FeatureBank
from ..errors import InputError
from .triton import execution_env_value, place_file
from .triton_config import (DEFAULT_QUEUE_DELAY_US, EXECUTION_ENV_KEY, TensorSpec, check_config, check_execution_env,
                            model_config, validate_config, write_config)
from .triton_segment_model import INPUT, LABELS, SEGMENTS

#: the segmentation model's name in a repository
SEGMENT_MODEL = "moduseg_segment"
#: images per execution: requests of any size are merged up to this many (ragged batching)
DEFAULT_SEGMENT_BATCH = 8
#: where an instance runs the engine: "cpu" (KIND_CPU) or "cuda" (KIND_GPU, the device pipeline on its GPU)
SEGMENT_DEVICES = ("cpu", "cuda")
#: what the config's first line says the model is
_WHAT = "whole segmentation, python backend + BLS"
_SHIM = ('"""Triton python-backend model: the whole ModuSeg segmentation (the installed engine\'s code)."""\n'
         "import os\n"
         "import sys\n"
         "\n"
         "# the stub's interpreter puts '' (the server's working folder) first on sys.path: a checkout's engine/ there\n"
         "# (a server started from the checkout root) would shadow the installed engine\n"
         "sys.path[:] = [p for p in sys.path if p and os.path.abspath(p) != os.getcwd()]\n"
         "from engine.export.triton_segment_model import TritonPythonModel  # noqa: E402,F401\n")


def segment_io(num_classes: int) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The model's tensors (without the batch dimension): IMAGE allows ragged batches (the batcher may merge
    requests whose H and W differ; the model takes them one by one); LABELS is uint8 for up to 256 classes, else
    int32."""
    label_type = "TYPE_UINT8" if num_classes <= 256 else "TYPE_INT32"
    return ([TensorSpec(INPUT, (-1, -1, 3), "TYPE_UINT8", ragged=True)],
            [TensorSpec(LABELS, (-1, -1), label_type), TensorSpec(SEGMENTS, (1,), "TYPE_STRING")])


def segment_config(name: str, backbone_model: str, class_names, max_batch_size: int = DEFAULT_SEGMENT_BATCH,
                   instances: int = 1, queue_delay_us: int = DEFAULT_QUEUE_DELAY_US, num_threads: int = 0,
                   backbone_batch_size: int = 8, bank_dir: str = "bank", execution_env: str | None = None,
                   max_side: int | None = None, device: str = "cpu", gpus: Sequence[int] | None = None):
    """The ModelConfig of the segmentation model.

    backbone_model: the backbone model it calls (same server). class_names: the bank's, stated for clients.
    max_batch_size, queue_delay_us: the dynamic batcher's (ragged: requests of any image size are merged).
    instances: model instances (per GPU with device "cuda"), each with its own Engine and copy of the bank.
    num_threads: engine threads per instance (0 = the libraries' choice).
    backbone_batch_size: images per BLS call to the backbone (at most its max_batch_size).
    execution_env: the python backend's EXECUTION_ENV_PATH (a packed environment holding the engine), or None to
        use the server's own python environment.
    max_side: the longest image side the backbone model takes (its `max_side`, e.g. a TensorRT profile's): stated
        so that clients refuse larger images before sending and the model fails only their requests.
    device: "cpu" (KIND_CPU instances) or "cuda": KIND_GPU instances whose Engine runs on the instance's GPU
        (parameter `device`), with FORCE_CPU_ONLY_INPUT_TENSORS "no" so the python backend hands the model its
        inputs where they are (host or GPU memory) instead of copying them to the host first.
    gpus: with device "cuda", the GPU ids of the instances (None: every GPU the server sees).
    """
    if max_batch_size < 1 or instances < 1 or queue_delay_us < 0 or num_threads < 0 or backbone_batch_size < 1:
        raise InputError(f"need max_batch_size, instances, backbone_batch_size >= 1 and queue_delay_us, num_threads "
                         f">= 0; got {max_batch_size}, {instances}, {backbone_batch_size}, {queue_delay_us}, "
                         f"{num_threads}")
    if device not in SEGMENT_DEVICES:
        raise InputError(f"device must be one of {SEGMENT_DEVICES}, got {device!r}")
    if gpus is not None and device != "cuda":
        raise InputError(f"gpus {list(gpus)} place GPU instances; they need device 'cuda', not {device!r}")
    parameters = {"backbone_model": backbone_model, "bank_dir": bank_dir, "num_threads": num_threads,
                  "backbone_batch_size": backbone_batch_size, "class_names": json.dumps(list(class_names))}
    if max_side:
        parameters["max_side"] = int(max_side)
    if execution_env:
        parameters[EXECUTION_ENV_KEY] = check_execution_env(execution_env)
    if device == "cuda":
        parameters["device"] = device
        parameters["FORCE_CPU_ONLY_INPUT_TENSORS"] = "no"  # the python backend hands IMAGE over where it is, not copied
    inputs, outputs = segment_io(len(class_names))
    return model_config(name, inputs, outputs, backend="python", max_batch_size=max_batch_size, instances=instances,
                        kind="KIND_GPU" if device == "cuda" else "KIND_CPU", gpus=gpus,
                        queue_delay_us=queue_delay_us, parameters=parameters)


def write_segment_model(out: str | os.PathLike, bank: str | os.PathLike, backbone_model: str,
                        name: str = SEGMENT_MODEL, **config_options) -> Path:
    """Write the segmentation model into repository `out` with a copy of the bank directory `bank` (checked by
    loading it); returns the model directory. config_options: segment_config's; max_side defaults to the
    backbone model's, when its config is in `out`; a local execution_env archive is placed in the model directory
    (as for the backbone's python variant)."""
    source = Path(bank)
    loaded = FeatureBank.load(source)  # a bad bank fails here, not at the server's load
    backbone_config = Path(out) / backbone_model / "config.pbtxt"
    if "max_side" not in config_options and backbone_config.is_file():
        stated = validate_config(backbone_config.read_text(), backbone_model).parameters.get("max_side")
        config_options["max_side"] = int(stated.string_value) if stated is not None else None
    model_dir = Path(out) / name
    version_dir = model_dir / "1"
    version_dir.mkdir(parents=True, exist_ok=True)
    if config_options.get("execution_env"):
        config_options["execution_env"] = execution_env_value(name, model_dir, config_options["execution_env"], True)
    config = segment_config(name, backbone_model, loaded.class_names, **config_options)
    check_config(config, name)
    target = version_dir / "bank"
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir()
    for file in sorted(source.iterdir()):
        if file.is_file():
            place_file(file, target / file.name)
    (version_dir / "model.py").write_text(_SHIM)
    write_config(model_dir, config, _WHAT)
    return model_dir
