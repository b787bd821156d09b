"""Benchmark: FAISS search time and memory over ad stores of 100k and 1M vectors, for every --index kind of
evaluate.py (flat, sharded over the memory-mapped store, IVF, HNSW), with the recall of the approximate
indexes against the exact top-k.

The ads are synthetic but clustered like real embeddings (a mixture of 1,000 Gaussian topics, normalised),
written once per size as an fp16 embedding store (the format encode.py writes); the queries are noisy
copies of random ads. Each (size, index) runs in a fresh process; memory is the peak growth of its anonymous
resident memory (sampled every 5 ms; the pages of the memory-mapped store are file-backed and not counted).
Times are medians over --repeats searches of all queries.

    python benchmarks/faiss_search.py                          # 100k and 1M ads, 384-d
    python benchmarks/faiss_search.py --sizes 100000 --kinds flat sharded ivf hnsw --dim 768
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from common.retrieval import IndexSpec, build_index, overlap_at_k, search  # noqa: E402
from common.store import EmbeddingStore, write_store  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--kinds", nargs="+", default=["flat", "sharded", "ivf", "hnsw"])
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--nlist", type=int, default=1024, help="IVF cells (k-means on CPUs is the slow part)")
    parser.add_argument("--hnsw_max_size", type=int, default=100_000, help="HNSW builds take long on CPUs")
    parser.add_argument("--output_dir", default=os.path.join(ROOT, "outputs", "benchmarks", "faiss_search"))
    parser.add_argument("--run", nargs=2, default=None, help=argparse.SUPPRESS)  # size kind, fresh process
    return parser.parse_args(argv)


def anon_mb():
    """Anonymous resident memory (heap: index, chunks, results), without the pages of the memory-mapped store,
    which the kernel can drop at any time."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    return 0.0


class PeakSampler(threading.Thread):
    """Samples anon_mb() every 5 ms until stopped; .peak is the largest value seen."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.running = anon_mb(), True

    def run(self):
        while self.running:
            self.peak = max(self.peak, anon_mb())
            time.sleep(0.005)

    def stop(self):
        self.running = False
        self.join()
        return max(self.peak, anon_mb())


def write_synthetic_store(folder, size, dim, seed=0):
    """A clustered fp16 store of `size` normalised vectors, written chunk by chunk (never whole in memory)."""
    if os.path.exists(os.path.join(folder, "metadata.json")):
        return
    rng = np.random.default_rng(seed)
    topics = rng.standard_normal((1000, dim)).astype(np.float32)

    def vectors(start, stop):
        block = topics[rng.integers(0, 1000, stop - start)]
        block = block + 0.8 * rng.standard_normal((stop - start, dim)).astype(np.float32)
        return block / np.linalg.norm(block, axis=1, keepdims=True)

    metadata = {"kind": "ad", "model_fingerprint": "synthetic", "pooling": "mean", "normalized": True}
    write_store(folder, vectors, [f"ad{i}" for i in range(size)], metadata=metadata, dtype="float16")


def queries_for(store, count, seed=1):
    rng = np.random.default_rng(seed)
    vectors = store.read(rng.integers(0, len(store), count)) + 0.05 * rng.standard_normal((count, store.dim))
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def run_one(args, size, kind):
    """In a fresh process: build, search --repeats times, report times, memory and the top-k rows."""
    store = EmbeddingStore.open(os.path.join(args.output_dir, f"store-{size}"))
    queries = queries_for(store, args.queries)
    before = anon_mb()
    sampler = PeakSampler()
    sampler.start()
    start = time.perf_counter()
    index = build_index(store, spec=IndexSpec(kind=kind, use_gpu=False, nlist=args.nlist))
    build_s = time.perf_counter() - start
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        _, rows = search(index, queries, args.k)
        times.append(time.perf_counter() - start)
    peak = sampler.stop()
    np.save(os.path.join(args.output_dir, f"rows-{size}-{kind}.npy"), rows)
    print(json.dumps({"build_s": build_s, "search_ms_per_query": 1000 * statistics.median(times) / len(queries),
                      "memory_mb": peak - before}))  # fmt: skip


def main(argv=None):
    args = parse_args(argv)
    if args.run:
        return run_one(args, int(args.run[0]), args.run[1])
    os.makedirs(args.output_dir, exist_ok=True)
    table = []
    for size in args.sizes:
        write_synthetic_store(os.path.join(args.output_dir, f"store-{size}"), size, args.dim)
        for kind in args.kinds:
            if kind == "hnsw" and size > args.hnsw_max_size:
                print(f"{size} ads, hnsw: skipped (--hnsw_max_size {args.hnsw_max_size})")
                continue
            command = [sys.executable, __file__, "--run", str(size), kind, "--dim", str(args.dim), "--queries",
                       str(args.queries), "--k", str(args.k), "--repeats", str(args.repeats), "--nlist",
                       str(args.nlist), "--output_dir", args.output_dir]  # fmt: skip
            result = subprocess.run(command, capture_output=True, text=True, check=True)
            row = json.loads(result.stdout.strip().splitlines()[-1])
            exact = np.load(os.path.join(args.output_dir, f"rows-{size}-flat.npy"))
            found = np.load(os.path.join(args.output_dir, f"rows-{size}-{kind}.npy"))
            row |= {"size": size, "kind": kind, "recall@10": overlap_at_k(found, exact, 10),
                    f"recall@{args.k}": overlap_at_k(found, exact, args.k)}  # fmt: skip
            table.append(row)
            print(f"{size} ads, {kind}: {row}", flush=True)
    print(f"\n{args.dim}-d fp16 store, {args.queries} queries, top-{args.k}, CPU ({os.cpu_count()} cores); IVF "
          f"{args.nlist} cells, nprobe 32; HNSW M 32, efSearch 256; "
          f"median of {args.repeats} searches; memory: peak growth of anonymous resident memory (the memory-mapped "
          "store's pages not counted)\n")  # fmt: skip
    print(f"| ads | index | build s | search ms/query | memory MB | recall@10 | recall@{args.k} |")
    print("|---|---|---|---|---|---|---|")
    for row in table:
        print(f"| {row['size']:,} | {row['kind']} | {row['build_s']:.1f} | {row['search_ms_per_query']:.3f} | "
              f"{row['memory_mb']:.0f} | {row['recall@10']:.4f} | {row[f'recall@{args.k}']:.4f} |")  # fmt: skip


if __name__ == "__main__":
    main()
