"""Triton model-repository generation for the backbones, config validation, and a local server over a repository.

A repository follows Triton's layout exactly, so NGC's tritonserver loads it unchanged:

    REPO/<model>/config.pbtxt
    REPO/<model>/1/model.onnx     variant "onnx":     platform "onnxruntime_onnx", KIND_GPU instances
    REPO/<model>/1/model.plan     variant "tensorrt": platform "tensorrt_plan", KIND_GPU instances
    REPO/<model>/1/model.py       variant "python":   backend "python" running model.onnx (next to it) through
                                                      onnxruntime on CPU, KIND_CPU instances

<model> is `<backbone with "/" -> "_">_<variant>`, e.g. `effnet-lite2_block19_onnx`. Every model has a batch dimension
(max_batch_size), dynamic batching, and -1 for H and W: the engine pads images to a multiple of the stride and sends
each padded size as its own request. Each written config.pbtxt is validated by parsing it into tritonclient's
ModelConfig protobuf (`validate_config`).

The python variant is the one this CPU-only workplace serves for real (tritonserver 2.51 from nvidia-pytriton, python
backend only, in its own venv made by scripts/triton_env.sh); the GPU variants are for the NGC container.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..errors import InputError, ModelError
from ..models.backbones import model_path
from ..models.runtime import tensorrt_unavailable_reason
from ..registry import DEFAULT_BACKBONE, TRITON_VARIANTS, backbone_spec, triton_model_name
from .tensorrt import build_engine

LOG = logging.getLogger(__name__)
VARIANTS = TRITON_VARIANTS
#: requests of up to this many images; the dynamic batcher merges requests of equal padded size up to it.
DEFAULT_MAX_BATCH_SIZE = 8
#: how long the dynamic batcher may hold a request to fill a batch.
DEFAULT_QUEUE_DELAY_US = 2000
#: the server's own venv (scripts/triton_env.sh), relative to the repository root of the engine's sources.
SERVER_ENV_DIR = ".triton-venv"
SERVER_LAUNCHER = "bin/moduseg-tritonserver"
_MODEL_FILES = {"python": "model.py", "onnx": "model.onnx", "tensorrt": "model.plan"}
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


def render_config(name: str, variant: str, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec],
                  max_batch_size: int = DEFAULT_MAX_BATCH_SIZE, instances: int = 1,
                  queue_delay_us: int = DEFAULT_QUEUE_DELAY_US, num_threads: int = 0,
                  gpus: Sequence[int] | None = None) -> str:
    """config.pbtxt text of one model.

    variant: "python" (backend python, CPU instances), "onnx" (onnxruntime_onnx) or "tensorrt" (tensorrt_plan), the
        last two with GPU instances.
    max_batch_size: largest batch per execution; requests are merged up to it by the dynamic batcher. A TensorRT plan
        must have been built with a profile whose max batch is at least this.
    instances: model instances (per GPU for the GPU variants; parallel CPU executions for python).
    queue_delay_us: how long the dynamic batcher may wait to fill a batch (latency it may add).
    num_threads: python variant: onnxruntime intra-op threads per instance (0 = onnxruntime's choice).
    gpus: GPU ids for the GPU variants' instance group (None: every visible GPU).
    """
    if variant not in VARIANTS:
        raise InputError(f"unknown Triton variant {variant!r}; known variants: {', '.join(VARIANTS)}")
    if max_batch_size < 1 or instances < 1 or queue_delay_us < 0 or num_threads < 0:
        raise InputError(f"max_batch_size and instances must be >= 1, queue_delay_us and num_threads >= 0; got "
                         f"{max_batch_size}, {instances}, {queue_delay_us}, {num_threads}")
    lines = [f"# generated by moduseg triton-repo ({variant} variant)", f"name: {_quote(name)}"]
    if variant == "python":
        lines.append('backend: "python"')
    elif variant == "onnx":
        lines += ['platform: "onnxruntime_onnx"', 'default_model_filename: "model.onnx"']
    else:
        lines += ['platform: "tensorrt_plan"', 'default_model_filename: "model.plan"']
    lines.append(f"max_batch_size: {max_batch_size}")
    lines += _tensors("input", inputs) + _tensors("output", outputs)
    lines += ["dynamic_batching {", f"  max_queue_delay_microseconds: {queue_delay_us}", "}"]
    kind = "KIND_CPU" if variant == "python" else "KIND_GPU"
    group = ["instance_group [", "  {", f"    count: {instances}", f"    kind: {kind}"]
    if gpus is not None and variant != "python":
        group.append(f"    gpus: [ {', '.join(str(int(g)) for g in gpus)} ]")
    lines += group + ["  }", "]"]
    if variant == "python":
        lines += ["parameters [",
                  "  {", '    key: "onnx_file"', '    value: { string_value: "model.onnx" }', "  },",
                  "  {", '    key: "num_threads"', f'    value: {{ string_value: "{num_threads}" }}', "  }", "]"]
    return "\n".join(lines) + "\n"


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
    if problems:
        raise ModelError(f"{where}: {'; '.join(problems)}")
    return config


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
                     plan_path: str | os.PathLike | None = None, max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
                     instances: int = 1, num_threads: int = 0, cache_dir: str | os.PathLike | None = None,
                     ) -> dict[str, Path]:
    """Write (or refresh) a Triton model repository for `backbone` under `out`; returns {model name: model dir}.

    variants: any of "python", "onnx", "tensorrt".
    with_models: also place the model files: model.onnx (python and onnx variants; the cached export, exported first
        if missing, or `onnx_path`) and model.plan (tensorrt; `plan_path`, or built here when TensorRT and a GPU
        exist). False writes configs and model.py only (what the repository's triton_models/ holds).
    max_batch_size, instances, num_threads: see render_config.
    """
    backbone = backbone or DEFAULT_BACKBONE
    backbone_spec(backbone)  # unknown names fail here, naming the known ones
    variants = list(dict.fromkeys(variants))
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        raise InputError(f"unknown Triton variants {unknown}; choose from {', '.join(VARIANTS)}")
    inputs, outputs = backbone_io(backbone)
    out = Path(out)
    onnx_source = None
    if with_models and ({"python", "onnx"} & set(variants) or ("tensorrt" in variants and plan_path is None)):
        if onnx_path is not None:
            onnx_source = Path(onnx_path)
            if not onnx_source.is_file():
                raise InputError(f"onnx_path {onnx_source} is not a file")
        else:
            onnx_source = model_path(backbone, cache_dir)
    written = {}
    for variant in variants:
        name = triton_model_name(backbone, variant)
        model_dir = out / name
        version_dir = model_dir / "1"
        version_dir.mkdir(parents=True, exist_ok=True)
        text = render_config(name, variant, inputs, outputs, max_batch_size=max_batch_size, instances=instances,
                             num_threads=num_threads)
        validate_config(text, name)
        (model_dir / "config.pbtxt").write_text(text)
        if variant == "python":
            shutil.copyfile(_PYTHON_MODEL_SOURCE, version_dir / "model.py")
        if with_models and variant in ("python", "onnx"):
            _place(onnx_source, version_dir / "model.onnx")
        if with_models and variant == "tensorrt":
            if plan_path is not None:
                _place(Path(plan_path), version_dir / "model.plan")
            else:
                reason = tensorrt_unavailable_reason()
                if reason is not None:
                    LOG.warning("%s: config only, no model.plan (%s); build the plan where TensorRT and a GPU are, "
                                "with the server's TensorRT version (docs/serving.md)", name, reason)
                else:
                    build_engine(onnx_source, version_dir / "model.plan", backbone=backbone,
                                 max_batch_size=max_batch_size)
        written[name] = model_dir
    return written


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

def _source_root() -> Path | None:
    """The engine's source checkout (where scripts/triton_env.sh lives), or None for an installed package."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / "scripts" / "triton_env.sh").is_file() else None


def default_env_dir() -> Path:
    """$MODUSEG_TRITON_ENV, else .triton-venv in the source checkout, else .triton-venv in the working directory."""
    if os.environ.get("MODUSEG_TRITON_ENV"):
        return Path(os.environ["MODUSEG_TRITON_ENV"])
    return (_source_root() or Path.cwd()) / SERVER_ENV_DIR


def server_env(env_dir: str | os.PathLike | None = None) -> Path:
    """The tritonserver launcher of the server venv (scripts/triton_env.sh); ModelError if it is not there."""
    env = Path(env_dir) if env_dir is not None else default_env_dir()
    launcher = env / SERVER_LAUNCHER
    if not launcher.is_file():
        raise ModelError(f"no Triton server environment at {env}: create it with `bash scripts/triton_env.sh {env}` "
                         f"(or point MODUSEG_TRITON_ENV at one)")
    return launcher


def ensure_server_env(env_dir: str | os.PathLike | None = None, script: str | os.PathLike | None = None) -> Path:
    """Create the server venv with scripts/triton_env.sh if needed (idempotent: fast when it exists); returns its
    launcher. `script` defaults to the source checkout's scripts/triton_env.sh."""
    env = Path(env_dir) if env_dir is not None else default_env_dir()
    if script is None:
        if _source_root() is None:
            return server_env(env)  # an installed engine: the venv must have been made from a checkout
        script = _source_root() / "scripts" / "triton_env.sh"
    result = subprocess.run(["bash", str(script), str(env.resolve())], capture_output=True, text=True)
    if result.returncode != 0:
        raise ModelError(f"creating the Triton server environment {env} failed ({script}):\n"
                         f"{(result.stdout + result.stderr)[-3000:]}")
    return server_env(env)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class LocalServer:
    """A tritonserver process over `repo`, bound to 127.0.0.1 (HTTP, gRPC and metrics ports; 0 picks a free one).

    models: load only these models (explicit model control); None loads the repository's python-backend models,
        the only backend this server build carries (the GPU variants need NGC's server).
    start() launches it and waits until every loaded model is ready (or the process dies: its log is in
    the error); stop() ends that process by its id (SIGTERM, then SIGKILL after `grace` seconds). A context manager.
    """

    def __init__(self, repo: str | os.PathLike, http_port: int = 0, grpc_port: int = 0, metrics_port: int = 0,
                 models: Sequence[str] | None = None, env_dir: str | os.PathLike | None = None,
                 log_path: str | os.PathLike | None = None, extra_args: Sequence[str] = ()) -> None:
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
            if configs[name].backend == "python" and not any((self.repo / name).glob("[0-9]*/model.onnx")):
                raise ModelError(f"{self.repo / name} has no model.onnx next to its model.py: fill the repository "
                                 f"with `moduseg triton-repo --out {self.repo}`")
        self.launcher = server_env(env_dir)
        self.http_port = http_port or free_port()
        self.grpc_port = grpc_port or free_port()
        self.metrics_port = metrics_port or free_port()
        self.log_path = Path(log_path) if log_path else None
        self.extra_args = list(extra_args)
        self.process: subprocess.Popen | None = None
        self._log = None

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
        return [str(self.launcher), f"--model-repository={self.repo}",
                "--http-address=127.0.0.1", f"--http-port={self.http_port}",
                "--grpc-address=127.0.0.1", f"--grpc-port={self.grpc_port}",
                "--metrics-address=127.0.0.1", f"--metrics-port={self.metrics_port}",
                "--allow-metrics=true", "--allow-gpu-metrics=false", "--exit-on-error=true",
                "--strict-readiness=true", "--model-control-mode=explicit",
                *[f"--load-model={name}" for name in self.models], *self.extra_args]

    def start(self, timeout: float = 120.0) -> "LocalServer":
        if self.log_path is None:
            import tempfile

            self.log_path = Path(tempfile.mkstemp(prefix="tritonserver-", suffix=".log")[1])
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(self.command(), stdout=self._log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True)
        try:
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
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> "LocalServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
