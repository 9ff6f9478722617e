"""Times the compiled ops (engine.ops) against their NumPy references side by side, on realistic sizes.

Importable (bench/throughput.py uses `run_kernel_bench` and `format_table`) and runnable:

    python bench/kernels.py [--repeats 5] [--threads 0] [--quick] [--cuda]

Each row: one op at one size, median wall time of the reference and of the compiled op (and of the CUDA op when
--cuda and a GPU is usable), and the speed-up. The outputs are checked against the reference on every row.
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

from engine import ops  # noqa: E402
from engine.reference import mask_nms_raster_reference, soft_mask_pool_reference  # noqa: E402


@dataclass
class BenchRow:
    """One op at one size: median milliseconds per call of each implementation."""

    op: str
    size: str
    reference_ms: float
    compiled_ms: float
    cuda_ms: float | None = None
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


def proposal_masks(rng: np.random.Generator, count: int, height: int, width: int) -> np.ndarray:
    """Proposal-like masks: filled ellipses covering 0.5% to 30% of the image, overlapping each other."""
    yy, xx = np.mgrid[:height, :width]
    masks = np.empty((count, height, width), bool)
    for n in range(count):
        area = rng.uniform(0.005, 0.3) * height * width
        aspect = rng.uniform(0.4, 2.5)
        ry = np.sqrt(area / np.pi * aspect)
        rx = area / (np.pi * ry)
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        masks[n] = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
    return masks


def _cuda_ready(use_cuda: bool):
    if not use_cuda or not ops.cuda_available():
        return None
    import torch

    return torch


def bench_soft_mask_pool(height: int, width: int, stride: int, dim: int, count: int, repeats: int = 5,
                         num_threads: int = 0, use_cuda: bool = False, seed: int = 0) -> BenchRow:
    rng = np.random.default_rng(seed)
    grid = (-(-height // stride), -(-width // stride))
    features = rng.standard_normal((*grid, dim)).astype(np.float32)
    masks = proposal_masks(rng, count, height, width)
    want = soft_mask_pool_reference(features, masks, stride)
    got = ops.soft_mask_pool(features, masks, stride, num_threads=num_threads)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    row = BenchRow(
        op="soft_mask_pool", size=f"{height}x{width} s{stride} D{dim} N{count}",
        reference_ms=median_ms(lambda: soft_mask_pool_reference(features, masks, stride), repeats),
        compiled_ms=median_ms(lambda: ops.soft_mask_pool(features, masks, stride, num_threads=num_threads), repeats),
    )
    torch = _cuda_ready(use_cuda)
    if torch is not None:
        f_cuda, m_cuda = torch.from_numpy(features).cuda(), torch.from_numpy(masks).cuda()
        np.testing.assert_allclose(ops.soft_mask_pool(f_cuda, m_cuda, stride).cpu().numpy(), want, rtol=1e-5,
                                   atol=1e-5)
        row.cuda_ms = median_ms(lambda: ops.soft_mask_pool(f_cuda, m_cuda, stride), repeats,
                                sync=torch.cuda.synchronize)
    return row


def bench_mask_nms_raster(height: int, width: int, count: int, num_classes: int = 3, iou_threshold: float = 0.4,
                          repeats: int = 5, num_threads: int = 0, use_cuda: bool = False, seed: int = 0) -> BenchRow:
    rng = np.random.default_rng(seed)
    masks = proposal_masks(rng, count, height, width)
    # Near-duplicate proposals (as a proposer gives): every third mask is a jittered copy of an earlier one.
    for n in range(2, count, 3):
        masks[n] = np.roll(masks[n - 2], tuple(rng.integers(-6, 7, 2)), axis=(0, 1))
    classes = rng.integers(1, num_classes + 1, count)
    scores = rng.random(count)
    want = mask_nms_raster_reference(masks, classes, scores, iou_threshold)
    got = ops.mask_nms_raster(masks, classes, scores, iou_threshold, num_threads=num_threads)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)
    row = BenchRow(
        op="mask_nms_raster", size=f"{height}x{width} N{count} C{num_classes}",
        reference_ms=median_ms(lambda: mask_nms_raster_reference(masks, classes, scores, iou_threshold), repeats),
        compiled_ms=median_ms(
            lambda: ops.mask_nms_raster(masks, classes, scores, iou_threshold, num_threads=num_threads), repeats),
        extra={"kept": int(want[0].sum())},
    )
    torch = _cuda_ready(use_cuda)
    if torch is not None:
        m_cuda = torch.from_numpy(masks).cuda()
        c_cuda, s_cuda = torch.from_numpy(classes).cuda(), torch.from_numpy(scores).cuda()
        got = ops.mask_nms_raster(m_cuda, c_cuda, s_cuda, iou_threshold)
        for a, b in zip(got, want):
            np.testing.assert_array_equal(a.cpu().numpy(), b)
        row.cuda_ms = median_ms(lambda: ops.mask_nms_raster(m_cuda, c_cuda, s_cuda, iou_threshold), repeats,
                                sync=torch.cuda.synchronize)
    return row


# (height, width, stride, dim, count): the 384x512 image at the two backbones' strides and dimensions.
POOL_CASES = [
    (384, 512, 32, 208, 50),
    (384, 512, 32, 208, 200),
    (384, 512, 14, 384, 50),
    (384, 512, 14, 384, 200),
]
# (height, width, count, num_classes)
NMS_CASES = [
    (384, 512, 50, 3),
    (384, 512, 200, 3),
    (384, 512, 200, 20),
]


def run_kernel_bench(repeats: int = 5, num_threads: int = 0, quick: bool = False, use_cuda: bool = False,
                     pool_cases=None, nms_cases=None) -> list[BenchRow]:
    """Times every case; `quick` keeps the N=50 cases only (for a smoke run inside a larger benchmark)."""
    pool_cases = POOL_CASES if pool_cases is None else pool_cases
    nms_cases = NMS_CASES if nms_cases is None else nms_cases
    if quick:
        pool_cases = [c for c in pool_cases if c[4] <= 50]
        nms_cases = [c for c in nms_cases if c[2] <= 50]
    rows = [bench_soft_mask_pool(*case, repeats=repeats, num_threads=num_threads, use_cuda=use_cuda)
            for case in pool_cases]
    rows += [bench_mask_nms_raster(h, w, n, c, repeats=repeats, num_threads=num_threads, use_cuda=use_cuda)
             for h, w, n, c in nms_cases]
    return rows


def format_table(rows: list[BenchRow]) -> str:
    with_cuda = any(r.cuda_ms is not None for r in rows)
    header = ["op", "size", "numpy ms", "compiled ms", "speed-up"] + (["cuda ms"] if with_cuda else [])
    lines = [header]
    for r in rows:
        line = [r.op, r.size, f"{r.reference_ms:.2f}", f"{r.compiled_ms:.2f}", f"{r.speedup:.1f}x"]
        if with_cuda:
            line.append("-" if r.cuda_ms is None else f"{r.cuda_ms:.3f}")
        lines.append(line)
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
    parser.add_argument("--quick", action="store_true", help="only the N=50 cases")
    parser.add_argument("--cuda", action="store_true", help="also time the CUDA ops when a GPU is usable")
    args = parser.parse_args(argv)
    rows = run_kernel_bench(args.repeats, args.threads, args.quick, args.cuda)
    threads = args.threads or os.cpu_count()
    print(f"engine.ops vs engine.reference — median of {args.repeats}, {threads} CPU thread(s), "
          f"CUDA build: {ops.has_cuda()}, CUDA usable: {ops.cuda_available()}")
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
