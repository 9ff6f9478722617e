"""Triton model repositories of the backbones: the layout, the model files and the TensorRT plans placed in it.

A repository follows Triton's layout exactly, so NGC's tritonserver loads it unchanged:

    REPO/<model>/config.pbtxt
    REPO/<model>/1/model.onnx         variant "onnx":     platform "onnxruntime_onnx", KIND_GPU instances
    REPO/<model>/1/model.sm80.plan    variant "tensorrt": platform "tensorrt_plan", KIND_GPU instances, one plan per
    REPO/<model>/1/model.sm80.plan.json                   compute capability (cc_model_filenames) with its record
                                                          (TensorRT version, GPU, profile limits) beside it
    REPO/<model>/1/model.py           variant "python":   backend "python" running model.onnx (next to it) through
                                                          onnxruntime on CPU, KIND_CPU instances; optionally a packed
                                                          environment (EXECUTION_ENV_PATH) that brings onnxruntime

<model> is `<backbone with "/" -> "_">_<variant>`, e.g. `effnet-lite2_block19_onnx`. The configs are built by
engine.export.triton_config; the python variant's model.py is triton_python_model.py, copied. The python variant also
runs on a machine without a GPU (the local server of engine.serving: tritonserver 2.51 from nvidia-pytriton, python
backend only); the GPU variants need NGC's tritonserver image.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Sequence

from ..errors import InputError
from ..models.backbones import model_path
from ..models.runtime import tensorrt_unavailable_reason
from ..registry import DEFAULT_BACKBONE, backbone_spec, triton_model_name
from ..utils import ceil_div
from .tensorrt import (DEFAULT_MAX_SIDE, build_engine, default_profiles, normalise_cc, plan_filename,
                       profile_limits, read_plan_record, record_path)
from .triton_config import (DEFAULT_MAX_BATCH_SIZE, DEFAULT_PLAN_CCS, DEFAULT_QUEUE_DELAY_US, DEFAULT_WARMUP_SIDE,
                            EXECUTION_ENV_KEY, MODEL_DIR_VARIABLE, VARIANTS, backbone_config, backbone_io,
                            check_execution_env, write_config)

LOG = logging.getLogger(__name__)
#: the python variant's model.py, copied unchanged into the version directory
PYTHON_MODEL_SOURCE = Path(__file__).with_name("triton_python_model.py")


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
    max_batch_size, instances, num_threads, queue_delay_us, gpus: see triton_config.backbone_config.
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
            extra["execution_env"] = execution_env_value(name, model_dir, execution_env, with_models)
        warmup_side = 0
        if warmup:
            warmup_side = ceil_div(DEFAULT_WARMUP_SIDE, spec.padding) * spec.padding
            if limits["max_side"] and warmup_side > limits["max_side"]:
                warmup_side = limits["max_side"] // spec.padding * spec.padding
        config = backbone_config(name, variant, inputs, outputs, num_threads=num_threads, warmup_side=warmup_side,
                                 min_side=limits["min_side"], max_side=limits["max_side"], **common, **extra)
        write_config(model_dir, config, f"{variant} variant")
        if variant == "python":
            shutil.copyfile(PYTHON_MODEL_SOURCE, version_dir / "model.py")
        if with_models and variant in ("python", "onnx"):
            place_file(onnx_source, version_dir / "model.onnx")
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
            place_file(source, target)
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


def execution_env_value(name: str, model_dir: Path, value, with_models: bool) -> str:
    """The EXECUTION_ENV_PATH value for write_repository's execution_env (see there)."""
    text = os.fspath(value)
    if text.startswith(MODEL_DIR_VARIABLE) or "TRITON_MODEL_DIRECTORY" in text:
        return check_execution_env(text)
    local = Path(text)
    if local.is_file():
        if with_models:
            place_file(local, model_dir / local.name)
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


def place_file(source: Path, target: Path) -> None:
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

