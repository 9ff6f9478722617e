"""Times the compiled ops (engine.ops) against their NumPy references (engine.reference) side by side, on realistic
sizes: regions given as unions of atoms of a random partition of the image (superpixel-like cells), as the engine's
proposers give them.

Importable (bench/throughput.py uses `run_kernel_bench` and `format_table`) and runnable:

    python bench/kernels.py [--repeats 5] [--threads 0] [--quick] [--cuda]

Each row: one op at one size, median wall time of the reference and of the compiled op, and the speed-up; the
outputs are checked against the reference on every row. The batched rows run a whole batch (8 VOC-sized images) in
one call. --cuda also times, when torch sees a GPU (it says it skips otherwise), the bank search on the GPU
(TorchIndex on a CUDA device) against the exact NumPy scan (ExactIndex), and the batched ops on torch CUDA tensors
(engine.ops' CUDA launchers, timed with torch.cuda.Event) against the same ops' CPU launchers.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

if __package__ in (None, ""):  # `python bench/kernels.py` from the repository root
    sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # after site-packages: an installed engine (with its compiled _C) wins

from engine import ops, reference  # noqa: E402
from engine.arrays import host  # noqa: E402
from engine.search import ExactIndex  # noqa: E402


@dataclass
class BenchRow:
    """One op at one size: median milliseconds per call of the reference and of the compiled (or device) path."""

    op: str
    size: str
    reference_ms: float
    compiled_ms: float
    extra: dict = field(default_factory=dict)

    @property
    def speedup(self) -> float:
        return self.reference_ms / self.compiled_ms if self.compiled_ms > 0 else float("inf")


def median_ms(fn: Callable[[], object], repeats: int, warmup: int = 1, sync: Callable[[], None] | None = None) -> float:
    """Median wall time of fn() in milliseconds over `repeats` calls, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    if sync:
        sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - start)
    return 1000.0 * statistics.median(times)


def random_partition(rng: np.random.Generator, height: int, width: int, atoms: int):
    """An (H, W) int32 map of `atoms` cells: the nearest of `atoms` random seeds (Voronoi cells, like superpixels).
    Returns the map and the seeds' (y, x)."""
    seeds = np.stack([rng.uniform(0, height, atoms), rng.uniform(0, width, atoms)], 1)
    yy, xx = np.mgrid[:height, :width]
    best = np.full((height, width), np.inf)
    labels = np.zeros((height, width), np.int32)
    for a, (sy, sx) in enumerate(seeds):
        distance = (yy - sy) ** 2 + (xx - sx) ** 2
        closer = distance < best
        best[closer] = distance[closer]
        labels[closer] = a
    return labels, seeds


def proposal_members(rng: np.random.Generator, seeds: np.ndarray, count: int, height: int, width: int) -> np.ndarray:
    """(N, A) proposals as unions of atoms: the cells whose seeds fall in an ellipse covering 0.5% to 30% of the
    image, overlapping each other; every third one is a jittered copy of an earlier one (near-duplicates, as a
    proposer gives them)."""
    members = np.zeros((count, len(seeds)), bool)
    ellipses = []
    for n in range(count):
        if n % 3 == 2:
            cy, cx, ry, rx = ellipses[n - 2]
            dy, dx = rng.integers(-6, 7, 2)
            cy, cx = cy + dy, cx + dx
        else:
            area = rng.uniform(0.005, 0.3) * height * width
            aspect = rng.uniform(0.4, 2.5)
            ry = np.sqrt(area / np.pi * aspect)
            rx = area / (np.pi * ry)
            cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        ellipses.append((cy, cx, ry, rx))
        members[n] = ((seeds[:, 0] - cy) / ry) ** 2 + ((seeds[:, 1] - cx) / rx) ** 2 <= 1.0
    return members


def regions(seed: int, height: int, width: int, count: int, atoms: int):
    rng = np.random.default_rng(seed)
    labels, seeds = random_partition(rng, height, width, atoms)
    return rng, labels, proposal_members(rng, seeds, count, height, width)


