"""A supervised tritonserver process over a model repository (`moduseg serve`, the tests, bench/serving.py).

LocalServer starts the server from its own venv (server_env.py) bound to 127.0.0.1, waits until every model it loads
is ready, and ends it by its process id; a guard (guard.py) on its public HTTP port refuses requests that would make
tritonserver 2.51 abort. The server gets SIGTERM when the process that started it dies (Linux), so it never outlives
its owner holding its ports.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Sequence

from ..errors import InputError, ModelError
from ..export.triton_config import validate_repository
from .guard import DEFAULT_MAX_REQUEST_BYTES, HttpGuard, new_token, restricted_api_arg
from .server_env import server_env


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
    http_guard: put guard.HttpGuard on the HTTP port (tritonserver's own HTTP port is then a private one,
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
