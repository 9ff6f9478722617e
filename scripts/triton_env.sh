#!/usr/bin/env bash
# Create (idempotently) the Triton server's own venv, default .triton-venv/ in the repository root: this checkout's
# engine/serving/triton_env.sh (shipped with the package; an installed engine runs it as `moduseg triton-env`).
#
#   bash scripts/triton_env.sh [DIR]        # PYTHON=python3.11 to choose the interpreter (3.8-3.13)
set -euo pipefail
exec bash "$(dirname "${BASH_SOURCE[0]}")/../engine/serving/triton_env.sh" "$@"
