"""End-to-end throughput: images/sec on real images through Engine.segment_stream, per stage, beside the backbone
alone on the same images (this machine's limit for the engine) and beside the plain NumPy reference path
(Engine(kernels="reference"): engine.reference's ops and an exact NumPy search), all in one run.

    python bench/throughput.py [--images DIR] [--bank DIR] [--device cpu|cuda] [--repeats 3] [--limit N] [--json FILE]

Without --bank, a ground-truth bank is built in-process from voc2012-mini train with the engine's defaults.
Proposals come from the embedded proposer (on the backbone's features). Each repeat streams every image once; the
median repeat is reported. Stage times are summed over segment_stream's threads (stages overlap), per image.
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
from engine.data import VOCDataset, load_image  # noqa: E402
from engine.models import create_backbone  # noqa: E402
from engine.models.embedded import create_proposer  # noqa: E402
from engine.registry import DEFAULT_BACKBONE  # noqa: E402

from bench.defaults import assignments  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "voc2012-mini"
#: stage -> what it is; "model" stages are model inference (the proposer counts: it is the method's model of
#: objects), "engine" ones the engine's own work
STAGES = {"decode": "engine", "backbone": "model", "proposer": "model", "filter": "engine", "smfa": "engine",
          "search": "engine", "nms_raster": "engine", "refine": "engine", "results": "engine"}


def image_paths(folder: Path, limit: int | None) -> list[Path]:
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not paths:
        raise SystemExit(f"no .jpg/.png images in {folder}")
    return paths[:limit] if limit else paths


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
    train = VOCDataset(DEFAULT_DATA, "train")
    samples = [train[i] for i in range(min(limit or len(train), len(train)))]
    return FeatureBank.build(samples, backbone, train.class_names, config, proposer=create_proposer(config),
                             progress=False, provenance={"source": "voc2012-mini train, ground-truth masks (bench)"})


def median_rate(passes, count: int) -> tuple[float, list[float]]:
    rates = []
    for run_pass in passes:
        start = time.perf_counter()
        run_pass()
        rates.append(count / (time.perf_counter() - start))
    return statistics.median(rates), rates


def run_backbone(backbone, images, repeats: int, batch_size: int, sync=None) -> dict:
    """The backbone alone on decoded images, in batches of `batch_size`: images/sec (the engine's ceiling). On a GPU
    its features stay there, as the engine's do."""
    run = backbone.features_on_device if sync else backbone.features

    def one_pass():
        for start in range(0, len(images), batch_size):
            run(images[start:start + batch_size])
        if sync:
            sync()

    run(images[:batch_size])  # warm-up
    rate, rates = median_rate([one_pass] * repeats, len(images))
    return {"images_per_sec": rate, "rates": rates}


def run_engine(engine: Engine, paths, repeats: int, batch_size: int, sync=None) -> dict:
    """Median images/sec of segment_stream over the image files, per-image stage ms, the host's CPU time per image
    (every thread of the process), and on a GPU the device ms per stage (CUDA events), our kernels' launches per
    batch and the peak GPU memory torch allocated."""
    from engine import ops

    def one_pass():
        for _ in engine.segment_stream(paths, batch_size=batch_size):
            pass
        if sync:
            sync()

    on_gpu = engine.device != "cpu"
    for _ in engine.segment_stream(paths[:batch_size], batch_size=batch_size):  # warm-up
        pass
    if on_gpu:
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        engine.times.on_device(True)
    engine.times.reset()
    launches, cpu_start = ops.cuda_launches(), time.process_time()
    rate, rates = median_rate([one_pass] * repeats, len(paths))
    host_ms = 1000.0 * (time.process_time() - cpu_start) / (repeats * len(paths))
    batches = repeats * -(-len(paths) // batch_size)
    stage_ms = {stage: 1000.0 * seconds / (repeats * len(paths)) for stage, seconds in engine.times.seconds.items()}
    result = {"images_per_sec": rate, "rates": rates, "stage_ms": stage_ms, "host_cpu_ms_per_image": host_ms}
    if on_gpu:
        result["device_stage_ms"] = {stage: 1000.0 * seconds / (repeats * len(paths))
                                     for stage, seconds in engine.times.device_seconds().items()}
        result["kernel_launches_per_batch"] = (ops.cuda_launches() - launches) / batches
        result["peak_gpu_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
        engine.times.on_device(False)
    return result


def split_times(stage_ms: dict) -> tuple[float, float]:
    """(model ms, engine ms) per image."""
    model = sum(v for k, v in stage_ms.items() if STAGES.get(k) == "model")
    own = sum(v for k, v in stage_ms.items() if STAGES.get(k, "engine") == "engine")
    return model, own


def print_report(args, config, described, bank, bank_seconds, paths, main_run, reference_run, alone) -> None:
    runtime = described["runtime"] if isinstance(described["runtime"], dict) else {}
    print(f"ModuSeg throughput - {len(paths)} images from {args.images}, batch {config.batch_size}, "
          f"{args.repeats} repeat(s) (median), {os.cpu_count()} CPU core(s), {platform.processor() or platform.machine()}")
    print(f"device {described['device']}; backbone {described['backbone']} on {runtime.get('runtime', '?')} "
          f"({runtime.get('device', '?')}); search {described['search']}; bank {len(bank)} x {bank.dim} "
          f"({'loaded' if args.bank else 'built in-process'}, {bank_seconds:.1f} s); proposer {described['proposer']}")
    header = f"| {'stage':<12} | {'kind':<6} | {'engine ms/img':>13} |" + (
        f" {'reference ms/img':>16} | {'ratio':>7} |" if reference_run else "")
    print(header)
    print("|" + "|".join("-" * len(c) for c in header.split("|")[1:-1]) + "|")
    for stage in list(STAGES) + [s for s in main_run["stage_ms"] if s not in STAGES]:
        ms = main_run["stage_ms"].get(stage)
        ref = reference_run["stage_ms"].get(stage) if reference_run else None
        if ms is None and ref is None:
            continue
        line = f"| {stage:<12} | {STAGES.get(stage, 'engine'):<6} | {ms or 0:>13.2f} |"
        if reference_run:
            line += f" {ref or 0:>16.2f} | {(ref or 0) / ms if ms else float('nan'):>6.1f}x |"
        print(line)
    model_ms, own_ms = split_times(main_run["stage_ms"])
    backbone_ms = main_run["stage_ms"].get("backbone", 0.0)
    proposer_ms = main_run["stage_ms"].get("proposer", 0.0)
    print(f"images/s: {main_run['images_per_sec']:.2f} end to end; {alone['images_per_sec']:.2f} the backbone alone "
          f"({100 * main_run['images_per_sec'] / alone['images_per_sec']:.1f}% of it)"
          + (f"; {reference_run['images_per_sec']:.2f} reference path" if reference_run else ""))
    print(f"proposer {proposer_ms:.2f} ms/img = {proposer_ms / backbone_ms:.2f}x the backbone's {backbone_ms:.2f}"
          if backbone_ms else "")
    print(f"engine's own work {own_ms:.2f} ms/img = {100 * own_ms / model_ms:.1f}% of model time {model_ms:.2f} ms/img"
          if model_ms else f"engine's own work {own_ms:.2f} ms/img")
    print(f"host CPU time {main_run['host_cpu_ms_per_image']:.2f} core-ms/img (all threads of the process)")
    if "device_stage_ms" in main_run:
        print("device ms/img per stage (CUDA events, idle gaps included): " + ", ".join(
            f"{stage} {ms:.3f}" for stage, ms in main_run["device_stage_ms"].items()))
        print(f"our CUDA kernels: {main_run['kernel_launches_per_batch']:.1f} launches per batch; peak GPU memory "
              f"(torch allocations) {main_run['peak_gpu_memory_mb']:.0f} MB")
    print(f"RSS peak {peak_rss_mb():.0f} MB")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=Path, default=DEFAULT_DATA / "JPEGImages", help="folder of .jpg/.png images")
    parser.add_argument("--bank", type=Path, help="a saved bank (default: ground-truth bank from voc2012-mini train)")
    parser.add_argument("--bank-limit", type=int, help="train images for the in-process bank (default all)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--runtime", default=None, help="backbone runtime: onnxruntime or torch (default: "
                        "onnxruntime on cpu, torch on cuda)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=0, help="Config.num_threads (0 = libraries choose)")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes over the images (median reported)")
    parser.add_argument("--limit", type=int, help="use the first N images")
    parser.add_argument("--no-reference", action="store_true", help="skip the NumPy reference path")
    parser.add_argument("--no-kernels", action="store_true", help="skip the kernel table (bench/kernels.py)")
    parser.add_argument("--host-proposer", action="store_true", help="on a GPU, the host's proposer in a thread pool "
                        "(Config.gpu_proposer False) instead of the device proposer")
    parser.add_argument("--set", action="append", default=[], metavar="KNOB=VALUE",
                        help="an inference knob of Config for this run, e.g. superpixel_vote=False")
    parser.add_argument("--proposer", action="append", default=[], metavar="KNOB=VALUE",
                        help="an EmbeddedProposer knob, e.g. levels=400,100,50")
    parser.add_argument("--json", type=Path, help="write the report here")
    args = parser.parse_args(argv)

    runtime = args.runtime or ("torch" if args.device.startswith("cuda") else "onnxruntime")
    start = time.perf_counter()
    knobs = dict(batch_size=args.batch_size, num_threads=args.threads, gpu_proposer=not args.host_proposer,
                 **assignments(args.set))
    config = Config(**knobs)
    name, weights = DEFAULT_BACKBONE, None
    if args.bank:
        bank = FeatureBank.load(args.bank)
        config = bank.config.replace(**knobs)
        name, weights = bank.backbone_name, bank.backbone.get("weights")
    backbone = create_backbone(name, runtime=runtime, batch_size=config.batch_size, num_threads=config.num_threads,
                               device=args.device, weights=weights)
    if not args.bank:
        bank = build_bank(backbone, config, args.bank_limit)
    bank_seconds = time.perf_counter() - start

    paths = image_paths(args.images, args.limit)
    proposer = create_proposer(config, on_device=args.device != "cpu", **assignments(args.proposer))
    engine = Engine(bank, backbone=backbone, proposer=proposer, config=config, device=args.device)
    sync = None
    if args.device != "cpu":
        import torch

        sync = torch.cuda.synchronize
    alone = run_backbone(backbone, [load_image(p) for p in paths], args.repeats, config.batch_size, sync)
    main_run = run_engine(engine, paths, args.repeats, config.batch_size, sync)
    reference_run = None
    if not args.no_reference and args.device == "cpu":  # the NumPy twins run on the host only
        reference = Engine(bank, backbone=backbone, proposer=proposer, config=config, kernels="reference")
        reference_run = run_engine(reference, paths, args.repeats, config.batch_size)
    described = engine.describe()
    print_report(args, config, described, bank, bank_seconds, paths, main_run, reference_run, alone)
    kernel_rows = []
    if not args.no_kernels:
        from bench.kernels import format_table, run_kernel_bench

        kernel_rows = run_kernel_bench(repeats=3, num_threads=args.threads or 1, quick=False)
        print("\nkernels (bench/kernels.py): engine.ops vs engine.reference, median of 3")
        print(format_table(kernel_rows))

    if args.json:
        model_ms, own_ms = split_times(main_run["stage_ms"])
        stage = main_run["stage_ms"]
        report = {
            "images_per_sec": main_run["images_per_sec"],
            "backbone_only_images_per_sec": alone["images_per_sec"],
            "end_to_end_fraction_of_backbone": main_run["images_per_sec"] / alone["images_per_sec"],
            "proposer_to_backbone": stage.get("proposer", 0.0) / stage["backbone"] if stage.get("backbone") else None,
            "engine_fraction_of_model_time": own_ms / model_ms if model_ms else None,
            "reference_images_per_sec": reference_run["images_per_sec"] if reference_run else None,
            "stages": stage,
            "reference_stages": reference_run["stage_ms"] if reference_run else None,
            "stage_unit": "ms per image (summed over threads: stages overlap in segment_stream)",
            "host_cpu_ms_per_image": main_run["host_cpu_ms_per_image"],
            "device_stage_ms": main_run.get("device_stage_ms"),
            "kernel_launches_per_batch": main_run.get("kernel_launches_per_batch"),
            "peak_gpu_memory_mb": main_run.get("peak_gpu_memory_mb"),
            "model_ms_per_image": model_ms,
            "engine_ms_per_image": own_ms,
            "device": described["device"],
            "backend": described["runtime"].get("runtime") if isinstance(described["runtime"], dict) else None,
            "backbone": described["backbone"],
            "runtime": described["runtime"],
            "search": described["search"],
            "proposals": "embedded",
            "proposer": described["proposer"],
            "batch_size": config.batch_size,
            "images": len(paths),
            "repeats": args.repeats,
            "rates": main_run["rates"],
            "backbone_rates": alone["rates"],
            "peak_rss_mb": peak_rss_mb(),
            "bank_size": len(bank),
            "cpu_count": os.cpu_count(),
            "kernels": [{"op": r.op, "size": r.size, "reference_ms": r.reference_ms, "compiled_ms": r.compiled_ms,
                         "speedup": r.speedup} for r in kernel_rows],
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
        print(f"-> {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
