"""Scaling: a bank larger than memory searched through an on-disk IVF-PQ index (build time, recall@K against exact
search, ms per query, process memory), the in-memory comparison of IVF with exact Flat, and RSS over a long image
stream.

    python bench/scaling.py [--vectors 10000000] [--dim 208] [--index IVF4096,PQ52] [--nprobe 4 16 64 256]
                            [--refine 0 8] [--data DIR] [--keep-data] [--in-memory] [--stream 0] [--json FILE]

On-disk part (the default): the synthetic vectors are generated a block at a time straight into DIR/vectors.npy
(never whole in memory), clustered like a real bank (vectors around --centres unit centres, L2-normalised: uniform
random vectors have no neighbours worth the name). In a fresh process, engine.ivf.build_ondisk_index trains the
index on Config.index_train_size sampled vectors, fills it shard by shard (--shard-rows vectors a shard, each written
to disk) and merges the shards' inverted lists into one on-disk file; in another fresh process the index is loaded
memory-mapped (engine.search.open_ondisk_index, the engine's search face, given the memory-mapped vectors for the
exact re-rank) and searched at each --nprobe and each --refine (Config.refine: a shortlist of refine x K PQ
candidates rescored exactly from the vectors; 0 = the codes' own top K): a first batch with the vectors' pages
dropped from the page cache (posix_fadvise DONTNEED: read from disk, as a bank larger than memory), then the same
batch 3 times and --single queries one at a time (their pages cached). Exact top-K (K = Config().top_k) comes from
streaming the vector file in blocks. Memory is read from /proc/self/status of
each process: VmHWM (peak resident), RssAnon (the process's own memory) and RssFile (pages of mapped files, which the
kernel can drop at will). DIR and everything in it are deleted afterwards unless --keep-data.

--in-memory: the previous bench, a synthetic bank of --vectors vectors in memory, exact Flat vs IVF vs torch top-K.
--stream N runs Engine.segment_stream over voc2012-mini images cycled to N images (ground-truth proposals, the
bench's ground-truth bank) and samples RSS after every result.
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # after site-packages: an installed engine (with its compiled _C) wins

from engine import Config  # noqa: E402
from engine.ivf import make_faiss_index as make_index  # noqa: E402
from engine.topk import top_k  # noqa: E402

BLOCK = 1 << 16  # rows generated, written and scanned at a time


def synthetic_blocks(count: int, dim: int, centres: int, seed: int = 0):
    """The synthetic bank a block of rows at a time: each vector a random centre plus Gaussian noise, L2-normalised."""
    rng = np.random.default_rng(seed)
    middle = rng.standard_normal((centres, dim), dtype=np.float32)
    middle /= np.linalg.norm(middle, axis=1, keepdims=True)
    for start in range(0, count, BLOCK):  # in blocks: no count x dim float64 temporaries
        n = min(BLOCK, count - start)
        block = middle[rng.integers(0, centres, n)] + 0.35 * rng.standard_normal((n, dim), dtype=np.float32) / np.sqrt(dim)
        yield block / np.linalg.norm(block, axis=1, keepdims=True)


def synthetic_bank(count: int, dim: int, centres: int, seed: int = 0) -> np.ndarray:
    vectors = np.empty((count, dim), np.float32)
    for start, block in zip(range(0, count, BLOCK), synthetic_blocks(count, dim, centres, seed)):
        vectors[start:start + len(block)] = block
    return vectors


def queries_near(vectors: np.ndarray, count: int, seed: int = 1) -> np.ndarray:
    """Queries: bank vectors (random rows) plus the bank's own noise, L2-normalised."""
    rng = np.random.default_rng(seed)
    dim = vectors.shape[1]
    queries = vectors[np.sort(rng.integers(0, len(vectors), count))] + \
        0.35 * rng.standard_normal((count, dim), dtype=np.float32) / np.sqrt(dim)
    return (queries / np.linalg.norm(queries, axis=1, keepdims=True)).astype(np.float32)


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Fraction of the exact top-K rows that the approximate search also returned."""
    hits = sum(len(np.intersect1d(f[f >= 0], t)) for f, t in zip(found, truth))
    return hits / truth.size


def memory() -> dict:
    """This process's memory (MB) from /proc/self/status: peak resident (VmHWM), now resident (VmRSS), its own
    (RssAnon) and mapped files' pages (RssFile)."""
    fields = {"VmHWM": "peak_mb", "VmRSS": "rss_mb", "RssAnon": "anon_mb", "RssFile": "file_mb"}
    out = {}
    with open("/proc/self/status") as status:
        for line in status:
            key = line.split(":")[0]
            if key in fields:
                out[fields[key]] = int(line.split()[1]) / 1024
    return out


