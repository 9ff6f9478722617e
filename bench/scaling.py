"""Scaling: a synthetic bank of a million vectors searched with an IVF index against exact Flat (build/train time,
query time, recall@K of IVF vs Flat, and the torch exact top-K), and RSS over a long image stream.

    python bench/scaling.py [--vectors 1048576] [--dim 208] [--index IVF4096,Flat] [--nprobe 1 4 16 64]
                            [--stream 300] [--json FILE]

The synthetic bank is clustered like a real one (vectors around 16384 unit centres, L2-normalised), so IVF's
recall means something (uniform random vectors have no neighbours worth the name). The stream part runs
Engine.segment_stream over voc2012-mini images cycled to --stream images (ground-truth proposals, the bench's
ground-truth bank) and samples RSS after every result.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # after site-packages: an installed engine (with its compiled _C) wins

from engine import Config  # noqa: E402
from engine.search import make_faiss_index as make_index  # noqa: E402


def synthetic_bank(count: int, dim: int, centres: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    middle = rng.standard_normal((centres, dim), dtype=np.float32)
    middle /= np.linalg.norm(middle, axis=1, keepdims=True)
    vectors = np.empty((count, dim), np.float32)
    step = 1 << 16
    for start in range(0, count, step):  # in blocks: no count x dim float64 temporaries
        n = min(step, count - start)
        block = middle[rng.integers(0, centres, n)] + 0.35 * rng.standard_normal((n, dim), dtype=np.float32) / np.sqrt(dim)
        vectors[start:start + n] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return vectors


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Fraction of the exact top-K rows that the approximate search also returned."""
    hits = sum(len(np.intersect1d(f[f >= 0], t)) for f, t in zip(found, truth))
    return hits / truth.size


def search_scaling(args) -> dict:
    import faiss
    import torch

    from engine.search import topk_inner_product

    t = time.perf_counter()
    vectors = synthetic_bank(args.vectors, args.dim, args.centres)
    rng = np.random.default_rng(1)
    queries = vectors[rng.integers(0, len(vectors), args.queries)] + \
        0.35 * rng.standard_normal((args.queries, args.dim), dtype=np.float32) / np.sqrt(args.dim)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    print(f"synthetic bank {vectors.shape[0]:,} x {vectors.shape[1]} float32 = {vectors.nbytes / 2**20:.0f} MB "
          f"({time.perf_counter() - t:.1f} s); {args.queries} queries, K={args.k}; faiss threads "
          f"{faiss.omp_get_max_threads()}")
    report = {"vectors": int(vectors.shape[0]), "dim": args.dim, "queries": args.queries, "k": args.k, "rows": []}

    def timed(fn, repeats=3):
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - start)
        return out, float(np.median(times))

    t = time.perf_counter()
    flat = make_index(vectors, Config(index="Flat"))
    flat_build = time.perf_counter() - t
    (truth_sims, truth), flat_query = timed(lambda: flat.search(queries, args.k), repeats=1)
    rows = [("Flat (exact)", "-", flat_build, flat_query, 1.0)]

    (sims, found), torch_query = timed(lambda: topk_inner_product(torch.from_numpy(queries), torch.from_numpy(vectors),
                                                                   args.k), repeats=1)
    rows.append(("torch top-K (exact, CPU)", "-", 0.0, torch_query, recall_at_k(found.numpy(), truth)))

    t = time.perf_counter()
    # make_index trains IVF on a fixed random sample of Config.index_train_size vectors, then adds them all
    ivf = make_index(vectors, Config(index=args.index, nprobe=args.nprobe[0],
                                     index_train_size=args.train_sample or len(vectors)))
    ivf_build = time.perf_counter() - t
    for nprobe in args.nprobe:
        ivf.nprobe = nprobe
        (_, found), query = timed(lambda: ivf.search(queries, args.k))
        rows.append((args.index + (f" (trained on {args.train_sample:,})" if args.train_sample else ""), str(nprobe),
                     ivf_build, query, recall_at_k(found, truth)))
    del flat, ivf

    print(f"| {'index':<26} | {'nprobe':>6} | {'build+train s':>13} | {'query ms (batch)':>16} | "
          f"{'ms/query':>8} | {'recall@' + str(args.k):>9} |")
    print(f"|{'-' * 28}|{'-' * 8}|{'-' * 15}|{'-' * 18}|{'-' * 10}|{'-' * 11}|")
    for name, nprobe, build, query, recall in rows:
        print(f"| {name:<26} | {nprobe:>6} | {build:>13.2f} | {1000 * query:>16.1f} | "
              f"{1000 * query / args.queries:>8.3f} | {recall:>9.4f} |")
        report["rows"].append({"index": name, "nprobe": nprobe, "build_s": build, "query_s": query,
                               "recall": recall})
    return report


def stream_memory(args) -> dict:
    from engine import Engine
    from engine.data import load_label_map
    from engine.models import create_backbone, ground_truth_proposals

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from throughput import DEFAULT_DATA, build_bank, image_paths, rss_mb

    config = Config(batch_size=4)
    backbone = create_backbone(batch_size=4)
    bank = build_bank(backbone, config, 12)
    engine = Engine(bank, backbone=backbone, config=config)

    def mask_path(image: Path) -> Path:
        return image.parent.parent / "SegmentationClass" / f"{image.stem}.png"

    paths = [p for p in image_paths(DEFAULT_DATA / "JPEGImages", None) if mask_path(p).is_file()]

    def items():
        for path in itertools.islice(itertools.cycle(paths), args.stream):
            yield path, ground_truth_proposals(load_label_map(mask_path(path)))

    samples = []
    start = time.perf_counter()
    for i, _ in enumerate(engine.segment_stream(items(), prefetch=2)):
        samples.append(rss_mb())
    elapsed = time.perf_counter() - start
    tenth = max(1, len(samples) // 10)
    first, last = float(np.max(samples[:tenth])), float(np.max(samples[-tenth:]))
    print(f"stream of {len(samples)} images ({len(paths)} distinct, cycled), batch 4, prefetch 2: "
          f"{len(samples) / elapsed:.2f} images/s; RSS min {min(samples):.0f} MB, max {max(samples):.0f} MB, "
          f"max over the first 10% {first:.0f} MB, over the last 10% {last:.0f} MB (growth {last - first:+.0f} MB)")
    return {"images": len(samples), "rss_mb": samples, "rss_growth_mb": last - first,
            "images_per_sec": len(samples) / elapsed}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vectors", type=int, default=1 << 20)
    parser.add_argument("--dim", type=int, default=208)
    parser.add_argument("--centres", type=int, default=16384)
    parser.add_argument("--queries", type=int, default=200, help="one batch of queries (a few images' proposals)")
    parser.add_argument("--k", type=int, default=25)
    parser.add_argument("--index", default="IVF4096,Flat")
    parser.add_argument("--nprobe", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--train-sample", type=int, default=0, help="train IVF on this many vectors (Config.index_train_size; 0 = all)")
    parser.add_argument("--stream", type=int, default=300, help="images in the RSS stream (0 skips it)")
    parser.add_argument("--no-search", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    report = {}
    if not args.no_search:
        report["search"] = search_scaling(args)
    if args.stream:
        report["stream"] = stream_memory(args)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
