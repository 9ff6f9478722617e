"""Triton serving vs in-process: feature agreement, identical label maps, requests/sec and images/sec (HTTP, gRPC).

Starts a local tritonserver (python backend running the backbone's ONNX through onnxruntime on CPU, from the server
venv of scripts/triton_env.sh) over a generated repository, then times the same work three ways: in-process
onnxruntime, Triton over HTTP, Triton over gRPC. On one machine the server and the client share the cores, so the
numbers measure the serving overhead, not a remote server's capacity.

    python bench/triton_serving.py [--data /work/shared/data/voc2012-mini] [--images 24] [--threads 2] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from engine.registry import DEFAULT_BACKBONE


def _rate(call, count: int, min_seconds: float = 3.0) -> float:
    """count / seconds per call, repeating call() for at least min_seconds after one warm-up."""
    call()
    runs, start = 0, time.perf_counter()
    while True:
        call()
        runs += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return count * runs / elapsed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="/work/shared/data/voc2012-mini")
    parser.add_argument("--backbone", default=DEFAULT_BACKBONE)
    parser.add_argument("--images", type=int, default=24, help="val images timed for images/sec")
    parser.add_argument("--bank-images", type=int, default=12, help="train images in the ground-truth bank")
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime threads, in-process and in the server")
    parser.add_argument("--seconds", type=float, default=2.0, help="minimum timed seconds per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the best of each is reported")
    parser.add_argument("--json", default=None, help="also write the numbers here")
    args = parser.parse_args(argv)

    from engine import Engine, FeatureBank, create_backbone
    from engine.data import VOCDataset
    from engine.export.triton import write_repository
    from engine.serving.server import LocalServer
    from engine.serving.server_env import ensure_server_env
    from engine.models import ground_truth_proposals
    from engine.models.backbones import model_path

    ensure_server_env()
    train, val = VOCDataset(args.data, "train"), VOCDataset(args.data, "val")
    samples = [val[i] for i in range(min(args.images, len(val)))]
    images = [s.image for s in samples]
    local = create_backbone(args.backbone, num_threads=args.threads)
    bank = FeatureBank.build([train[i] for i in range(args.bank_images)], local, train.class_names, progress=False)
    config = bank.config.replace(top_k=1)
    proposals = [ground_truth_proposals(s.mask) for s in samples]
    one = local.preprocess([images[0]])  # one padded image (the first val image)
    small = np.zeros((1, 64, 64, 3), np.uint8)

    report = {"backbone": args.backbone, "images": len(images), "threads": args.threads,
              "request_shape": list(one.shape), "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        write_repository(tmp, args.backbone, variants=["python"], onnx_path=model_path(args.backbone),
                         num_threads=args.threads)
        with LocalServer(tmp) as server:
            served = {"http": create_backbone(args.backbone, runtime="triton", url=server.http_url, protocol="http"),
                      "grpc": create_backbone(args.backbone, runtime="triton", url=server.grpc_url, protocol="grpc")}
            reference = local.features(images)
            reference_maps = [r.label_map for r in
                              Engine(bank, backbone=local, config=config).segment_batch(images, proposals)]
            paths = [("in-process onnxruntime", local), ("triton http", served["http"]),
                     ("triton grpc", served["grpc"])]
            rows = {}
            for label, backbone in paths:
                features = backbone.features(images)
                diff = max(float(np.abs(a - b).max()) for a, b in zip(features, reference))
                maps = [r.label_map for r in
                        Engine(bank, backbone=backbone, config=config).segment_batch(images, proposals)]
                rows[label] = {"path": label, "max_abs_feature_diff": diff,
                               "label_maps_identical": all(np.array_equal(a, b) for a, b in zip(maps, reference_maps)),
                               "requests_per_s_1img": 0.0, "requests_per_s_64x64": 0.0, "images_per_s_features": 0.0}
            # rounds interleave the three paths and keep each one's best: other load on the machine then disturbs
            # every path alike instead of whichever happened to run during it
            for _ in range(args.rounds):
                for label, backbone in paths:
                    runtime, row = backbone.runtime, rows[label]
                    for key, call, count in [
                            ("requests_per_s_1img", lambda: runtime.run({"images": one}), 1),
                            ("requests_per_s_64x64", lambda: runtime.run({"images": small}), 1),
                            ("images_per_s_features", lambda: backbone.features(images), len(images))]:
                        row[key] = max(row[key], _rate(call, count, args.seconds))
            report["rows"] = list(rows.values())
            for row in report["rows"]:
                print(json.dumps(row), flush=True)
    print(f"\n{args.backbone}, {len(images)} VOC val images, onnxruntime {args.threads} threads; one request = "
          f"{tuple(one.shape)}")
    print("| path | max feature diff | label maps identical | req/s (1 image) | req/s (64x64) | images/s |")
    print("|---|---|---|---|---|---|")
    for r in report["rows"]:
        print(f"| {r['path']} | {r['max_abs_feature_diff']:.2g} | {r['label_maps_identical']} | "
              f"{r['requests_per_s_1img']:.1f} | {r['requests_per_s_64x64']:.0f} | {r['images_per_s_features']:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
