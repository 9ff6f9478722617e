"""The `moduseg` command: build-bank, eval, segment.

    moduseg build-bank --data ROOT --split train --masks gt|pseudo --out BANK_DIR
    moduseg eval --bank BANK_DIR --data ROOT --split val --proposals gt|auto --out RESULT_DIR
    moduseg segment --bank BANK_DIR IMAGES... --out DIR
    moduseg triton-repo --out REPO [--backbone NAME] [--variants python onnx tensorrt] [--gpus 0,1] [--no-warmup] ...
    moduseg serve --repo REPO [--http-port 8000 --grpc-port 8001] [--server-arg=--log-verbose=1]
    moduseg triton-env [--env DIR]
    moduseg info [--json]

Each command parses its flags and calls the library (engine.apis); the Config flags and argument checks are
engine.cli_args, the serving commands engine.cli_triton.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from . import __version__
from .cli_args import (add_config_flags, check_segment_flags, command_config, headers, opacity, output_dir, shown,
                       usage_error, writable_out)
from .cli_triton import add_parsers as add_triton_parsers
from .errors import ModuSegError
from .registry import DEFAULT_BACKBONE, backbone_names


def _add_ray_flags(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                        help=f"{what}; without ADDRESS a local cluster is started (or RAY_ADDRESS used), else "
                             "ray.init(address=ADDRESS) (needs pip install 'moduseg-engine[ray]')")
    parser.add_argument("--actors", type=int, default=None, metavar="N",
                        help="Ray actors (default: one per GPU in the cluster, else one per CPU)")


def cmd_build_bank(args) -> int:
    from .apis import build_bank

    config = command_config(args)
    if args.data is None and not args.add_parts:
        usage_error("build-bank", "give --data (images to featurise) and/or --add-parts (parts of earlier builds to "
                                  "merge)")
    if args.parts is not None and args.keep_parts is False:
        usage_error("build-bank", f"--parts {args.parts} with --no-keep-parts: nothing would be written there")
    keep_parts = bool(args.keep_parts or args.parts)  # parts are about the bank's size again: only when asked
    parts_dir = (Path(args.parts) if args.parts else Path(f"{args.out}.parts")) if keep_parts else None
    bank, images, seconds = build_bank(args.out, args.data, args.split, args.masks, args.backbone, config,
                                       add_parts=args.add_parts or [], parts_dir=parts_dir, overwrite=args.overwrite,
                                       ray=False if args.ray is None else args.ray or True, actors=args.actors)
    counts = {n: int(c) for n, c in zip(bank.class_names, bank.class_counts()) if c}
    print(f"bank: {len(bank)} vectors ({bank.dim}-d, {bank.backbone['id']}) from {images} images in {seconds:.1f} s "
          f"-> {args.out}" + (f" (parts: {parts_dir})" if keep_parts else ""))
    print(f"per class: {counts}")
    return 0


def cmd_verify_bank(args) -> int:
    """Every byte of a bank directory against its manifest's checksums (loads check sizes and file ends only)."""
    from .bank import FeatureBank

    start = time.perf_counter()
    manifest = FeatureBank.verify(args.bank)
    total = sum(record["bytes"] for record in manifest["files"].values())
    print(f"{args.bank}: bank format {manifest['version']}, {manifest['size']:,} x {manifest['dim']} vectors, index "
          f"{manifest['config']['index']} ({manifest['index_storage']}); {len(manifest['files'])} files, "
          f"{total / 2**20:.1f} MiB, all checksums match ({time.perf_counter() - start:.1f} s)")
    return 0


