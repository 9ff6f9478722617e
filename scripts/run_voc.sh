#!/usr/bin/env bash
# Install the engine and run the main job: a feature bank from a VOC-layout train split, then mIoU on its val split.
#   bash scripts/run_voc.sh [DATA_ROOT] [OUT_DIR]
# DATA_ROOT defaults to ../shared/data/voc2012-mini. The default is the embedded system from image-level labels only
# (pseudo-mask bank, embedded proposals); MODUSEG_MASKS=gt / MODUSEG_PROPOSALS=gt give the oracle rows, and extra
# knobs go through MODUSEG_ARGS to both commands (e.g. "--top-k 25 --vote count --erosion fixed --no-region-entries
# --no-normalize-layers --no-center-bank --hub-neighbours 0 --hub-penalty 0 --no-fill-unpainted --no-superpixel-vote
# --boundary-radius 0" for the paper's settings: the bank-building ones take effect in build-bank, and eval accepts
# them as the bank's own).
set -euo pipefail
cd "$(dirname "$0")/.."
data=${1:-../shared/data/voc2012-mini}
out=${2:-runs/$(basename "$data")}
masks=${MODUSEG_MASKS:-pseudo}
proposals=${MODUSEG_PROPOSALS:-auto}

if [ ! -x .venv/bin/python ]; then python3 -m venv .venv; fi
. .venv/bin/activate
pip install -q torch==2.13.0          # the CPU wheel; an unpinned torch pulls a multi-GB CUDA build
pip install -q ".[cpu,export]"

moduseg build-bank --data "$data" --split train --masks "$masks" --out "$out/bank" --overwrite ${MODUSEG_ARGS:-}
moduseg eval --bank "$out/bank" --data "$data" --split val --proposals "$proposals" --out "$out/eval" ${MODUSEG_ARGS:-}