def bench_soft_mask_pool(height: int, width: int, stride: int, dim: int, count: int, atoms: int = 400,
                         repeats: int = 5, num_threads: int = 0, seed: int = 0) -> BenchRow:
    rng, labels, members = regions(seed, height, width, count, atoms)
    features = rng.standard_normal((-(-height // stride), -(-width // stride), dim)).astype(np.float32)
    want = reference.soft_mask_pool(features, labels, members, stride)
    got = ops.soft_mask_pool(features, labels, members, stride, num_threads=num_threads)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    return BenchRow(
        op="soft_mask_pool", size=f"{height}x{width} s{stride} D{dim} N{count} A{atoms}",
        reference_ms=median_ms(lambda: reference.soft_mask_pool(features, labels, members, stride), repeats),
        compiled_ms=median_ms(lambda: ops.soft_mask_pool(features, labels, members, stride, num_threads=num_threads),
                              repeats),
    )


def bench_mask_nms_raster(height: int, width: int, count: int, num_classes: int = 3, atoms: int = 400,
                          iou_threshold: float = 0.4, repeats: int = 5, num_threads: int = 0,
                          seed: int = 0) -> BenchRow:
    rng, labels, members = regions(seed, height, width, count, atoms)
    classes = rng.integers(1, num_classes + 1, count)
    scores = rng.random(count)
    want = reference.mask_nms_raster(labels, members, classes, scores, iou_threshold)
    got = ops.mask_nms_raster(labels, members, classes, scores, iou_threshold, num_threads=num_threads)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)
    return BenchRow(
        op="mask_nms_raster", size=f"{height}x{width} N{count} C{num_classes} A{atoms}",
        reference_ms=median_ms(lambda: reference.mask_nms_raster(labels, members, classes, scores, iou_threshold),
                               repeats),
        compiled_ms=median_ms(lambda: ops.mask_nms_raster(labels, members, classes, scores, iou_threshold,
                                                          num_threads=num_threads), repeats),
        extra={"kept": int(want[0].sum())},
    )


def voc_batch(seed: int, count: int, atoms: int = 400, shapes=None):
    """Atom maps and memberships of a batch of VOC-sized images (`count` proposals each, as `regions` makes them),
    made once per arguments (the partitions take seconds). Returns (rng, atom maps, memberships)."""
    key = (seed, count, atoms, tuple(VOC_BATCH if shapes is None else shapes))
    if key not in _VOC_BATCHES:
        made = [regions(seed + i, h, w, count, atoms) for i, (h, w) in enumerate(key[3])]
        _VOC_BATCHES[key] = (np.random.default_rng(seed), [m[1] for m in made], [m[2] for m in made])
    return _VOC_BATCHES[key]


_VOC_BATCHES: dict = {}


def batch_features(rng: np.random.Generator, atoms: list, stride: int, dim: int) -> list:
    return [rng.standard_normal((-(-a.shape[0] // stride), -(-a.shape[1] // stride), dim)).astype(np.float32)
            for a in atoms]


def bench_soft_mask_pool_batch(stride: int, dim: int, count: int, atoms: int = 400, repeats: int = 5,
                               num_threads: int = 0, seed: int = 0) -> BenchRow:
    """One call over a batch of 8 VOC-sized images against the reference's image-by-image loop."""
    rng, labels, members = voc_batch(seed, count, atoms)
    features = batch_features(rng, labels, stride, dim)
    want = reference.soft_mask_pool_batch(features, labels, members, stride)
    got = ops.soft_mask_pool_batch(features, labels, members, stride, num_threads=num_threads)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    return BenchRow(
        op="soft_mask_pool_batch", size=f"B{len(labels)} VOC s{stride} D{dim} N{count}/img A{atoms}",
        # the check above warmed the reference (a NumPy loop: nothing to warm but caches)
        reference_ms=median_ms(lambda: reference.soft_mask_pool_batch(features, labels, members, stride), repeats,
                               warmup=0),
        compiled_ms=median_ms(lambda: ops.soft_mask_pool_batch(features, labels, members, stride,
                                                               num_threads=num_threads), repeats),
        extra={"regions": len(want)},
    )


def neighbours(seed: int, queries: int, k: int, num_classes: int):
    """(Q, K) best-first similarities and neighbour classes (a few -1: no result), and bank counts per class."""
    rng = np.random.default_rng(seed)
    similarities = -np.sort(-rng.random((queries, k)), axis=1).astype(np.float32)
    labels = rng.integers(0, num_classes, (queries, k))
    labels[rng.random((queries, k)) < 0.01] = -1
    return similarities, labels, rng.integers(50, 5000, num_classes)


def bench_vote(queries: int, k: int, num_classes: int, method: str = "count", repeats: int = 5,
               num_threads: int = 0, seed: int = 0) -> BenchRow:
    similarities, labels, counts = neighbours(seed, queries, k, num_classes)
    want = reference.vote(similarities, labels, num_classes, method, counts)
    got = ops.vote(similarities, labels, num_classes, method, counts, num_threads=num_threads)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_allclose(got[1], want[1], rtol=1e-6)
    return BenchRow(
        op=f"vote ({method})", size=f"Q{queries} K{k} C{num_classes}",
        reference_ms=median_ms(lambda: reference.vote(similarities, labels, num_classes, method, counts), repeats),
        compiled_ms=median_ms(lambda: ops.vote(similarities, labels, num_classes, method, counts,
                                               num_threads=num_threads), repeats),
    )


def bench_top_k(queries: int, bank: int, k: int, repeats: int = 5, num_threads: int = 0, seed: int = 0) -> BenchRow:
    """The exact search's selection over a (queries, bank) score block plus the hubness offsets: NumPy's partial
    selection (engine.topk.top_k, what FlatIndex runs without engine._C) against the compiled one pass a row."""
    from engine.topk import top_k

    rng = np.random.default_rng(seed)
    scores = rng.standard_normal((queries, bank)).astype(np.float32)
    offsets = -np.abs(rng.standard_normal(bank)).astype(np.float32) * 0.05
    want = top_k(scores + offsets[None, :], k)
    got = ops.top_k(scores, k, offsets, num_threads=num_threads)
    np.testing.assert_array_equal(got[1], want[1])
    return BenchRow(
        op="top_k (NumPy selection)", size=f"Q{queries} n{bank} K{k}",
        reference_ms=median_ms(lambda: top_k(scores + offsets[None, :], k), repeats),
        compiled_ms=median_ms(lambda: ops.top_k(scores, k, offsets, num_threads=num_threads), repeats),
    )


def bench_merge_regions(leaves: int, dim: int, repeats: int = 5, seed: int = 0) -> BenchRow:
    """The proposer's merging over the superpixels of a 384x512 image (a grid-like region graph)."""
    rng = np.random.default_rng(seed)
    labels, _ = random_partition(rng, 384, 512, leaves)
    from engine.models.superpixels import adjacency

    labels = np.unique(labels, return_inverse=True)[1].reshape(labels.shape)
    count = int(labels.max()) + 1
    edges, area = adjacency(labels), np.bincount(labels.ravel(), minlength=count)
    features = rng.standard_normal((count, dim)).astype(np.float32)
    colour = (rng.random((count, 3)) * 100).astype(np.float32)
    levels = (count // 4, count // 8)
    want = reference.merge_regions(edges, area, features, colour, levels)
    got = ops.merge_regions(edges, area, features, colour, levels)
    np.testing.assert_array_equal(got.snapshots, want.snapshots)
    return BenchRow(op="merge_regions", size=f"n{count} D{dim} E{len(edges)}",
                    reference_ms=median_ms(lambda: reference.merge_regions(edges, area, features, colour, levels),
                                           repeats),
                    compiled_ms=median_ms(lambda: ops.merge_regions(edges, area, features, colour, levels), repeats))


def cuda_unavailable_reason() -> str | None:
    """None when torch sees a CUDA GPU, else why the --cuda rows are skipped."""
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} sees no CUDA GPU"
    return None


def cuda_ops_unavailable_reason() -> str | None:
    """None when engine._C has CUDA launchers and torch sees a GPU, else why the batched-op GPU rows are skipped."""
    reason = cuda_unavailable_reason()
    if reason is None and not ops.build_info()["cuda"]:
        reason = "engine._C was built without the CUDA launchers"
    return reason


def cuda_event_ms(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median milliseconds of fn() on the current CUDA stream, between two torch.cuda.Events recorded around it
    (the launches' host work included where the GPU waits for it), after `warmup` untimed calls."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def bench_batched_ops_cuda(stride: int = 16, dim: int = 680, count: int = 150, num_classes: int = 21,
                           queries: int = 1200, k: int = 25, repeats: int = 5, num_threads: int = 0,
                           seed: int = 0) -> list[BenchRow]:
    """The batched ops on torch CUDA tensors (inputs already on the GPU) against the same ops' CPU launchers on
    NumPy arrays: SMFA and NMS + raster over a batch of 8 VOC-sized images, the vote over Q queries. The GPU's
    results must equal the CPU's (SMFA within 1e-5)."""
    import torch

    rng, labels, members = voc_batch(seed, count)
    features = batch_features(rng, labels, stride, dim)
    total = sum(len(m) for m in members)
    classes, scores = rng.integers(0, num_classes, total), rng.random(total)
    similarities, neighbour_labels, counts = neighbours(seed, queries, k, num_classes)
    cuda = [[torch.from_numpy(x).cuda() for x in xs] for xs in (features, labels, members)]
    d_features, d_labels, d_members = cuda
    d_classes, d_scores = torch.from_numpy(classes).cuda(), torch.from_numpy(scores).cuda()
    d_sims, d_neighbours = torch.from_numpy(similarities).cuda(), torch.from_numpy(neighbour_labels).cuda()
    cases = [
        ("soft_mask_pool_batch", f"B{len(labels)} VOC s{stride} D{dim} N{count}/img",
         lambda: ops.soft_mask_pool_batch(features, labels, members, stride, num_threads=num_threads),
         lambda: ops.soft_mask_pool_batch(d_features, d_labels, d_members, stride)),
        ("mask_nms_raster_batch", f"B{len(labels)} VOC N{count}/img C{num_classes}",
         lambda: ops.mask_nms_raster_batch(labels, members, classes, scores, 0.4, num_threads=num_threads),
         lambda: ops.mask_nms_raster_batch(d_labels, d_members, d_classes, d_scores, 0.4)),
        ("vote (count)", f"Q{queries} K{k} C{num_classes}",
         lambda: ops.vote(similarities, neighbour_labels, num_classes, "count", counts, num_threads=num_threads),
         lambda: ops.vote(d_sims, d_neighbours, num_classes, "count", counts)),
    ]
    rows = []
    for op, size, on_cpu, on_gpu in cases:
        want, got = on_cpu(), on_gpu()
        torch.cuda.synchronize()
        if op == "soft_mask_pool_batch":
            np.testing.assert_allclose(host(got), want, rtol=1e-5, atol=1e-5)
        elif op == "mask_nms_raster_batch":
            np.testing.assert_array_equal(host(got[0]), want[0])
            for a, b in zip([*got[1], *got[2]], [*want[1], *want[2]]):
                np.testing.assert_array_equal(host(a), b)
        else:
            np.testing.assert_array_equal(host(got[0]), want[0])
            np.testing.assert_allclose(host(got[1]), want[1], rtol=1e-6)
        before = ops.cuda_launches()
        on_gpu()
        launches = ops.cuda_launches() - before
        rows.append(BenchRow(op=f"{op} ({launches} launches)", size=size,
                             reference_ms=median_ms(on_cpu, repeats), compiled_ms=cuda_event_ms(on_gpu, repeats)))
    return rows


def bench_search_cuda(size: int, dim: int, queries: int, k: int = 25, repeats: int = 5, seed: int = 0) -> BenchRow:
    """TorchIndex with the bank on the GPU against ExactIndex (NumPy), same queries; the rows must agree."""
    import torch

    from engine.search import TorchIndex

    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((size, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    labels = rng.integers(0, 21, size)
    batch = vectors[rng.integers(0, size, queries)] + 0.1 * rng.standard_normal((queries, dim)).astype(np.float32)
    exact = ExactIndex(vectors, labels, 21)
    device = TorchIndex(vectors, labels, 21, device="cuda")
    want, got = exact.search(batch, k), device.search(batch, k)
    np.testing.assert_allclose(got[0], want[0], atol=1e-4)
    agree = float((got[1] == want[1]).mean())
    if agree < 0.99:  # different GEMMs may swap neighbours whose similarities differ by rounding only
        raise AssertionError(f"TorchIndex on CUDA and ExactIndex agree on only {100 * agree:.1f}% of neighbours")
    return BenchRow(op=f"search ({device.describe()})", size=f"M{size} D{dim} Q{queries} K{k}",
                    reference_ms=median_ms(lambda: exact.search(batch, k), repeats),
                    compiled_ms=median_ms(lambda: device.search(batch, k), repeats, sync=torch.cuda.synchronize),
                    extra={"agree": agree})


# (height, width, stride, dim, count): the 384x512 image at the embedded backbones' strides and dimensions.
POOL_CASES = [
    (384, 512, 32, 208, 50),
    (384, 512, 16, 680, 100),
    (384, 512, 16, 680, 200),
    (384, 512, 14, 384, 200),
]
# (superpixels, feature dim): the embedded proposer's merging
MERGE_CASES = [(400, 120), (800, 120)]
# (height, width, count, num_classes)
NMS_CASES = [
    (384, 512, 50, 3),
    (384, 512, 200, 3),
    (384, 512, 200, 20),
]
#: (height, width) of the batched rows' 8 images: VOC 2012's common sizes
VOC_BATCH = [(375, 500), (500, 375), (333, 500), (500, 333), (375, 500), (366, 500), (500, 400), (281, 500)]
# (stride, dim, regions per image): one batch of VOC_BATCH at the multilayer backbone's stride and width
POOL_BATCH_CASES = [(16, 680, 150)]
# (queries, K, num_classes): about 8 images' proposals, VOC's 21 classes
VOTE_CASES = [(1200, 25, 21)]
# (queries, bank vectors, K): a batch of 4 street scenes' proposals against the CamVid ground-truth bank
TOP_K_CASES = [(320, 28_687, 15)]
# (bank size, dim, queries)
SEARCH_CASES = [
    (100_000, 208, 200),
    (1_000_000, 208, 200),
]


def run_kernel_bench(repeats: int = 5, num_threads: int = 0, quick: bool = False, pool_cases=None,
                     nms_cases=None) -> list[BenchRow]:
    """Times every case; `quick` keeps the N=50 single-image cases only (for a smoke run inside a larger
    benchmark), and the batched, vote and top-k rows."""
    pool_cases = POOL_CASES if pool_cases is None else pool_cases
    nms_cases = NMS_CASES if nms_cases is None else nms_cases
    if quick:
        pool_cases = [c for c in pool_cases if c[4] <= 50]
        nms_cases = [c for c in nms_cases if c[2] <= 50]
    rows = [bench_soft_mask_pool(*case, repeats=repeats, num_threads=num_threads) for case in pool_cases]
    rows += [bench_mask_nms_raster(h, w, n, c, repeats=repeats, num_threads=num_threads) for h, w, n, c in nms_cases]
    rows += [bench_merge_regions(n, d, repeats=repeats) for n, d in (MERGE_CASES[:1] if quick else MERGE_CASES)]
    rows += [bench_soft_mask_pool_batch(*case, repeats=repeats, num_threads=num_threads) for case in POOL_BATCH_CASES]
    rows += [bench_vote(*case, method=method, repeats=repeats, num_threads=num_threads) for case in VOTE_CASES
             for method in ("count", "softmax")]
    rows += [bench_top_k(*case, repeats=repeats, num_threads=num_threads) for case in TOP_K_CASES]
    return rows


def run_search_bench(repeats: int = 5, quick: bool = False) -> list[BenchRow]:
    cases = SEARCH_CASES[:1] if quick else SEARCH_CASES
    return [bench_search_cuda(*case, repeats=repeats) for case in cases]


def format_table(rows: list[BenchRow], reference: str = "numpy ms", compiled: str = "compiled ms") -> str:
    header = ["op", "size", reference, compiled, "speed-up"]
    lines = [header] + [[r.op, r.size, f"{r.reference_ms:.2f}", f"{r.compiled_ms:.2f}", f"{r.speedup:.1f}x"]
                        for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = []
    for k, line in enumerate(lines):
        out.append("| " + " | ".join(cell.ljust(w) if i < 2 else cell.rjust(w)
                                     for i, (cell, w) in enumerate(zip(line, widths))) + " |")
        if k == 0:
            out.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per case (median reported)")
    parser.add_argument("--threads", type=int, default=0, help="OpenMP threads for the compiled ops (0 = default)")
    parser.add_argument("--quick", action="store_true", help="only the N=50 cases (and the smaller bank)")
    parser.add_argument("--cuda", action="store_true", help="also time TorchIndex search on a CUDA GPU against "
                        "ExactIndex and the batched ops' CUDA launchers against their CPU launchers (skipped, "
                        "saying why, when torch sees no GPU)")
    args = parser.parse_args(argv)
    rows = run_kernel_bench(args.repeats, args.threads, args.quick)
    threads = args.threads or os.cpu_count()
    print(f"engine.ops vs engine.reference — median of {args.repeats}, {threads} CPU thread(s), regions as unions of "
          f"atoms of a random partition")
    print(format_table(rows))
    if args.cuda:
        reason = cuda_unavailable_reason()
        if reason is not None:
            print(f"--cuda: skipping the GPU search rows: {reason}")
        else:
            print(f"\nbank search: TorchIndex on CUDA vs ExactIndex (NumPy), median of {args.repeats}")
            print(format_table(run_search_bench(args.repeats, args.quick), "exact numpy ms", "cuda ms"))
        reason = cuda_ops_unavailable_reason()
        if reason is not None:
            print(f"--cuda: skipping the batched ops on the GPU: {reason}")
        else:
            print(f"\nbatched ops: CUDA launchers on torch tensors (torch.cuda.Event) vs CPU launchers ({threads} "
                  f"thread(s)), median of {args.repeats}")
            print(format_table(bench_batched_ops_cuda(repeats=args.repeats, num_threads=args.threads), "cpu ms",
                               "cuda ms"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