def cmd_eval(args) -> int:
    from .apis import eval_dataset, evaluate
    from .bank import FeatureBank
    from .data import save_label_map
    from .eval import markdown_table
    from .pipeline import Engine

    bank = FeatureBank.load(args.bank)
    config = command_config(args, bank.config)
    dataset = eval_dataset(args.data, args.split, bank.class_names)
    writable_out(args.out)
    # ground-truth proposals are made per batch by evaluate; "auto" is the engine's embedded proposer
    engine = Engine(bank, proposer="embedded" if args.proposals == "auto" else None, config=config)
    out = output_dir(args.out)  # made once the bank, the data and the engine are there
    if args.save_predictions:
        (out / "predictions").mkdir(exist_ok=True)

    def save(sample, label_map) -> None:
        save_label_map(label_map, out / "predictions" / f"{sample.id}.png", dataset.palette)

    start = time.perf_counter()
    confusion = evaluate(engine, dataset, bank.class_names, args.proposals, config.batch_size,
                         on_result=save if args.save_predictions else None, progress=True, desc=f"eval {args.split}")
    elapsed = time.perf_counter() - start
    summary = confusion.summary()
    summary.update({"bank": str(args.bank), "data": str(args.data), "split": args.split,
                    "proposals": args.proposals, "config": config.to_dict(), "seconds": round(elapsed, 2),
                    "stage_seconds": {k: round(v, 3) for k, v in engine.times.seconds.items()}})
    (out / "metrics.json").write_text(json.dumps(summary, indent=2))
    (out / "metrics.md").write_text(markdown_table(summary) + "\n")
    print(markdown_table(summary))
    print(f"mIoU {summary['miou']:.2f} over {summary['images']} images ({elapsed:.1f} s) -> {out / 'metrics.json'}")
    return 0


def cmd_segment(args) -> int:
    """Segment the inputs into --out (outputs named as engine.outputs says), resuming from records that still hold;
    a failure of one item (reading, segmenting or writing it) is recorded and the run goes on."""
    from .apis import segment_files
    from .bank import FeatureBank
    from .outputs import OutputConflict, bank_id, find_inputs, run_provenance, write_classes

    check_segment_flags(args)
    config = None
    if args.url is None:
        bank = FeatureBank.load(args.bank)  # checked here, before any work, also when Ray actors load it again
        config = command_config(args, bank.config)
    try:
        inputs = find_inputs(args.images, args.manifest, out=args.out)
    except OutputConflict as error:
        usage_error("segment", str(error))
    writable_out(args.out)
    rendering = {"output_mode": args.output_mode, "palette": args.palette, "opacity": args.opacity}
    if args.ray is not None:
        from .distributed import segment_ray

        out = output_dir(args.out)  # the Ray cluster starts inside segment_ray
        write_classes(out, bank.class_names, args.palette)
        summary = segment_ray(inputs, out, args.bank, config, address=args.ray or None, actors=args.actors,
                              with_overlay=args.overlay, resume=args.resume, device=args.device, **rendering)
    else:
        if args.url is None:
            from .pipeline import Engine

            engine = Engine(bank, config=config, device=args.device)
            run = run_provenance(bank=bank_id(args.bank), config=config, **rendering)
        else:
            from .remote import RemoteEngine

            engine = RemoteEngine(args.url, model_name=args.model, protocol=args.protocol,
                                  concurrency=args.concurrency, headers=headers(args.header))
            run = run_provenance(server={"url": args.url, "model": args.model}, **rendering)
        out = output_dir(args.out)  # made once the inputs, the bank and the engine (or the server) are there
        write_classes(out, engine.class_names if args.url else bank.class_names, args.palette)
        batch_size = config.batch_size if config is not None else engine.concurrency
        summary = segment_files(inputs, out, engine, run, args.resume, args.overlay, batch_size)
    failures = summary["failures"]
    _record_failures(out, failures, len(inputs))
    print(f"{summary['written']} written, {summary['done_before']} already done, {len(failures)} failed, of "
          f"{len(inputs)} images: label maps + JSON records{' + overlays' if args.overlay else ''} -> {shown(out)}"
          + (" (all done)" if not failures else ""))
    if summary["stale"]:
        print(f"{sum(summary['stale'].values())} of them redone because their record was stale: "
              + ", ".join(f"{reason} {count}" for reason, count in sorted(summary["stale"].items())))
    return 1 if failures else 0


def _record_failures(out: Path, failures: list[dict], images: int) -> None:
    """OUT/failures.jsonl; when even that cannot be written (a full disk), the failures go to stderr instead."""
    from .outputs import FAILURES_FILE, write_failures

    try:
        write_failures(out, failures)
    except OSError as error:
        print(f"cannot write {shown(out / FAILURES_FILE)} ({error}); the failures:", file=sys.stderr)
        for failure in failures:
            print(f"  {failure['image']}: {failure['reason']}", file=sys.stderr)
        return
    if failures:
        print(f"{len(failures)} of {images} images failed (reasons in {shown(out / FAILURES_FILE)})", file=sys.stderr)


