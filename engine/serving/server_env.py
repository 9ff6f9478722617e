"""The local Triton server's own venv: where it is looked for, and making it (triton_env.sh, shipped in the package).

tritonserver 2.51 comes from nvidia-pytriton with the python backend only, in a venv of its own (numpy<2) holding the
engine too, so that the segmentation model's python backend imports it. The GPU variants need NGC's server.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from ..errors import ModelError

#: the server's own venv (scripts/triton_env.sh), relative to the repository root of the engine's sources.
SERVER_ENV_DIR = ".triton-venv"
SERVER_LAUNCHER = "bin/moduseg-tritonserver"
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

