"""Export a registered backbone to ONNX (uint8 (B, H, W, 3) images in, normalised inside the graph; batch, height
and width dynamic), verified against its torch module, and copy it where a deployment wants it.

    python export/export_onnx.py [--backbone effnet-lite2/multilayer] [--weights PATH_OR_HUB_ID] --out model.onnx

The file is the engine's cached export (engine.models.backbones.model_path): the engine itself runs the same bytes.
"""

from __future__ import annotations

import argparse
import shutil
import sys

from engine.errors import ModuSegError
from engine.models.backbones import model_path
from engine.registry import DEFAULT_BACKBONE, backbone_names, backbone_spec


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default=DEFAULT_BACKBONE, help=f"one of {', '.join(backbone_names())}")
    parser.add_argument("--weights", default=None, help="local path or hub id, for families that load weights")
    parser.add_argument("--cache", default=None, help="model cache directory (default $MODUSEG_CACHE)")
    parser.add_argument("--out", required=True, help="where to write the .onnx file")
    args = parser.parse_args(argv)
    try:
        source = model_path(backbone_spec(args.backbone, args.weights), args.cache)
    except ModuSegError as error:
        print(f"export_onnx: error: {error}", file=sys.stderr)
        return 1
    shutil.copyfile(source, args.out)
    print(f"{args.backbone} -> {args.out} ({source.stat().st_size / 1e6:.1f} MB; verified export {source.name})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