def cmd_report(args) -> int:
    from .report import run_report

    report = run_report(args.data_root, args.out, datasets=args.datasets, quick=args.quick,
                        sheet_images=args.sheet_images)
    print((Path(args.out) / "report.md").read_text())
    print(f"-> {Path(args.out) / 'report.json'}; sheets: "
          + ", ".join(r["sheet"]["file"] for r in report["datasets"].values()))
    return 0


def cmd_info(args) -> int:
    """What a bug report needs (engine.info): versions, the compiled extension's CUDA kernels, runtimes, GPUs."""
    from .info import collect, format_text

    info = collect()
    print(json.dumps(info, indent=2) if args.json else format_text(info))
    return 0


def _add_bank_parsers(commands) -> None:
    """build-bank and eval."""
    build = commands.add_parser("build-bank", help="build a feature bank from a VOC-layout dataset")
    build.add_argument("--data", default=None, help="dataset root (VOC layout)")
    build.add_argument("--split", default="train",
                       help="the split to featurise, listed in --data's ImageSets/Segmentation/SPLIT.txt (default "
                            "train)")
    build.add_argument("--masks", choices=("gt", "pseudo"), default="gt",
                       help="class masks: ground truth (oracle bank) or pseudo-masks from image-level labels")
    build.add_argument("--backbone", default=DEFAULT_BACKBONE,
                       help=f"the feature extractor, one of {', '.join(backbone_names())} (default {DEFAULT_BACKBONE})")
    build.add_argument("--out", required=True, help="bank directory to write")
    build.add_argument("--overwrite", action="store_true", help="replace an existing bank directory")
    build.add_argument("--parts", default=None, metavar="DIR",
                       help="keep the bank's parts (its entries before outlier rejection, about the bank's size "
                            "again) in DIR, to merge this build with others or append to it later (--add-parts); "
                            "implies --keep-parts")
    build.add_argument("--keep-parts", action=argparse.BooleanOptionalAction, default=None,
                       help="keep the parts (in --parts DIR, by default OUT.parts next to the bank); default off: "
                            "only a build to be merged or appended to needs them")
    build.add_argument("--add-parts", nargs="+", default=None, metavar="DIR",
                       help="parts directories of earlier builds (shards, or the bank appended to): the bank is "
                            "built over their entries and the new ones, outlier rejection over the union")
    _add_ray_flags(build, "featurise on a Ray cluster: actors hold the backbone and proposer")
    add_config_flags(build)
    build.set_defaults(run=cmd_build_bank)

    verify = commands.add_parser("verify-bank", help="check every byte of a bank directory against its manifest "
                                 "(loading checks only sizes and each file's first and last MiB)")
    verify.add_argument("bank", help="bank directory")
    verify.set_defaults(run=cmd_verify_bank)

    evaluate = commands.add_parser("eval", help="segment a split and report mIoU against its ground truth")
    evaluate.add_argument("--bank", required=True, help="the feature bank (a build-bank output folder)")
    evaluate.add_argument("--data", required=True,
                          help="dataset root (VOC layout) with the split's images and ground truth; its classes must "
                               "be the bank's")
    evaluate.add_argument("--split", default="val", help="the split to segment and score (default val)")
    evaluate.add_argument("--proposals", choices=("gt", "auto"), default="auto",
                          help="ground-truth connected components (oracle proposals) or the embedded proposer")
    evaluate.add_argument("--out", required=True, help="directory for metrics.json / metrics.md")
    evaluate.add_argument("--save-predictions", action="store_true", help="also write the predicted PNGs")
    add_config_flags(evaluate, bank="fixed")
    evaluate.set_defaults(run=cmd_eval)


