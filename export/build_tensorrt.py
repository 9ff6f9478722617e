"""Build a TensorRT plan of a backbone's exported ONNX graph: run it inside the serving image (NGC tritonserver), on
the GPU model that will serve it, since a plan is specific to both. fp16 with the normalisation layers kept in fp32.

    python export/build_tensorrt.py [--backbone effnet-lite2/multilayer] [--onnx model.onnx] --out model.plan
"""

from __future__ import annotations

import argparse
import json
import sys

from engine.errors import ModuSegError
from engine.export.tensorrt import build_engine
from engine.models.backbones import model_path
from engine.registry import DEFAULT_BACKBONE


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default=DEFAULT_BACKBONE, help="backbone name (its stride sets the profiles)")
    parser.add_argument("--onnx", default=None, help="ONNX file (default: the engine's cached export)")
    parser.add_argument("--out", required=True, help="plan file to write (Triton: <repo>/<model>/1/model.plan)")
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--fp32", action="store_true", help="no fp16 kernels")
    args = parser.parse_args(argv)
    try:
        info = build_engine(args.onnx or model_path(args.backbone), args.out, backbone=args.backbone,
                            max_batch_size=args.max_batch_size, fp16=not args.fp32)
    except ModuSegError as error:
        print(f"build_tensorrt: error: {error}", file=sys.stderr)
        return 1
    print(json.dumps(info, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
