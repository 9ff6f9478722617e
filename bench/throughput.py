"""End-to-end throughput: images/sec on real images through Engine.segment_stream, per stage, side by side with the
plain NumPy/Python reference path (Engine(kernels="reference"): engine.reference's ops and the exact NumPy search)
in the same run.

    python bench/throughput.py [--images DIR] [--bank DIR] [--device cpu|cuda] [--repeats 3] [--limit N] [--json FILE]

Without --bank, a ground-truth bank is built in-process from voc2012-mini train. Proposals come from the embedded
proposer when engine.models.embedded.create_proposer exists, else from the ground-truth masks next to the images
(SegmentationClass/<id>.png, connected components; their loading is timed as "proposer (ground truth)" and counted
as neither model nor engine time). Each repeat streams every image once; the median repeat is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path


if __package__ in (None, ""):  # `python bench/throughput.py` from the repository root
    sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # after site-packages: an installed engine (with its compiled _C) wins

from engine import Config, Engine, FeatureBank  # noqa: E402
from engine.data import VOCDataset, load_label_map  # noqa: E402
from engine.models import create_backbone, ground_truth_proposals  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_IMAGES = ROOT.parent / "shared" / "data" / "voc2012-mini" / "JPEGImages"
DEFAULT_BANK_DATA = ROOT.parent / "shared" / "data" / "voc2012-mini"
#: stage -> what it is; "model" stages are model inference, "engine" ones the engine's own work
STAGES = {
    "decode": "engine", "proposer": "model", "filter": "engine", "backbone": "model", "smfa": "engine",
    "search": "engine", "nms_raster": "engine",
}


def embedded_proposer(config: Config):
    """The embedded proposer if engine.models.embedded provides one, else None."""
    try:
        from engine.models.embedded import create_proposer
    except ImportError:
        return None
    return create_proposer(config=config) if "config" in create_proposer.__code__.co_varnames else create_proposer()


def image_paths(folder: Path, limit: int | None) -> list[Path]:
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not paths:
        raise SystemExit(f"no .jpg/.png images in {folder}")
    return paths[:limit] if limit else paths


def mask_path(image: Path) -> Path:
    return image.parent.parent / "SegmentationClass" / f"{image.stem}.png"


def rss_mb() -> float:
    """Current resident set size (MB)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build_bank(backbone, config: Config, limit: int | None) -> FeatureBank:
    train = VOCDataset(DEFAULT_BANK_DATA, "train")
    samples = [train[i] for i in range(min(limit or len(train), len(train)))]
    return FeatureBank.build(samples, backbone, train.class_names, config, progress=False,
                             provenance={"source": "voc2012-mini train, ground-truth masks (bench)"})


def timed_items(paths, engine, use_gt: bool):
    """Stream items: paths, with ground-truth proposals made lazily (in the loader thread) and timed."""
    for path in paths:
        if not use_gt:
            yield path
            continue
        start = time.perf_counter()
        proposals = ground_truth_proposals(load_label_map(mask_path(path)))
        engine.times.add("proposer", time.perf_counter() - start)
        yield path, proposals


def run(engine: Engine, paths, use_gt: bool, repeats: int, warmup: int, batch_size: int, sync=None) -> dict:
    """Median images/sec over `repeats` passes (after `warmup` passes over one batch) and per-image stage ms."""
    for _ in range(warmup):
        for _ in engine.segment_stream(timed_items(paths[:batch_size], engine, use_gt), batch_size=batch_size):
            pass
    engine.times.reset()
    rates, count = [], 0
    for _ in range(repeats):
        start = time.perf_counter()
        count = sum(1 for _ in engine.segment_stream(timed_items(paths, engine, use_gt), batch_size=batch_size))
        if sync:
            sync()
        rates.append(count / (time.perf_counter() - start))
    per_image = {stage: 1000.0 * seconds / (repeats * count) for stage, seconds in engine.times.seconds.items()}
    return {"images_per_sec": statistics.median(rates), "rates": rates, "stage_ms": per_image}


