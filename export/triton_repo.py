"""Write a Triton model repository for a backbone, with its model files (the same as `moduseg triton-repo`).

    python export/triton_repo.py --out REPO [--backbone NAME] [--variants python onnx tensorrt] [--configs-only]
        [--max-batch-size 8] [--instances 1] [--queue-delay-us 2000] [--gpus 0,1] [--num-threads 0] [--no-warmup]
        [--max-side 1024] [--plan PLAN --plan-cc 8.6]... [--compute-capabilities 7.5 8.0 ...]
        [--execution-env ARCHIVE] [--server-tensorrt VERSION]

`--configs-only` writes the configs and the python variant's model.py, without model files.
"""

from __future__ import annotations

import sys

from engine.cli import main as moduseg

if __name__ == "__main__":
    sys.exit(moduseg(["triton-repo", *sys.argv[1:]]))