# ------------------------------------------------------------------------------------------------ on disk (IVF-PQ)


def write_vectors(path: Path, count: int, dim: int, centres: int) -> None:
    """DIR/vectors.npy written a block at a time with plain writes (no mapping: the pages are not this process's)."""
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False,
              "shape": (count, dim)}
    with open(path, "wb") as handle:
        np.lib.format.write_array_header_2_0(handle, header)
        for block in synthetic_blocks(count, dim, centres):
            handle.write(np.ascontiguousarray(block, np.float32).tobytes())


def exact_top_k(path: Path, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k rows of `queries` over the .npy at `path`, read a block at a time (plain reads, no mapping)."""
    mapped = np.load(path, mmap_mode="r")  # for the shape and the data offset only
    count, dim, offset = mapped.shape[0], mapped.shape[1], mapped.offset
    del mapped
    best_sims, best_rows = np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
    with open(path, "rb") as handle:
        handle.seek(offset)
        for start in range(0, count, BLOCK):
            n = min(BLOCK, count - start)
            block = np.fromfile(handle, np.float32, n * dim).reshape(n, dim)
            sims, rows = top_k(queries @ block.T, k)  # equal scores: lowest row first
            best_sims, best_rows = top_k(np.concatenate([best_sims, sims], 1), k,
                                         np.concatenate([best_rows, rows + start], 1))
    return best_sims, best_rows


def drop_from_page_cache(path) -> None:
    """Drop a file's pages from the page cache (those no process maps), as if it had not been read since boot."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(descriptor)


def build_stage(vectors_path: str, index_path: str, config: dict, shard_rows: int) -> dict:
    """In a fresh process: build the on-disk index from the memory-mapped vectors; stage times and memory."""
    from engine.ivf import build_ondisk_index

    times = {}
    vectors = np.load(vectors_path, mmap_mode="r")
    build_ondisk_index(vectors, Config(**config), index_path, shard_rows,
                       progress=lambda stage, seconds: times.__setitem__(stage, seconds))
    return {"seconds": times, "memory": memory()}


def serve_stage(index_path: str, labels_path: str, vectors_path: str, queries: np.ndarray, truth: np.ndarray,
                config: dict, nprobes: list[int], refines: list[int], single: int) -> dict:
    """In a fresh process: load the on-disk index and the vectors (both memory-mapped) behind the engine's search
    face and search at each (nprobe, refine)."""
    from engine.search import FaissIndex, open_ondisk_index

    report = {"memory_before_load": memory()}
    start = time.perf_counter()
    labels = np.load(labels_path)
    vectors = np.load(vectors_path, mmap_mode="r")
    index = open_ondisk_index(index_path, labels, int(labels.max()) + 1, Config(**config), vectors=vectors)
    report["load_s"] = time.perf_counter() - start
    report["memory_after_load"] = memory()
    report["backend"] = index.describe()
    k = truth.shape[1]
    rows = []
    face = None
    for nprobe, refine in itertools.product(nprobes, refines):
        del face  # its mapping of the vectors with it, so that their pages can be dropped
        drop_from_page_cache(vectors_path)  # the first batch reads the vectors from disk, as a bank larger than memory
        face = FaissIndex(vectors, index.labels, index.num_classes,
                          Config(**{**config, "nprobe": nprobe, "refine": refine}), index.index)
        cold = time.perf_counter()
        _, found = face.search(queries, k)
        cold = time.perf_counter() - cold
        batch = []
        for _ in range(3):
            start = time.perf_counter()
            face.search(queries, k)
            batch.append(time.perf_counter() - start)
        one = []
        for query in queries[:single]:
            start = time.perf_counter()
            face.search(query[None], k)
            one.append(time.perf_counter() - start)
        rows.append({"nprobe": nprobe, "refine": refine, "recall": recall_at_k(found, truth),
                     "top1_in_k": float(np.mean([t[0] in f for f, t in zip(found, truth)])),
                     "batch_ms_per_query": 1000 * float(np.median(batch)) / len(queries),
                     "first_batch_ms_per_query": 1000 * cold / len(queries),
                     "single_query_ms": 1000 * float(np.median(one)), "memory": memory()})
    report["rows"] = rows
    report["memory_after_search"] = memory()
    return report


def ondisk_scaling(args) -> dict:
    k = Config().top_k
    data = Path(args.data)
    data.mkdir(parents=True, exist_ok=True)
    vectors_path, labels_path, index_path = data / "vectors.npy", data / "labels.npy", data / "index.faiss"
    config = {"index": args.index, "nprobe": args.nprobe[0], "index_train_size": args.train_sample}
    report = {"vectors": args.vectors, "dim": args.dim, "centres": args.centres, "index": args.index, "k": k,
              "nprobe": args.nprobe, "refine": args.refine,
              "queries": args.queries, "train_sample": args.train_sample, "shard_rows": args.shard_rows,
              "cpu_count": os.cpu_count()}
    spawn = multiprocessing.get_context("spawn")  # fresh processes: each stage's peak memory is its own
    try:
        start = time.perf_counter()
        write_vectors(vectors_path, args.vectors, args.dim, args.centres)
        # labels as a bank would have them (21 classes), to show row ids -> labels through the engine's face
        np.save(labels_path, (np.arange(args.vectors) % 21).astype(np.int32))
        report["generate_s"] = time.perf_counter() - start
        report["vectors_gb"] = vectors_path.stat().st_size / 1e9
        print(f"{args.vectors:,} x {args.dim} float32 vectors written to {vectors_path} "
              f"({report['vectors_gb']:.1f} GB, {report['generate_s']:.0f} s)", flush=True)

        with spawn.Pool(1) as pool:
            report["build"] = pool.apply(build_stage, (str(vectors_path), str(index_path), config, args.shard_rows))
        seconds = report["build"]["seconds"]
        report["index_mb"] = index_path.stat().st_size / 1e6
        report["ivfdata_mb"] = index_path.with_suffix(".ivfdata").stat().st_size / 1e6
        print(f"{args.index}: train {seconds['train']:.0f} s, add {seconds['add']:.0f} s, merge "
              f"{seconds['merge']:.0f} s; index {report['index_mb']:.1f} MB + lists {report['ivfdata_mb']:.0f} MB; "
              f"build peak RSS {report['build']['memory']['peak_mb']:.0f} MB", flush=True)

        start = time.perf_counter()
        queries = queries_near(np.load(vectors_path, mmap_mode="r"), args.queries)
        _, truth = exact_top_k(vectors_path, queries, k)
        report["exact_s"] = time.perf_counter() - start
        print(f"exact top-{k} of {args.queries} queries by streaming the vectors: {report['exact_s']:.0f} s", flush=True)

        with spawn.Pool(1) as pool:
            report["serve"] = pool.apply(serve_stage, (str(index_path), str(labels_path), str(vectors_path), queries,
                                                       truth, config, args.nprobe, args.refine, args.single))
    finally:
        if not args.keep_data:
            shutil.rmtree(data, ignore_errors=True)
    serve = report["serve"]
    after = serve["memory_after_load"]
    print(f"loaded in {serve['load_s']:.2f} s ({serve['backend']}): RSS {after['rss_mb']:.0f} MB "
          f"(own {after['anon_mb']:.0f} MB, mapped files {after['file_mb']:.0f} MB)")
    print(f"| nprobe | refine | recall@{k} | top-1 in {k} | ms/query (batch of {args.queries}) | "
          f"ms/query (first batch, vectors uncached) | ms (one query) | RSS MB (own + mapped) |")
    print("|---|---|---|---|---|---|---|---|")
    for row in serve["rows"]:
        print(f"| {row['nprobe']} | {row['refine']} | {row['recall']:.3f} | {row['top1_in_k']:.3f} | "
              f"{row['batch_ms_per_query']:.3f} | "
              f"{row['first_batch_ms_per_query']:.3f} | {row['single_query_ms']:.3f} | "
              f"{row['memory']['anon_mb']:.0f} + {row['memory']['file_mb']:.0f} |")
    print(f"peak RSS: build {report['build']['memory']['peak_mb']:.0f} MB, serve {serve['memory_after_search']['peak_mb']:.0f} MB")
    return report


# ------------------------------------------------------------------------------------------- in memory (Flat, IVF)


def in_memory_scaling(args) -> dict:
    import faiss
    import torch

    from engine.topk import topk_inner_product

    t = time.perf_counter()
    vectors = synthetic_bank(args.vectors, args.dim, args.centres)
    queries = queries_near(vectors, args.queries)
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
    parser.add_argument("--vectors", type=int, help="bank size (default 10,000,000 on disk, 1,048,576 in memory)")
    parser.add_argument("--dim", type=int, default=208,
                        help="vector width (208: one backbone layer; the 680-d default bank is 3.3x the disk and time)")
    parser.add_argument("--centres", type=int, default=16384)
    parser.add_argument("--queries", type=int, default=200, help="one batch of queries (a few images' proposals)")
    parser.add_argument("--index", help="factory string (default IVF4096,PQ52 on disk, IVF4096,Flat in memory)")
    parser.add_argument("--nprobe", type=int, nargs="+", help="default 4 16 64 256 on disk, 1 4 16 64 in memory")
    parser.add_argument("--refine", type=int, nargs="+",
                        help=f"Config.refine values searched at each nprobe (on disk; 0 = no re-rank; default 0 and "
                             f"Config's {Config().refine})")
    parser.add_argument("--train-sample", type=int, help="train on this many vectors (Config.index_train_size; "
                        "default Config's on disk, all in memory)")
    parser.add_argument("--shard-rows", type=int, default=1 << 20, help="vectors per shard (on disk)")
    parser.add_argument("--single", type=int, default=50, help="queries timed one at a time (on disk)")
    parser.add_argument("--data", type=Path, default=Path("/tmp/moduseg-scaling"),
                        help="where the on-disk vectors and index go (deleted afterwards unless --keep-data)")
    parser.add_argument("--keep-data", action="store_true")
    parser.add_argument("--in-memory", action="store_true", help="the in-memory Flat vs IVF bench instead")
    parser.add_argument("--k", type=int, default=25, help="K of the in-memory bench (on disk: Config().top_k)")
    parser.add_argument("--stream", type=int, default=0, help="images in the RSS stream (0 skips it)")
    parser.add_argument("--no-search", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.in_memory:
        args.vectors = args.vectors or 1 << 20
        args.index = args.index or "IVF4096,Flat"
        args.nprobe = args.nprobe or [1, 4, 16, 64]
        args.train_sample = args.train_sample or 0
    else:
        args.vectors = args.vectors or 10_000_000
        args.index = args.index or "IVF4096,PQ52"
        args.nprobe = args.nprobe or [4, 16, 64, 256]
        args.refine = args.refine or [0, Config().refine]
        if min(args.refine) < 0:
            parser.error("--refine values must be >= 0")
        args.train_sample = args.train_sample or Config().index_train_size
    report = {}
    if not args.no_search:
        report["search"] = in_memory_scaling(args) if args.in_memory else ondisk_scaling(args)
    if args.stream:
        report["stream"] = stream_memory(args)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
