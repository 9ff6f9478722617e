#!/usr/bin/env bash
# Install the engine and run the main job: a feature bank from a VOC-layout train split, then mIoU on its val split.
#   bash scripts/run_voc.sh [DATA_ROOT] [OUT_DIR]
# DATA_ROOT defaults to ../shared/data/voc2012-mini; extra knobs go through MODUSEG_ARGS (e.g. "--top-k 5").
set -euo pipefail
cd "$(dirname "$0")/.."
data=${1:-../shared/data/voc2012-mini}
out=${2:-runs/$(basename "$data")}
masks=${MODUSEG_MASKS:-gt}
proposals=${MODUSEG_PROPOSALS:-gt}

if [ ! -x .venv/bin/python ]; then python3 -m venv .venv; fi
. .venv/bin/activate
pip install -q torch==2.13.0          # the CPU wheel; an unpinned torch pulls a multi-GB CUDA build
pip install -q ".[export]"

moduseg build-bank --data "$data" --split train --masks "$masks" --out "$out/bank" --overwrite ${MODUSEG_ARGS:-}
moduseg eval --bank "$out/bank" --data "$data" --split val --proposals "$proposals" --out "$out/eval" ${MODUSEG_ARGS:-}
