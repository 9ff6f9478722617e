#!/usr/bin/env bash
# Pack a Python execution environment for the generated python-backend models, for a Triton server whose own Python
# lacks their imports (NGC's nvcr.io/nvidia/tritonserver:<yy.mm>-py3 has the ONNX Runtime *backend*, not the
# onnxruntime Python package). The python backend takes such an environment as a conda-pack archive named by the
# model's EXECUTION_ENV_PATH parameter; `moduseg triton-repo --execution-env ARCHIVE` places the archive in the model
# directory and writes that parameter ($$TRITON_MODEL_DIRECTORY/ARCHIVE).
#
#   bash scripts/pack_triton_env.sh [--python 3.12] [--out FILE.tar.gz] [--with-engine] [--package SPEC]... [--dry-run]
#
# --python X.Y   the Python of the server's python-backend stub: it must be the same minor version (the stub embeds
#                its interpreter). Read it from the image: docker run --rm IMAGE python3 --version
# --out FILE     the archive (default moduseg-triton-py<X.Y>.tar.gz in the working directory)
# --with-engine  also install this checkout's engine (for the whole-segmentation model; its C++ extension is built
#                there, so a compiler and CMake must be on PATH)
# --package SPEC one more pip requirement (repeatable); the defaults are "numpy<2" (the python backend stub of
#                tritonserver 2.51 returns empty tensors under numpy 2) and onnxruntime (CPU: the python variant runs
#                on CPU instances)
# --dry-run      print the commands instead of running them
#
# Needs conda (or mamba / micromamba) to create the environment: conda-pack packs conda environments only. Without
# it this script says what to do and exits 2. It runs PYTHONNOUSERSITE=True so that packages outside the environment
# (~/.local) are neither used nor missed from the archive (python backend docs), and checks the archive's imports.
set -euo pipefail
CALLER=$PWD   # a relative --out is relative to where the script is called from
cd "$(dirname "$0")/.."
ROOT=$PWD

PY=3.12
OUT=
WITH_ENGINE=0
DRY=0
PACKAGES=("numpy<2" "onnxruntime")

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
    case "$1" in
        --python) PY="${2:?--python needs X.Y}"; shift 2 ;;
        --python=*) PY="${1#*=}"; shift ;;
        --out) OUT="${2:?--out needs a file name}"; shift 2 ;;
        --out=*) OUT="${1#*=}"; shift ;;
        --with-engine) WITH_ENGINE=1; shift ;;
        --package) PACKAGES+=("${2:?--package needs a requirement}"); shift 2 ;;
        --package=*) PACKAGES+=("${1#*=}"); shift ;;
        --dry-run) DRY=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "pack_triton_env: unknown argument $1 (--help lists them)" >&2; exit 2 ;;
    esac
done
if ! [[ "$PY" =~ ^3\.[0-9]+$ ]]; then
    echo "pack_triton_env: --python takes MAJOR.MINOR, e.g. 3.12 (the server stub's Python), got '$PY'" >&2
    exit 2
fi
OUT="${OUT:-moduseg-triton-py$PY.tar.gz}"
case "$OUT" in
    *.tar.gz|*.tgz) ;;
    *) echo "pack_triton_env: --out must end in .tar.gz (the python backend unpacks gzip'd tar archives)" >&2; exit 2 ;;
esac
case "$OUT" in /*) ;; *) OUT="$CALLER/$OUT" ;; esac

CONDA=
for tool in conda mamba micromamba; do
    if command -v "$tool" >/dev/null 2>&1; then CONDA=$tool; break; fi
done
if [ -z "$CONDA" ] && [ "$DRY" = 0 ]; then
    cat >&2 <<EOF
pack_triton_env: no conda, mamba or micromamba on PATH. conda-pack packs conda environments only, so:
  - install Miniforge (conda-forge's installer) or micromamba, then run this script again (on any x86-64 Linux
    machine: the archive holds its own Python, of the version --python names); or
  - skip the packed environment: serve the onnx or tensorrt variant (NGC's ONNX Runtime / TensorRT backends need
    no Python packages), or build a derived image with 'pip install "numpy<2" onnxruntime' on top of the -py3 image.
EOF
    exit 2
fi
CONDA="${CONDA:-conda}"

PREFIX="${TMPDIR:-/tmp}/moduseg-triton-env-$$"
run() {
    if [ "$DRY" = 1 ]; then printf '+'; printf ' %q' "$@"; printf '\n'; else "$@"; fi
}
cleanup() { if [ "$DRY" = 0 ]; then rm -rf "$PREFIX"; fi; }
trap cleanup EXIT

export PYTHONNOUSERSITE=True
run "$CONDA" create -y -q -p "$PREFIX" -c conda-forge "python=$PY" pip "libstdcxx-ng>=12"
run "$PREFIX/bin/python" -m pip install -q "${PACKAGES[@]}"
if [ "$WITH_ENGINE" = 1 ]; then
    # built against the environment's numpy<2 (the compiled module binds numpy at run time)
    run "$PREFIX/bin/python" -m pip install -q "${PACKAGES[@]}" "$ROOT[cpu]"
fi
run "$PREFIX/bin/python" -c "import numpy, onnxruntime; print('numpy', numpy.__version__, 'onnxruntime', onnxruntime.__version__)"
run "$PREFIX/bin/python" -m pip install -q conda-pack
run "$PREFIX/bin/python" -m conda_pack -p "$PREFIX" -o "$OUT" --force --ignore-editable-packages
if [ "$DRY" = 0 ]; then
    echo "packed $OUT ($(du -h "$OUT" | cut -f1)); use it with:"
    echo "  moduseg triton-repo --out REPO --variants python --execution-env $OUT"
fi
