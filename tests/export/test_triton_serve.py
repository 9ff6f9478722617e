"""The local server (engine/export/triton.py, `moduseg serve` and `moduseg triton-env`): the server venv is found
(or made, by the script shipped in the package) without looking in the working folder."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from engine.errors import ModelError
from engine.export import triton as tx

pytest.importorskip("tritonclient.grpc", reason="tritonclient[http,grpc] is not installed")


# ------------------------------------------------------------------------------------------------- the venv

def test_the_server_env_is_found_by_variable_checkout_or_user_folder_never_the_working_folder(tmp_path,
                                                                                              monkeypatch):
    def make_env(path: Path) -> Path:
        (path / "bin").mkdir(parents=True)
        (path / tx.SERVER_LAUNCHER).write_text("#!/bin/sh\n")
        return path

    work = tmp_path / "work"
    make_env(work / tx.SERVER_ENV_DIR)  # ./.triton-venv: never used unless named
    monkeypatch.chdir(work)
    monkeypatch.delenv(tx.ENV_VARIABLE, raising=False)
    monkeypatch.setenv("MODUSEG_CACHE", str(tmp_path / "cache"))
    # an installed engine (no checkout around it): the per-user venv
    monkeypatch.setattr(tx, "_source_root", lambda: None)
    assert tx.default_env_dir() == tmp_path / "cache" / tx.USER_ENV_DIR
    with pytest.raises(ModelError, match=r"make one with `moduseg triton-env.*pass --env \.triton-venv"):
        tx.server_env()
    make_env(tmp_path / "cache" / tx.USER_ENV_DIR)
    assert tx.server_env() == tmp_path / "cache" / tx.USER_ENV_DIR / tx.SERVER_LAUNCHER
    # run from a checkout: its .triton-venv first when it holds one, else the per-user one
    checkout = tmp_path / "checkout"
    monkeypatch.setattr(tx, "_source_root", lambda: checkout)
    assert tx.default_env_dir() == tmp_path / "cache" / tx.USER_ENV_DIR
    make_env(checkout / tx.SERVER_ENV_DIR)
    assert tx.default_env_dir() == checkout / tx.SERVER_ENV_DIR
    # the variable wins, alone
    monkeypatch.setenv(tx.ENV_VARIABLE, str(tmp_path / "named"))
    assert tx.default_env_dir() == tmp_path / "named"
    with pytest.raises(ModelError, match=f"no Triton server environment at {tmp_path / 'named'}:"):
        tx.server_env()
    # the script that makes one ships inside the package, and a checkout's scripts/ runs it
    assert tx.ENV_SCRIPT.is_file() and tx.ENV_SCRIPT.parent == Path(tx.__file__).parent


@pytest.mark.slow
def test_an_installed_engine_makes_its_server_env_with_moduseg_triton_env(tmp_path):
    """`moduseg triton-env` of a regular (non-editable) install, run outside any checkout: the packaged script
    copies the installed engine (its compiled module included) into the server venv with its requirements."""
    import site

    import engine

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    installed = tmp_path / "installed"
    shutil.copytree(os.path.dirname(engine.__file__), installed / "engine",
                    ignore=shutil.ignore_patterns("__pycache__"))
    dist_infos = [d for p in site.getsitepackages() for d in Path(p).glob("moduseg_engine-*.dist-info")]
    if not dist_infos:
        pytest.skip("moduseg-engine's dist-info is not in this environment's site-packages")
    shutil.copytree(dist_infos[0], installed / dist_infos[0].name)
    (purelib,) = (venv / "lib").glob("python3*/site-packages")
    (purelib / "moduseg_test.pth").write_text("\n".join([str(installed), *site.getsitepackages()]) + "\n")
    env = tmp_path / "server-env"
    run = subprocess.run([str(venv / "bin" / "python"), "-m", "engine.cli", "triton-env", "--env", str(env)],
                         cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    assert "ready:" in run.stdout and (env / tx.SERVER_LAUNCHER).is_file()
    assert "engine-installed-" in (env / ".moduseg-triton-env").read_text()
    check = subprocess.run([str(env / "bin" / "python"), "-c",
                            "import engine, engine._C, numpy; print(engine.__file__, numpy.__version__)"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stderr[-2000:]
    where, numpy_version = check.stdout.split()
    assert where.startswith(str(env)) and numpy_version.startswith("1.")