def _add_segment_parser(commands) -> None:
    from .outputs import DEFAULT_RENDERING
    from .palettes import PALETTES

    segment = commands.add_parser("segment", help="segment images into palette PNG label maps, JSON records per "
                                  "image (class, score, area, box, RLE mask per segment) and overlays")
    segment.add_argument("--bank", default=None, help="the feature bank (segment in this process)")
    segment.add_argument("--url", default=None,
                         help="segment on a Triton server instead: its HTTP or gRPC address (http(s)://, grpc(s)://"
                              " or HOST:PORT with --protocol), serving the moduseg_segment model")
    segment.add_argument("--protocol", choices=("http", "grpc"), default=None,
                         help="with --url: the server's protocol (default: the --url's scheme, http(s):// or "
                              "grpc(s)://, else http; Triton serves HTTP on port 8000 and gRPC on 8001 by default)")
    segment.add_argument("--model", default="moduseg_segment", help="with --url: the segmentation model's name")
    segment.add_argument("--header", action="append", default=None, metavar="KEY=VALUE",
                         help="with --url: an HTTP header / gRPC metadata sent with every request (repeatable)")
    segment.add_argument("--concurrency", type=int, default=4, help="with --url: requests in flight (default 4)")
    segment.add_argument("images", nargs="*", help="image files, folders (searched recursively; symlinked folders "
                         "not entered) or glob patterns")
    segment.add_argument("--manifest", default=None, metavar="FILE",
                         help="a file listing image paths, one a line (relative to its folder); a missing one is "
                              "recorded as a failure")
    segment.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                         help="skip images whose JSON record (written last) exists in --out and was made from the "
                              "same bank (or server), result-changing config and input file (size, mtime) (default "
                              "on); stale and failed images are redone")
    segment.add_argument("--out", required=True,
                         help="output folder, outside every input folder (else a usage error); an input's outputs are "
                              "named by its path below the argument that found it (a folder, a glob's leading folder, "
                              "the manifest's folder; a file argument: its name), suffix kept: a/x.jpg -> "
                              "OUT/a/x.jpg.png (label map), .json (record), .overlay.png; and OUT/classes.json "
                              "(each class id's name and colour)")
    segment.add_argument("--overlay", action=argparse.BooleanOptionalAction, default=True,
                         help="also write the image blended with its label map and a legend (default on)")
    segment.add_argument("--palette", choices=PALETTES, default=DEFAULT_RENDERING["palette"],
                         help="colours of the label maps and overlays: auto (default) takes the bank's data set's "
                              "own by its class names (VOC's, CamVid's; distinct generated colours for other class "
                              "lists); voc, camvid or distinct apply that palette by class id")
    segment.add_argument("--opacity", type=opacity, default=DEFAULT_RENDERING["opacity"], metavar="0..1",
                         help="how strongly an overlay paints the classes over the image: 0 the image alone, 1 the "
                              f"colours alone (default {DEFAULT_RENDERING['opacity']})")
    segment.add_argument("--output-mode", choices=("uncompressed_rle", "coco_rle"), default="uncompressed_rle",
                         help="each segment's mask in the JSON records: COCO's uncompressed RLE (runs as a list; "
                              "default) or its compressed RLE (a string, as pycocotools.mask.decode takes; needs "
                              "pycocotools)")
    segment.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                         help="where the backbone and the bank search run (default cpu)")
    _add_ray_flags(segment, "segment on a Ray cluster: actors each hold an Engine and write the outputs")
    add_config_flags(segment, bank="fixed")
    segment.set_defaults(run=cmd_segment)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moduseg", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                     help="what to do (moduseg COMMAND --help for its flags)")

    _add_bank_parsers(commands)
    _add_segment_parser(commands)
    add_triton_parsers(commands)

    report = commands.add_parser("report", help="the paper's table rows on VOC-layout data sets (JSON, Markdown, PNG)")
    report.add_argument("--data-root", default="../shared/data", help="folder holding the data sets")
    report.add_argument("--datasets", nargs="+", default=["voc2012-mini", "camvid"],
                        help="data sets to report on: folders under --data-root in the VOC layout, each with train "
                             "and val splits (default voc2012-mini camvid)")
    report.add_argument("--out", required=True,
                        help="folder for report.json, report.md and a sheet PNG per data set (made once the data "
                             "sets are found)")
    report.add_argument("--quick", action="store_true", help="only the system rows (defaults and paper settings)")
    report.add_argument("--sheet-images", type=int, default=4, help="val images on each PNG sheet")
    report.set_defaults(run=cmd_report)

    info = commands.add_parser("info", help="what a bug report needs: versions, the compiled extension (which CUDA "
                               "kernels, for which architectures), the runtimes found and the GPUs")
    info.add_argument("--json", action="store_true", help="print the report as JSON instead of text")
    info.set_defaults(run=cmd_info)
    return parser


def main(argv=None) -> int:
    """Exit codes: 0 done, 1 the engine refused or failed (bad input, bank or model; or images skipped), 2 a usage
    error (argparse)."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except ModuSegError as error:
        print(f"moduseg {args.command}: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
