"""Load and fault test of the whole segmentation served by a real local tritonserver.

Starts tritonserver (the server venv of scripts/triton_env.sh) over a repository holding the backbone's python
variant and the `moduseg_segment` model with a bank, then

1. load: at each concurrency level (default 1, 4, 16) sends `--requests` requests (one VOC val image each, cycled)
   through tritonclient's asyncio gRPC client, at most `concurrency` in flight: requests/s, p50 / p99 latency,
   errors, the server's inference and execution counts (their ratio is the dynamic batcher's mean batch), and
   whether every label map equals the in-process engine's for the same image;
2. fault (`--fault`, default on): RemoteEngine (the product's client, with its retries) sends requests from
   `--fault-threads` threads while the server is killed (SIGKILL, its whole process group) and restarted on the same
   ports; every request must succeed with the in-process label map or fail with an error within its bound
   (`timeout * (retries + 1)` plus backoff); the run lists how each ended and counts hangs and wrong answers.

Both parts are bounded in count and time (`--max-seconds` per level). On one machine server and client share the
cores: the numbers measure this machine's serving, not a cluster's.

    python bench/serving.py [--bank BANK] [--requests 48] [--levels 1 4 16] [--json OUT]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

import numpy as np

from engine.registry import DEFAULT_BACKBONE, triton_model_name


def _percentile(values, q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else float("nan")


async def _load_level(url: str, images, expected, concurrency: int, requests: int, max_seconds: float,
                      timeout: float) -> dict:
    """`requests` requests with at most `concurrency` in flight; latencies, errors, identical label maps."""
    import tritonclient.grpc.aio as grpc_aio

    from engine.export.triton_segment import SEGMENT_MODEL

    client = grpc_aio.InferenceServerClient(url)
    gate = asyncio.Semaphore(concurrency)
    latencies, errors, identical = [], [], []
    deadline = time.monotonic() + max_seconds

    async def one(index: int) -> None:
        image = images[index % len(images)]
        async with gate:
            if time.monotonic() > deadline:
                return
            tensor = grpc_aio.InferInput("IMAGE", [1, *image.shape], "UINT8")
            tensor.set_data_from_numpy(image[None])
            start = time.perf_counter()
            try:
                result = await client.infer(SEGMENT_MODEL, [tensor], outputs=[grpc_aio.InferRequestedOutput("LABELS"),
                                                                            grpc_aio.InferRequestedOutput("SEGMENTS")],
                                            client_timeout=timeout)
            except Exception as error:  # noqa: BLE001 - counted and reported
                errors.append(f"{type(error).__name__}: {error}"[:300])
                return
            latencies.append(time.perf_counter() - start)
            identical.append(bool(np.array_equal(result.as_numpy("LABELS")[0], expected[index % len(images)])))

    start = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(requests)))
    elapsed = time.perf_counter() - start
    stats = await client.get_inference_statistics(SEGMENT_MODEL, as_json=True)
    await client.close()
    model = stats["model_stats"][0]
    return {"concurrency": concurrency, "requests": len(latencies) + len(errors), "seconds": round(elapsed, 2),
            "requests_per_sec": round(len(latencies) / elapsed, 2), "p50_ms": round(1000 * _percentile(latencies, 50), 1),
            "p99_ms": round(1000 * _percentile(latencies, 99), 1), "errors": len(errors),
            "error_samples": sorted(set(errors))[:3], "identical_to_inprocess": all(identical) and bool(identical),
            "server_inference_count": int(model.get("inference_count", 0)),
            "server_execution_count": int(model.get("execution_count", 0))}


def _fault_run(server, images, expected, threads: int, requests: int, kill_after: float, down: float,
               timeout: float, retries: int) -> dict:
    """Requests through RemoteEngine while the server is killed and restarted; how each request ended."""
    from engine.serving.server import LocalServer
    from engine.remote import RemoteEngine

    backoff = 0.5
    bound = timeout * (retries + 1) + sum(min(backoff * 2 ** a, 8.0) for a in range(retries)) + 5.0
    remote = RemoteEngine(server.grpc_url, protocol="grpc", concurrency=threads, timeout=timeout, retries=retries,
                          backoff=backoff)
    outcomes = [None] * requests

    def one(index: int) -> None:
        start = time.perf_counter()
        try:
            result = remote.segment(images[index % len(images)])
            ok = bool(np.array_equal(result.label_map, expected[index % len(images)]))
            outcomes[index] = {"outcome": "ok" if ok else "WRONG ANSWER", "seconds": time.perf_counter() - start}
        except Exception as error:  # noqa: BLE001 - the outcome under test
            outcomes[index] = {"outcome": "error", "seconds": time.perf_counter() - start,
                               "error": f"{type(error).__name__}: {error}"[:400]}

    restarted = {}

    def kill_and_restart() -> None:
        time.sleep(kill_after)
        os.killpg(server.process.pid, signal.SIGKILL)
        server.process.wait(10)
        restarted["killed_at"] = time.perf_counter() - begin
        time.sleep(down)
        again = LocalServer(server.repo, http_port=server.http_port, grpc_port=server.grpc_port,
                            metrics_port=server.metrics_port, models=server.models, log_path=str(server.log_path) + ".2")
        again.start(timeout=180)
        restarted["ready_at"] = time.perf_counter() - begin
        restarted["server"] = again

    begin = time.perf_counter()
    killer = threading.Thread(target=kill_and_restart)
    killer.start()
    with ThreadPoolExecutor(threads) as pool:
        futures = []
        for i in range(requests):  # paced so that requests are in flight before, during and after the outage
            futures.append(pool.submit(one, i))
            time.sleep(0.3)
        done, pending = wait(futures, timeout=bound + 200)
    killer.join(300)
    remote.close()
    ended = [o for o in outcomes if o is not None]
    counts = {kind: sum(o["outcome"] == kind for o in ended) for kind in ("ok", "error", "WRONG ANSWER")}
    return {"requests": requests, **counts, "hung": requests - len(ended) + len(pending),
            "bound_seconds": round(bound, 1), "max_seconds": round(max(o["seconds"] for o in ended), 2),
            "killed_at_s": round(restarted.get("killed_at", -1), 2), "ready_again_at_s": round(restarted.get("ready_at", -1), 2),
            "error_samples": sorted({o["error"] for o in ended if o["outcome"] == "error"})[:3],
            "passed": counts["WRONG ANSWER"] == 0 and len(ended) == requests and not pending,
            "_server": restarted.get("server")}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="/work/shared/data/voc2012-mini")
    parser.add_argument("--bank", default=None, help="a bank directory (default: a ground-truth bank of --bank-images "
                                                     "voc train images with the default backbone)")
    parser.add_argument("--bank-images", type=int, default=24)
    parser.add_argument("--images", type=int, default=12, help="distinct val images the requests cycle through")
    parser.add_argument("--requests", type=int, default=48, help="requests per concurrency level")
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--max-seconds", type=float, default=120.0, help="per level; later requests are not sent")
    parser.add_argument("--timeout", type=float, default=60.0, help="client timeout per request, seconds")
    parser.add_argument("--instances", type=int, default=1, help="segmentation model instances")
    parser.add_argument("--threads", type=int, default=1, help="threads per model instance (engine, onnxruntime)")
    parser.add_argument("--queue-delay-us", type=int, default=20000)
    parser.add_argument("--fault", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--fault-requests", type=int, default=40)
    parser.add_argument("--fault-threads", type=int, default=4)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    from engine import Engine, FeatureBank, create_backbone
    from engine.data import VOCDataset
    from engine.export.triton import write_repository
    from engine.serving.server import LocalServer
    from engine.serving.server_env import ensure_server_env
    from engine.export.triton_segment import write_segment_model
    from engine.models.backbones import model_path

    ensure_server_env()
    val = VOCDataset(args.data, "val")
    images = [val[i].image for i in range(min(args.images, len(val)))]
    with tempfile.TemporaryDirectory() as tmp:
        bank_dir = args.bank
        if bank_dir is None:
            train = VOCDataset(args.data, "train")
            bank = FeatureBank.build([train[i] for i in range(min(args.bank_images, len(train)))],
                                     create_backbone(DEFAULT_BACKBONE), train.class_names, progress=False)
            bank_dir = bank.save(Path(tmp) / "bank")
        bank = FeatureBank.load(bank_dir)
        expected = [r.label_map for r in Engine(bank).segment_batch(images)]
        repo = Path(tmp) / "repo"
        backbone_model = triton_model_name(bank.backbone_name, "python")
        write_repository(repo, bank.backbone_name, variants=["python"], onnx_path=model_path(bank.backbone_name),
                         num_threads=args.threads, queue_delay_us=args.queue_delay_us)
        write_segment_model(repo, bank_dir, backbone_model, instances=args.instances, num_threads=args.threads,
                            queue_delay_us=args.queue_delay_us)
        report = {"machine": f"{os.cpu_count()} CPUs, server and client on one host (loopback)",
                  "bank": {"vectors": len(bank), "backbone": bank.backbone_name}, "images": len(images),
                  "instances": args.instances, "threads": args.threads, "queue_delay_us": args.queue_delay_us,
                  "levels": []}
        server = LocalServer(repo, log_path=Path(tmp) / "tritonserver.log").start(timeout=180)
        try:
            previous = (0, 0)
            for level in args.levels:
                row = asyncio.run(_load_level(server.grpc_url, images, expected, level, args.requests,
                                              args.max_seconds, args.timeout))
                counts = (row.pop("server_inference_count"), row.pop("server_execution_count"))
                inferences, executions = counts[0] - previous[0], counts[1] - previous[1]
                previous = counts
                row["mean_server_batch"] = round(inferences / max(executions, 1), 2)
                report["levels"].append(row)
                print(json.dumps(row), flush=True)
            if args.fault:
                fault = _fault_run(server, images, expected, args.fault_threads, args.fault_requests, kill_after=2.0,
                                   down=1.0, timeout=10.0, retries=3)
                server = fault.pop("_server") or server
                report["fault"] = fault
                print(json.dumps(fault), flush=True)
        finally:
            server.stop()
    levels = report["levels"]
    report["identical_to_inprocess"] = all(r["identical_to_inprocess"] for r in levels)
    for key in ("requests_per_sec", "p50_ms", "p99_ms"):
        report[key] = {str(r["concurrency"]): r[key] for r in levels}
    report["errors"] = sum(r["errors"] for r in levels)
    print("| concurrency | requests | req/s | p50 ms | p99 ms | errors | mean server batch | identical |")
    print("|---|---|---|---|---|---|---|---|")
    for r in levels:
        print(f"| {r['concurrency']} | {r['requests']} | {r['requests_per_sec']} | {r['p50_ms']} | {r['p99_ms']} | "
              f"{r['errors']} | {r['mean_server_batch']} | {r['identical_to_inprocess']} |")
    if "fault" in report:
        f = report["fault"]
        print(f"fault run: {f['ok']} ok, {f['error']} failed with an error, {f['WRONG ANSWER']} wrong answers, "
              f"{f['hung']} hung (bound {f['bound_seconds']} s, slowest {f['max_seconds']} s); killed at "
              f"{f['killed_at_s']} s, ready again at {f['ready_again_at_s']} s")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0 if report["identical_to_inprocess"] and report.get("fault", {}).get("passed", True) else 1


if __name__ == "__main__":
    raise SystemExit(main())
