#!/usr/bin/env bash
# Install the engine with its test dependencies into .venv and run the whole test suite (what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/triton_env.sh            # the Triton server's own venv (numpy<2) for the real-server tests
if [ ! -x .venv/bin/python ]; then python3 -m venv .venv; fi
. .venv/bin/activate
pip install -q --upgrade pip
pip install -q torch==2.13.0          # the CPU wheel; an unpinned torch pulls a multi-GB CUDA build
pip install -q ".[cpu,export,test]"  # cpu: onnxruntime + faiss-cpu (the gpu extra has their GPU builds)
# Run from tests/ so that `import engine` is the installed package (with its compiled extension), not the sources.
cd tests && python -m pytest -ra "$@"
