"""Times the proposer's device kernels: SLIC superpixels (ops.slic_superpixels_batch) and merging in rounds
(ops.merge_regions_rac_batch) on a batch of real images, on the CPU launchers and, with --cuda, on the CUDA ones
(torch tensors, timed with CUDA events), beside today's host steps (OpenCV watershed, the greedy merge); then the
whole proposer per image: the host's (EmbeddedProposer.propose_one) and the device one
(EmbeddedProposer.propose_on_device: Lab, SLIC, graph, pooling, RAC, proposals) on torch CPU tensors and, with
--cuda, on the GPU. Images are worked at the proposer's scale (0.5); the merges run on random feature maps of --dim
at stride 16 (their cost depends on the graph and the width, not on the values).

    python bench/proposer_device.py --images ../shared/data/voc2012-mini/JPEGImages [--limit 24] [--cuda]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import cv2
import numpy as np

if __package__ in (None, ""):
    sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine import ops  # noqa: E402
from engine.models.embedded import DEVICE_PROPOSER, EmbeddedProposer  # noqa: E402
from engine.models.superpixels import superpixel_graph  # noqa: E402


def best_ms(run, repeats: int) -> float:
    """The fastest of `repeats` runs, in ms."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(1000 * (time.perf_counter() - start))
    return min(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--limit", type=int, default=24)
    parser.add_argument("--n-segments", type=int, default=400)
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cuda", action="store_true")
    args = parser.parse_args(argv)

    files = sorted(p for p in args.images.iterdir() if p.suffix.lower() in (".jpg", ".png"))[:args.limit]
    images = [cv2.cvtColor(cv2.imread(str(f)), cv2.COLOR_BGR2RGB) for f in files]
    small = [cv2.resize(im, None, fx=0.5, fy=0.5, interpolation=cv2.INTER_AREA) for im in images]
    labs = [cv2.cvtColor(im.astype(np.float32) / 255.0, cv2.COLOR_RGB2LAB) for im in small]
    rng = np.random.default_rng(0)
    graphs = []
    for im in images:
        labels, edges, colour = superpixel_graph(im, args.n_segments, 0.5)
        count = int(labels.max()) + 1
        features = rng.standard_normal((count, args.dim)).astype(np.float32)
        graphs.append((edges, np.bincount(labels.ravel(), minlength=count).astype(np.float64), features, colour))
    levels = (100, 50)
    n = len(images)
    rows = {
        "watershed (OpenCV, host)": best_ms(lambda: [superpixel_graph(im, args.n_segments, 0.5) for im in images],
                                            args.repeats),
        "slic cpu": best_ms(lambda: ops.slic_superpixels_batch(labs, args.n_segments, 10.0, args.iterations),
                            args.repeats),
        "greedy merge cpu": best_ms(lambda: [ops.merge_regions(*g, levels) for g in graphs], args.repeats),
        "rac merge cpu": best_ms(lambda: ops.merge_regions_rac_batch(graphs, levels), args.repeats),
    }
    stride = 16
    maps = [rng.standard_normal((-(-im.shape[0] // stride), -(-im.shape[1] // stride), args.dim)).astype(np.float32)
            for im in images]
    host_proposer = EmbeddedProposer(n_superpixels=args.n_segments)
    device_proposer = EmbeddedProposer(n_superpixels=args.n_segments, slic_iterations=args.iterations,
                                       **DEVICE_PROPOSER)
    rows["whole proposer, host"] = best_ms(lambda: [host_proposer.propose_one(im, f, stride)
                                                    for im, f in zip(images, maps)], args.repeats)
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:
        cpu_maps = [torch.from_numpy(f) for f in maps]
        rows["whole proposer, device steps cpu"] = best_ms(
            lambda: device_proposer.propose_on_device(images, cpu_maps, stride), args.repeats)
    if args.cuda:
        import torch

        d_labs = [torch.from_numpy(lab).cuda() for lab in labs]
        d_graphs = [tuple(torch.from_numpy(np.ascontiguousarray(x)).cuda() for x in g) for g in graphs]

        def device_ms(run) -> float:
            run()  # warm-up
            times = []
            for _ in range(args.repeats):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                run()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            return min(times)

        rows["slic cuda"] = device_ms(lambda: ops.slic_superpixels_batch(d_labs, args.n_segments, 10.0,
                                                                         args.iterations))
        rows["rac merge cuda"] = device_ms(lambda: ops.merge_regions_rac_batch(d_graphs, levels))
        d_maps = [torch.from_numpy(f).cuda() for f in maps]
        rows["whole proposer, cuda"] = device_ms(lambda: device_proposer.propose_on_device(images, d_maps, stride))
    print(f"{n} images from {args.images}, {args.n_segments} segments at scale 0.5, merge width {args.dim}")
    for name, ms in rows.items():
        print(f"{name:28s} {ms / n:8.2f} ms/img")
    return 0


if __name__ == "__main__":
    sys.exit(main())
