#!/usr/bin/env bash
# The GPU check, one command on the GPU machine (DESIGN.md: torch+CUDA, nvcc, no network, no faiss): builds and
# installs the engine there (its CUDA launchers compiled for that machine's nvcc), records `moduseg info --json`,
# runs the GPU parity tests (compiled ops on CUDA vs their CPU launchers, the device pipeline vs the CPU one), times
# the ops on the GPU (bench/kernels.py --cuda) and the engine end to end on CUDA (bench/throughput.py --device cuda:
# images/s beside the backbone alone, device ms per stage, host ms per image, launches per batch, peak memory; with
# the device proposer, the default, and again with the host's), and the proposer's kernels and the whole proposer on
# the GPU beside their CPU launchers and today's host steps (bench/proposer_device.py), and writes everything to OUT
# (the first argument).
# Prepare its inputs here first with scripts/gpu_prepare.sh (carried: .whl and .gpu_data). Meant to finish within
# 8 minutes; each step has its own time limit and a failing step does not stop the others.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-gpu_out}}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
PYTHON=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 MODUSEG_CACHE=/tmp/moduseg-cache MODUSEG_DATA="$PWD/.gpu_data"
status=0
step() {  # step NAME SECONDS COMMAND...: run, log to $OUT/NAME.log, record the exit code
  local name=$1 seconds=$2
  shift 2
  echo "== $name"
  timeout "$seconds" "$@" > "$OUT/$name.log" 2>&1
  local code=$?
  echo "$name: exit $code" | tee -a "$OUT/summary.txt"
  tail -n 40 "$OUT/$name.log"
  [ "$code" -eq 0 ] || status=1
}

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; "$PYTHON" --version
  "$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"
} > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

if ls .whl/*.whl > /dev/null 2>&1; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
step build 300 "$PYTHON" -m pip install -v --no-build-isolation --no-deps --target /tmp/engine .
export PYTHONPATH=/tmp/engine:$PYTHONPATH
step import 60 "$PYTHON" -c "import engine, engine._C; print(engine.__file__, engine.__version__)"
step info 60 bash -c "cd /tmp && '$PYTHON' -m engine.cli info --json > '$OUT/info.json'; cat '$OUT/info.json'"
step tests 240 bash -c "cd tests && '$PYTHON' -m pytest test_gpu.py -q -rA -p no:cacheprovider --junitxml='$OUT/tests.xml'"
step kernels 120 "$PYTHON" bench/kernels.py --cuda --quick --repeats 3
step throughput 240 "$PYTHON" bench/throughput.py --device cuda --images .gpu_data/voc2012-mini/JPEGImages \
  --limit 24 --repeats 3 --no-kernels --json "$OUT/throughput.json"
step throughput_host_proposer 180 "$PYTHON" bench/throughput.py --device cuda --host-proposer \
  --images .gpu_data/voc2012-mini/JPEGImages --limit 24 --repeats 2 --no-kernels --no-reference \
  --json "$OUT/throughput_host_proposer.json"
step proposer 120 "$PYTHON" bench/proposer_device.py --cuda --images .gpu_data/voc2012-mini/JPEGImages --limit 24
cat "$OUT/summary.txt"
exit $status
