"""Build a TensorRT plan of a backbone's exported ONNX graph: run it with the TensorRT of the server that will load
it (inside nvcr.io/nvidia/tensorrt:<yy.mm>-py3 of the server's yy.mm), on the GPU model that will serve it, since a
plan is specific to both. fp16 with the normalisation layers kept in fp32. Writes the plan's record beside it
(PLAN.json: TensorRT version, GPU, compute capability, profile limits) and prints it.

    python export/build_tensorrt.py [--backbone effnet-lite2/multilayer] [--onnx model.onnx] \
        --out REPO/effnet-lite2_multilayer_tensorrt/1/        # a directory: named model.smXY.plan for this GPU
"""

from __future__ import annotations

import argparse
import json
import sys

from engine.errors import ModuSegError
from engine.export.tensorrt import DEFAULT_MAX_SIDE, build_engine
from engine.models.backbones import model_path
from engine.registry import DEFAULT_BACKBONE


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default=DEFAULT_BACKBONE, help="backbone name (its stride sets the profiles)")
    parser.add_argument("--onnx", default=None, help="ONNX file (default: the engine's cached export)")
    parser.add_argument("--out", required=True,
                        help="plan file to write, or a directory (Triton: <repo>/<model>/1/) to write model.smXY.plan "
                             "into, XY this GPU's compute capability")
    parser.add_argument("--max-batch-size", type=int, default=8, help="the profile's largest batch (default 8)")
    parser.add_argument("--max-side", type=int, default=DEFAULT_MAX_SIDE,
                        help=f"the profile's largest padded side (default {DEFAULT_MAX_SIDE})")
    parser.add_argument("--device", type=int, default=0, help="GPU to build on (default 0)")
    parser.add_argument("--fp32", action="store_true", help="no fp16 kernels")
    args = parser.parse_args(argv)
    try:
        info = build_engine(args.onnx or model_path(args.backbone), args.out, backbone=args.backbone,
                            max_batch_size=args.max_batch_size, fp16=not args.fp32, max_side=args.max_side,
                            device=args.device)
    except ModuSegError as error:
        print(f"build_tensorrt: error: {error}", file=sys.stderr)
        return 1
    print(json.dumps(info, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
