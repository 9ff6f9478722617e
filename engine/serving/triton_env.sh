#!/usr/bin/env bash
# Create (idempotently) the Triton server's own virtual environment. Shipped inside the engine package
# (engine/serving/triton_env.sh); `moduseg triton-env` runs it, and so does scripts/triton_env.sh in a checkout.
#
# It holds the real tritonserver 2.51 (python backend only) shipped inside nvidia-pytriton==0.7.0, numpy<2 (the python
# backend stub silently returns empty tensors with numpy 2), onnxruntime, which the generated python-backend backbone
# model runs on CPU, and the engine, which the whole-segmentation model (moduseg_segment) runs:
#   - run from a checkout (this file in <checkout>/engine/serving/): the checkout's engine, built here on numpy 1.26;
#     DIR defaults to <checkout>/.triton-venv;
#   - run from an installed engine: a copy of the installed package (its compiled module included: the venv's Python
#     must be the version it was built for) and its requirements; DIR defaults to $MODUSEG_CACHE/triton-venv, else
#     ~/.cache/moduseg/triton-venv.
# The engine and its tests keep their own venv (numpy 2) and talk to the server through tritonclient only. The stamp
# holds a digest of the engine's files, so a changed engine is reinstalled.
#
#   bash triton_env.sh [DIR]        # PYTHON=python3.11 to choose the interpreter (3.8-3.13); DIR relative to here
#
# Afterwards DIR/bin/moduseg-tritonserver starts the server with the right environment (LD_LIBRARY_PATH: the
# interpreter's libdir + nvidia_pytriton.libs; PATH: DIR/bin; --backend-directory: DIR/triton-backends, which holds
# the python backend and the stub built for this interpreter's version). A second run only checks and returns.
set -euo pipefail
PACKAGE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"   # the engine package this script belongs to
ROOT="$(dirname "$PACKAGE")"
if [ -f "$ROOT/pyproject.toml" ] && [ -d "$ROOT/csrc" ]; then
    MODE=checkout
    DEFAULT_DIR="$ROOT/.triton-venv"
else
    MODE=installed
    DEFAULT_DIR="${MODUSEG_CACHE:-$HOME/.cache/moduseg}/triton-venv"
fi
DIR="${1:-$DEFAULT_DIR}"
mkdir -p "$(dirname "$DIR")"
DIR="$(cd "$(dirname "$DIR")" && pwd)/$(basename "$DIR")"
PYTHON="${PYTHON:-python3}"
PYTRITON_VERSION=0.7.0
STAMP="$DIR/.moduseg-triton-env"
if [ "$MODE" = checkout ]; then
    ENGINE_DIGEST=$(cd "$ROOT" && find engine csrc CMakeLists.txt pyproject.toml -type f \( -name '*.py' -o -name '*.cpp' \
        -o -name '*.h' -o -name '*.sh' -o -name 'CMakeLists.txt' -o -name '*.toml' \) | LC_ALL=C sort | xargs sha256sum \
        | sha256sum | cut -c1-16)
else
    ENGINE_DIGEST=$(cd "$PACKAGE" && find . -type f -not -path '*/__pycache__/*' | LC_ALL=C sort | xargs sha256sum \
        | sha256sum | cut -c1-16)
fi
WANT="nvidia-pytriton==$PYTRITON_VERSION numpy<2 onnxruntime engine-$MODE-$ENGINE_DIGEST v4"

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && [ -x "$DIR/bin/moduseg-tritonserver" ]; then
    echo "triton server env ready: $DIR"
    exit 0
fi

start=$(date +%s)
if [ ! -x "$DIR/bin/python" ]; then
    # a venv's python must be a real interpreter with a shared libpython: the stub embeds it
    "$PYTHON" -m venv "$DIR"
fi
"$DIR/bin/python" -m pip install -q --upgrade pip
"$DIR/bin/python" -m pip install -q "numpy<2" onnxruntime "faiss-cpu==1.15.1"
# the engine itself (its compiled module works on numpy 1.26: pybind11 binds numpy at run time)
if [ "$MODE" = checkout ]; then
    # this server runs on the CPU, so its engine is built without the CUDA launchers (MODUSEG_CUDA=0 saves nvcc)
    (cd "$ROOT" && MODUSEG_CUDA=0 "$DIR/bin/python" -m pip install -q "numpy<2" .)
    # pip keeps an installed version of the same number
    (cd "$ROOT" && MODUSEG_CUDA=0 "$DIR/bin/python" -m pip install -q --no-deps --force-reinstall .)
