"""Peak resident memory of the training scripts against a large teacher ad store (memory-mapped shards).

Builds a synthetic store of --rows x --dim float16 vectors in --shards shards (random unit vectors, ids
`ad0000000`...), with the ads corpus and clicks that go with it, and a tiny student whose projection head
outputs --dim. Then measures, each in a fresh process (peak RSS = the kernel's VmHWM, which also counts
the pages of the memory maps that were touched; anonymous RSS = memory that is the process's own):

- `import`: the interpreter with torch, transformers, accelerate and the scripts imported (the floor);
- `read 100k random rows`: EmbeddingStore.open + read of 100,000 random rows in one call;
- `read 100k rows, 1k per step`: the same rows in 100 reads of 1,000, as the training steps read them;
- `refine_contrastive.py, 50 steps`: a real phase-3 run (batch 32, 256 random negatives per step);
- `whole store in RAM (reference)`: what the scripts did before: the shards concatenated into one float32 array.

    python benchmarks/store_memory.py                 # 2M x 1024 float16 in 4 shards (4 GB on disk)
    python benchmarks/store_memory.py --rows 200000   # a quick look

The table is printed and written to outputs/benchmarks/store_memory/table.md.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

PROBE = """
import os, sys, time
sys.path.insert(0, {root!r})
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
start = time.perf_counter()
import numpy as np
import refine_contrastive
from common.store import EmbeddingStore
{body}
print("RESULT", status("VmHWM:"), status("RssAnon:"), time.perf_counter() - start)
"""

WORKLOADS = {
    "import": "",
    "read 100k random rows": """
store = EmbeddingStore.open({store!r})
rows = np.random.default_rng(0).integers(len(store), size=100_000)
vectors = store.read(rows)
""",
    "read 100k rows, 1k per step": """
store = EmbeddingStore.open({store!r})
rows = np.random.default_rng(0).integers(len(store), size=100_000)
for start in range(0, len(rows), 1000):
    vectors = store.read(rows[start:start + 1000])
""",
    "refine_contrastive.py, 50 steps": """
refine_contrastive.main([
    "--student_model", {model!r}, "--teacher_model", {model!r}, "--corpus_file", {corpus!r},
    "--ad_store", {store!r}, "--train_file", {clicks!r}, "--output_dir", {output!r}, "--overwrite_output_dir",
    "--per_device_train_batch_size", "32", "--num_random_negatives", "256", "--max_train_steps", "50",
    "--logging_steps", "50",
])
""",
    "whole store in RAM (reference)": """
store = EmbeddingStore.open({store!r})
vectors = np.concatenate([np.asarray(shard, dtype=np.float32) for shard in store.shards])
""",
}


def build_inputs(args, work):
    """The store, corpus, clicks and model; reused when they already exist for the same sizes."""
    import numpy as np

    from common.data import data_fingerprint
    from common.encoder import Encoder
    from common.store import finish_store, write_shard
    from tests.conftest import make_tiny_bert

    paths = {name: os.path.join(work, name) for name in ("model", "store", "corpus.jsonl", "clicks.jsonl")}
    paths["corpus"], paths["clicks"] = paths.pop("corpus.jsonl"), paths.pop("clicks.jsonl")
    stamp = os.path.join(work, "inputs.json")
    wanted = {"rows": args.rows, "dim": args.dim, "shards": args.shards}
    if os.path.exists(stamp) and json.loads(Path(stamp).read_text()) == wanted:
        return paths
    os.makedirs(work, exist_ok=True)
    model = make_tiny_bert(paths["model"] + ".base")
    encoder = Encoder.from_pretrained(model)
    encoder.add_projection(args.dim)
    encoder.save_pretrained(paths["model"])
    fingerprint = Encoder.from_pretrained(paths["model"]).fingerprint

    ids = [f"ad{i:07d}" for i in range(args.rows)]
    texts = [f"ad number {i} for a product of kind {i % 977}" for i in range(args.rows)]
    with open(paths["corpus"], "w") as handle:
        handle.writelines(json.dumps({"id": i, "text": t}) + "\n" for i, t in zip(ids, texts))
    generator = np.random.default_rng(0)
    with open(paths["clicks"], "w") as handle:
        for row in generator.integers(args.rows, size=4000):
            handle.write(json.dumps({"query": f"query about kind {row % 977}", "positive_id": ids[row]}) + "\n")

    partial = paths["store"] + ".partial"
    os.makedirs(partial, exist_ok=True)
    bounds = np.linspace(0, args.rows, args.shards + 1).astype(int)
    for rank in range(args.shards):
        count = bounds[rank + 1] - bounds[rank]
        vectors = generator.standard_normal((count, args.dim), dtype=np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        write_shard(partial, rank, args.shards, vectors, ids[bounds[rank] : bounds[rank + 1]], "float16")
        del vectors
    metadata = {"kind": "ad", "dim": args.dim, "dtype": "float16", "normalized": True, "model": "synthetic",
                "model_fingerprint": fingerprint, "data_fingerprint": data_fingerprint(ids, texts)}  # fmt: skip
    finish_store(partial, paths["store"], metadata, np.diff(bounds).tolist())
    with open(stamp, "w") as handle:
        json.dump(wanted, handle)
    return paths


def drop_page_cache_of(folder):
    """Ask the kernel to forget the store's cached pages, so every run reads from disk alike (best effort)."""
    for name in os.listdir(folder):
        with open(os.path.join(folder, name), "rb") as handle:
            os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--work_dir", default=os.path.join(ROOT, "outputs", "benchmarks", "store_memory"))
    parser.add_argument("--skip_reference", action="store_true", help="Skip loading the whole store.")
    args = parser.parse_args()
    paths = build_inputs(args, os.path.join(args.work_dir, f"{args.rows}x{args.dim}"))
    store_bytes = sum(
        os.path.getsize(os.path.join(paths["store"], name))
        for name in os.listdir(paths["store"])
        if name.startswith("vectors")
    )
    rows = []
    for name, body in WORKLOADS.items():
        if args.skip_reference and "reference" in name:
            continue
        drop_page_cache_of(paths["store"])
        code = PROBE.format(root=ROOT, body=body.format(output=os.path.join(args.work_dir, "refined"), **paths))
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        started = time.perf_counter()
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
        if result.returncode:
            raise SystemExit(f"{name} failed:\n{result.stderr[-3000:]}")
        peak, anon, seconds = next(line for line in result.stdout.splitlines() if line.startswith("RESULT")).split()[1:]
        rows.append((name, int(peak), int(anon), time.perf_counter() - started))
    floor = rows[0][1]
    lines = [
        f"Store: {args.rows:,} x {args.dim} float16 in {args.shards} shards ({store_bytes / 2**30:.2f} GiB on disk; "
        f"{args.rows * args.dim * 4 / 2**30:.2f} GiB as float32).",
        "",
        "| workload | peak RSS (GiB) | peak above import (GiB) | anonymous RSS at end (GiB) | wall s |",
        "|---|---|---|---|---|",
    ]
    for name, peak, anon, seconds in rows:
        lines.append(
            f"| {name} | {peak / 2**30:.2f} | {(peak - floor) / 2**30:.2f} | {anon / 2**30:.2f} | {seconds:.0f} |"
        )
    table = "\n".join(lines)
    print(table)
    os.makedirs(args.work_dir, exist_ok=True)
    with open(os.path.join(args.work_dir, "table.md"), "w") as handle:
        handle.write(table + "\n")


if __name__ == "__main__":
    main()
