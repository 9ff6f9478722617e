"""Write a Triton model repository for a backbone, with its model files (the same as `moduseg triton-repo`).

    python export/triton_repo.py --out REPO [--backbone NAME] [--variants python onnx tensorrt] [--configs-only]
"""

from __future__ import annotations

import sys

from engine.cli import main as moduseg

if __name__ == "__main__":
    sys.exit(moduseg(["triton-repo", *sys.argv[1:]]))