else
    suffix=$("$DIR/bin/python" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
    if ! ls "$PACKAGE"/_C*"$suffix" >/dev/null 2>&1; then
        echo "the installed engine's compiled module ($(ls "$PACKAGE"/_C* 2>/dev/null | xargs -n1 basename)) is not" \
             "for $DIR/bin/python ($suffix): remove $DIR and rerun with PYTHON set to the engine's interpreter" >&2
        exit 1
    fi
    metadata=$(ls -d "$ROOT"/moduseg_engine-*.dist-info 2>/dev/null | head -1)/METADATA
    if [ ! -f "$metadata" ]; then
        echo "no moduseg_engine-*.dist-info/METADATA next to $PACKAGE: cannot read the engine's requirements" >&2
        exit 1
    fi
    mapfile -t requirements < <(sed -n 's/^Requires-Dist: //p' "$metadata" | grep -v 'extra ==' || true)
    "$DIR/bin/python" -m pip install -q "numpy<2" "${requirements[@]}"
    "$DIR/bin/python" -m pip uninstall -q -y moduseg-engine >/dev/null 2>&1 || true   # one built by a checkout run
    site=$("$DIR/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    rm -rf "$site/engine"
    cp -R "$PACKAGE" "$site/engine"
    find "$site/engine" -name __pycache__ -type d -prune -exec rm -rf {} +
fi
# pytriton's own Python dependencies (tritonclient, grpcio, gevent, typer, ...) are not needed to run its tritonserver
# binary: install the package alone (and never import it)
"$DIR/bin/python" -m pip install -q --no-deps "nvidia-pytriton==$PYTRITON_VERSION"

"$DIR/bin/python" - "$DIR" <<'PY'
import os, shutil, stat, sys, sysconfig
from pathlib import Path

env = Path(sys.argv[1]).resolve()
from importlib.util import find_spec

root = Path(list(find_spec("pytriton").submodule_search_locations)[0]).resolve()
dist = root / "tritonserver"
libs = root.parent / "nvidia_pytriton.libs"
version = f"{sys.version_info[0]}.{sys.version_info[1]}"
stub = dist / "python_backend_stubs" / version / "triton_python_backend_stub"
if not stub.is_file():
    sys.exit(f"nvidia-pytriton has no python backend stub for Python {version} ({stub})")
libdir = sysconfig.get_config_var("LIBDIR")
soname = sysconfig.get_config_var("INSTSONAME") or f"libpython{version}.so.1.0"
if not (Path(libdir) / soname).exists():
    sys.exit(f"this interpreter has no shared {soname} in {libdir}; the python backend stub needs one "
             f"(use an interpreter built with --enable-shared, e.g. Debian's python3 or pyenv with "
             f"PYTHON_CONFIGURE_OPTS=--enable-shared)")

backends = env / "triton-backends"
python_backend = backends / "python"
shutil.rmtree(backends, ignore_errors=True)
python_backend.mkdir(parents=True)
# real copies, not links: the python backend looks for the stub next to its library's resolved location and, not
# finding it there, would treat the model as a "python-based backend" and never import model.py
for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
    shutil.copy2(dist / "backends" / "python" / name, python_backend / name)
shutil.copy2(stub, python_backend / "triton_python_backend_stub")
os.chmod(python_backend / "triton_python_backend_stub", 0o755)

launcher = env / "bin" / "moduseg-tritonserver"
launcher.write_text(f"""#!/usr/bin/env bash
# tritonserver from nvidia-pytriton with the environment its python backend needs (written by scripts/triton_env.sh)
export LD_LIBRARY_PATH="{libdir}:{libs}${{LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}}"
export PATH="{env / 'bin'}:$PATH"
exec "{dist / 'bin' / 'tritonserver'}" --backend-directory="{backends}" "$@"
""")
launcher.chmod(launcher.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
# every shared library of the server, the backend and the stub must resolve in that environment
import subprocess

search = {**os.environ, "LD_LIBRARY_PATH": f"{libdir}:{libs}"}
for binary in (dist / "bin" / "tritonserver", dist / "backends" / "python" / "libtriton_python.so",
               python_backend / "triton_python_backend_stub"):
    listing = subprocess.run(["ldd", str(binary)], env=search, capture_output=True, text=True).stdout
    missing = [line.strip() for line in listing.splitlines() if "not found" in line]
    if missing:
        sys.exit(f"{binary} cannot load {missing}")
print(f"tritonserver: {dist / 'bin' / 'tritonserver'}; stub for Python {version}; libpython in {libdir}")
PY

echo "$WANT" > "$STAMP"
echo "triton server env created in $DIR in $(( $(date +%s) - start )) s ($(du -sh "$DIR" | cut -f1))"