def split_times(stage_ms: dict, use_gt: bool) -> tuple[float, float]:
    """(model ms, engine ms) per image; ground-truth proposals count as neither."""
    model = sum(v for k, v in stage_ms.items() if STAGES.get(k) == "model" and not (k == "proposer" and use_gt))
    own = sum(v for k, v in stage_ms.items() if STAGES.get(k, "engine") == "engine")
    return model, own


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES, help="folder of .jpg/.png images")
    parser.add_argument("--bank", type=Path, help="a saved bank (default: ground-truth bank from voc2012-mini train)")
    parser.add_argument("--bank-limit", type=int, help="train images for the in-process bank (default all)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--runtime", default=None, help="backbone runtime: onnxruntime or torch (default: "
                        "onnxruntime on cpu, torch on cuda)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=0, help="Config.num_threads (0 = libraries choose)")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes over the images (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed passes over one batch first")
    parser.add_argument("--limit", type=int, help="use the first N images")
    parser.add_argument("--no-reference", action="store_true", help="skip the NumPy reference path")
    parser.add_argument("--no-kernels", action="store_true", help="skip the kernel table (bench/kernels.py)")
    parser.add_argument("--json", type=Path, help="write the report here")
    args = parser.parse_args(argv)

    config = Config(batch_size=args.batch_size, num_threads=args.threads)
    runtime = args.runtime or ("torch" if args.device.startswith("cuda") else "onnxruntime")
    start = time.perf_counter()
    if args.bank:
        bank = FeatureBank.load(args.bank)
        config = bank.config.replace(batch_size=args.batch_size, num_threads=args.threads)
        name, weights = bank.backbone_name, bank.backbone.get("weights")
    else:
        name, weights = "effnet-lite2/block19", None
    backbone = create_backbone(name, runtime=runtime, batch_size=config.batch_size, num_threads=config.num_threads,
                               device=args.device.split(":")[0], weights=weights)
    if not args.bank:
        cpu_backbone = backbone if args.device == "cpu" else create_backbone(name, batch_size=config.batch_size)
        bank = build_bank(cpu_backbone, config, args.bank_limit)
    bank_seconds = time.perf_counter() - start

    proposer = embedded_proposer(config)
    use_gt = proposer is None
    paths = image_paths(args.images, args.limit)
    if use_gt:
        missing = [p.name for p in paths if not mask_path(p).is_file()]
        if missing:
            raise SystemExit(f"no embedded proposer (engine.models.embedded.create_proposer) and no ground-truth "
                             f"masks for {missing[:3]}... under {args.images.parent / 'SegmentationClass'}")
    engine = Engine(bank, backbone=backbone, proposer=proposer, config=config, device=args.device)
    on_gpu = engine.device != "cpu"
    sync = None
    if on_gpu:
        import torch

        torch.cuda.reset_peak_memory_stats()
        sync = torch.cuda.synchronize
    described = engine.describe()
    rss_before = rss_mb()
    main_run = run(engine, paths, use_gt, args.repeats, args.warmup, config.batch_size, sync)
    reference_run = None
    if not args.no_reference:
        reference = Engine(bank, backbone=backbone, proposer=proposer, config=config, kernels="reference")
        reference_run = run(reference, paths, use_gt, args.repeats, args.warmup, config.batch_size)

    gpu_peak = None
    if on_gpu:
        import torch

        gpu_peak = torch.cuda.max_memory_allocated() / 2**20
    kernel_rows = []
    if not args.no_kernels:
        from bench.kernels import format_table, run_kernel_bench

        # one OpenMP thread unless --threads: a 2-thread team next to other busy processes waits on itself for
        # longer than the work takes (measured: 28 ms vs 4 ms for SMFA, N=50, on the shared 2-core machine)
        kernel_threads = args.threads or 1
        kernel_rows = run_kernel_bench(repeats=3, num_threads=kernel_threads, quick=False)

    # ------------------------------------------------------------------------------------------------ report
    proposals_from = (f"embedded proposer ({getattr(proposer, 'name', type(proposer).__name__)})" if proposer
                      else "ground-truth masks (connected components; timed as 'proposer', counted as neither "
                           "model nor engine time)")
    runtime_info = described["runtime"]
    runtime_name = runtime_info.get("runtime", "?") if isinstance(runtime_info, dict) else str(runtime_info)
    print(f"ModuSeg throughput — {len(paths)} images from {args.images}, batch {config.batch_size}, "
          f"{args.repeats} repeat(s) (median), {os.cpu_count()} CPU core(s), {platform.processor() or platform.machine()}")
    print(f"device {described['device']}; backbone {described['backbone']} on {runtime_name} "
          f"({runtime_info.get('device', '?') if isinstance(runtime_info, dict) else '?'}); search {described['search']}; "
          f"bank {len(bank)} x {bank.dim} ({'loaded' if args.bank else 'built in-process'}, {bank_seconds:.1f} s)")
    print(f"proposals: {proposals_from}")
    stages = list(STAGES) + [s for s in main_run["stage_ms"] if s not in STAGES]
    header = f"| {'stage':<22} | {'kind':<6} | {'engine ms/img':>13} |" + (
        f" {'reference ms/img':>16} | {'ratio':>7} |" if reference_run else "")
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for stage in stages:
        ms = main_run["stage_ms"].get(stage)
        ref = reference_run["stage_ms"].get(stage) if reference_run else None
        if ms is None and ref is None:
            continue
        kind = "gt" if stage == "proposer" and use_gt else STAGES.get(stage, "engine")
        line = f"| {stage:<22} | {kind:<6} | {ms or 0:>13.2f} |"
        if reference_run:
            ratio = (ref or 0) / ms if ms else float("nan")
            line += f" {ref or 0:>16.2f} | {ratio:>6.1f}x |"
        print(line)
    model_ms, own_ms = split_times(main_run["stage_ms"], use_gt)
    print(f"images/s: {main_run['images_per_sec']:.2f} (engine)"
          + (f", {reference_run['images_per_sec']:.2f} (reference path)" if reference_run else "")
          + f"; passes: {', '.join(f'{r:.2f}' for r in main_run['rates'])}")
    print(f"engine's own work {own_ms:.2f} ms/img = {100 * own_ms / model_ms:.1f}% of model time {model_ms:.2f} ms/img "
          f"(target <= 10% on CPU)" if model_ms else f"engine's own work {own_ms:.2f} ms/img")
    print(f"RSS: {rss_before:.0f} MB before the runs, peak {peak_rss_mb():.0f} MB"
          + (f"; GPU peak allocated {gpu_peak:.0f} MB" if gpu_peak is not None else ""))
    if kernel_rows:
        print()
        print(f"kernels (bench/kernels.py): engine.ops vs engine.reference, median of 3, {kernel_threads} thread(s)")
        print(format_table(kernel_rows))
        worst = min(r.speedup for r in kernel_rows)
        print(f"slowest compiled speed-up: {worst:.1f}x (target >= 10x)")

    if args.json:
        report = {
            "images_per_sec": main_run["images_per_sec"],
            "reference_images_per_sec": reference_run["images_per_sec"] if reference_run else None,
            "stages": main_run["stage_ms"],
            "reference_stages": reference_run["stage_ms"] if reference_run else None,
            "stage_unit": "ms per image (summed over threads: stages overlap in segment_stream)",
            "model_ms_per_image": model_ms,
            "engine_ms_per_image": own_ms,
            "device": described["device"],
            "backend": runtime_name,
            "backbone": described["backbone"],
            "runtime": runtime_info,
            "search": described["search"],
            "proposals": "embedded" if proposer else "ground-truth",
            "batch_size": config.batch_size,
            "images": len(paths),
            "repeats": args.repeats,
            "rates": main_run["rates"],
            "peak_rss_mb": peak_rss_mb(),
            "gpu_peak_allocated_mb": gpu_peak,
            "bank_size": len(bank),
            "kernels": [{"op": r.op, "size": r.size, "reference_ms": r.reference_ms, "compiled_ms": r.compiled_ms,
                         "speedup": r.speedup} for r in kernel_rows],
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
        print(f"-> {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
