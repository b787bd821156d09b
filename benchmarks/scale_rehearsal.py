"""Scale rehearsal: memory per rank of the production path, measured on growing ad stores and extrapolated.

On 2 CPU processes (gloo, `accelerate launch`) with a tiny encoder whose head outputs --dim, for ad stores of
--rows x --dim float16 (default 1M, 2M and 4M x 1024), each run a fresh launch of the real script:

- `encode.py` building the ad store (chunks of 65,536 rows, each process its share), and the same build
  SIGKILLed once half its chunks exist, then resumed (the resumed run is the one measured);
- `refine_contrastive.py`, 50 steps against the store (256 random negatives per step);
- `distill_student.py`, 50 steps of L2 + KL over 1,024 of the store's ads per step;
- `evaluate.py --index sharded` (one process: the main process scores), exact search over the memory-mapped
  store chunk by chunk.

Each rank reports its peak resident memory (VmHWM: its own memory plus the touched pages of memory maps) and its
resident memory after imports (the baseline), from a wrapper that runs the script in the rank's process. Then the
teacher cut: a Qwen3-architecture model of about 1.7B parameters with random bf16 weights (written once from a
config, sharded with an index as hub checkpoints are), cut to 4 evenly spaced blocks in fp32, in one process:
its peak above the baseline after imports against the kept weights in fp32.

Last, every figure extrapolated to 47M ads x 4096-d and an 8B teacher (Qwen3-Embedding-8B's shape) on 8 ranks
from the measured per-row slope (1M -> 4M) and the measured cut ratio.

    python benchmarks/scale_rehearsal.py                          # about 40 minutes on 2 cores, 25 GB of disk
    python benchmarks/scale_rehearsal.py --rows 200000 400000 --skip_cut   # a quick look

The tables are printed and written to <work>/table.md.
"""

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Runs a script's main() inside the rank's own process and writes that process's memory figures.
RANK_WRAPPER = """
import json, os, runpy, sys
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
import threading, time
import torch, transformers, accelerate, numpy  # the imports every script makes: the baseline
baseline, anon_baseline = status("VmRSS:"), status("RssAnon:")
peak_anon = [anon_baseline]
def sample():  # the kernel keeps no high-water mark of anonymous memory: sample it
    while True:
        peak_anon[0] = max(peak_anon[0], status("RssAnon:"))
        time.sleep(0.02)
threading.Thread(target=sample, daemon=True).start()
out, script = sys.argv[1], sys.argv[2]
sys.argv = sys.argv[2:]
sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
try:
    runpy.run_path(script, run_name="__main__")
except SystemExit as stop:
    if stop.code not in (0, None):
        raise
finally:
    rank = os.environ.get("RANK", "0")
    with open(f"{out}.rank{rank}.json", "w") as handle:
        peak_anon[0] = max(peak_anon[0], status("RssAnon:"))
        json.dump({"baseline": baseline, "peak": status("VmHWM:"), "anon_baseline": anon_baseline,
                   "peak_anon": peak_anon[0]}, handle)
"""

CUT_PROBE = """
import json, sys
sys.path.insert(0, {root!r})
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
import torch, transformers, accelerate, numpy
from common.encoder import EncoderSpec, evenly_spaced_layers
baseline = status("VmRSS:")
spec = EncoderSpec.read({folder!r})
layers = evenly_spaced_layers(spec.depth, 4)
student = spec.load(dtype="float32", layers=layers)
kept = sum(p.numel() * p.element_size() for p in student.parameters())
print("RESULT", json.dumps({{"baseline": baseline, "peak": status("VmHWM:"), "kept_bytes": kept,
                            "kept_params": sum(p.numel() for p in student.parameters()), "layers": layers}}))
"""


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 2_000_000, 4_000_000])
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--work", default=os.path.join(ROOT, "outputs", "benchmarks", "scale_rehearsal"))
    parser.add_argument("--skip_cut", action="store_true", help="Leave out the 1.7B-parameter teacher cut.")
    parser.add_argument("--skip_stores", action="store_true", help="Only the teacher cut.")
    return parser.parse_args(argv)


def write_models(work, dim):
    """The tiny teacher (BERT, 2 layers of width 32, the real MiniLM vocabulary) with a head to `dim`."""
    from common.encoder import Encoder
    from tests.conftest import make_tiny_bert

    folder = os.path.join(work, "teacher")
    if not os.path.exists(os.path.join(folder, "config.json")):
        encoder = Encoder.from_pretrained(make_tiny_bert(folder + ".base", dropout=0.0))
        encoder.add_projection(dim)
        encoder.save_pretrained(folder)
    return folder


def write_data(work, rows):
    """The ads (parquet), clicks, label-free queries, test queries and judgments of one store size."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = os.path.join(work, f"data-{rows}")
    paths = {name: os.path.join(folder, file) for name, file in (
        ("ads", "ads.parquet"), ("clicks", "clicks.jsonl"), ("queries", "queries.jsonl"),
        ("test", "test_queries.jsonl"), ("qrels", "qrels.tsv"))}  # fmt: skip
    if os.path.exists(paths["qrels"]):
        return paths
    os.makedirs(folder, exist_ok=True)
    writer = None
    for start in range(0, rows, 500_000):
        ids = [f"ad{i:08d}" for i in range(start, min(start + 500_000, rows))]
        texts = [f"ad {i} for a product of kind {i % 977} in shop {i % 131}" for i in range(start, start + len(ids))]
        table = pa.table({"id": ids, "text": texts})
        writer = writer or pq.ParquetWriter(paths["ads"], table.schema)
        writer.write_table(table)
    writer.close()
    rng = np.random.default_rng(0)
    with open(paths["clicks"], "w") as handle:
        for row in rng.integers(rows, size=4000):
            handle.write(json.dumps({"query": f"query about kind {row % 977}", "positive_id": f"ad{row:08d}"}) + "\n")
    with open(paths["queries"], "w") as handle:
        handle.writelines(json.dumps({"query": f"looking for kind {i % 977} in shop {i % 131}"}) + "\n"
                          for i in range(4000))  # fmt: skip
    with open(paths["test"], "w") as handle, open(paths["qrels"], "w") as qrels:
        qrels.write("query_id\tdoc_id\trelevance\n")
        for i, row in enumerate(rng.integers(rows, size=200)):
            handle.write(json.dumps({"id": f"q{i}", "text": f"kind {row % 977} shop {row % 131}"}) + "\n")
            qrels.write(f"q{i}\tad{row:08d}\t1\n")
    return paths


def launch(work, name, script, args, processes=2, kill_when=None):
    """A launch of `script` under the rank wrapper; returns ({rank: figures}, seconds). With `kill_when` (a
    function), every process is SIGKILLed as soon as it returns true (and None is returned)."""
    wrapper = os.path.join(work, "rank_wrapper.py")
    with open(wrapper, "w") as handle:
        handle.write(RANK_WRAPPER)
    out = os.path.join(work, "figures", name)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    for rank in range(processes):
        if os.path.exists(f"{out}.rank{rank}.json"):
            os.remove(f"{out}.rank{rank}.json")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "1",
           "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
    launcher = ["--multi_gpu", "--num_processes", str(processes)] if processes > 1 else ["--num_processes", "1"]
    command = [sys.executable, "-m", "accelerate.commands.launch", *launcher, wrapper, out,
               os.path.join(ROOT, script), *args]  # fmt: skip
    started = time.time()
    log = open(out + ".log", "w")  # noqa: SIM115
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    if kill_when is not None:
        while process.poll() is None and not kill_when():
            time.sleep(0.2)
        # The launcher and its workers (torchrun starts them in sessions of their own), as a preempted job dies.
        import psutil

        for victim in [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                victim.send_signal(signal.SIGKILL)
        process.wait()
        time.sleep(1)
        return None, time.time() - started
    if process.wait() != 0:
        raise SystemExit(f"{name} failed; see {out}.log")
    seconds = time.time() - started
    figures = {}
    for rank in range(processes):
        with open(f"{out}.rank{rank}.json") as handle:
            figures[rank] = json.load(handle)
    return figures, seconds


def store_rows(work, rows, dim, teacher):
    """Every store workload at one size: {workload: ({rank: figures}, seconds)}."""
    paths = write_data(work, rows)
    store = os.path.join(work, f"store-{rows}")
    encode = ["--model_name_or_path", teacher, "--input_file", paths["ads"], "--kind", "ad", "--dtype", "float16",
              "--chunk_rows", "65536", "--encode_batch_size", "512"]  # fmt: skip
    results = {}
    if os.path.exists(os.path.join(store, "metadata.json")):
        import shutil

        shutil.rmtree(store)
    results["build the ad store (encode.py)"] = launch(
        work, f"build-{rows}", "encode.py", [*encode, "--output_dir", store]
    )
    resumed = os.path.join(work, f"store-{rows}-resumed")
    if os.path.exists(resumed):
        import shutil

        shutil.rmtree(resumed)
    chunks = -(-rows // 65536)

    def half_written():
        return os.path.isdir(resumed) and sum(name.startswith("chunk_") and "." not in name
                                              for name in os.listdir(resumed)) >= chunks // 2  # fmt: skip

    launch(work, f"killed-{rows}", "encode.py", [*encode, "--output_dir", resumed], kill_when=half_written)
    results["resume a build killed halfway"] = launch(work, f"resume-{rows}", "encode.py",
                                                      [*encode, "--output_dir", resumed])  # fmt: skip
    stores = os.path.join(work, "stores")
    common = ["--teacher_model", teacher, "--corpus_file", paths["ads"], "--ad_store", store, "--max_train_steps",
              "50", "--logging_steps", "50", "--overwrite_output_dir", "--store_dir", stores]  # fmt: skip
    refine = [*common, "--student_model", teacher, "--train_file", paths["clicks"], "--per_device_train_batch_size",
              "16", "--num_random_negatives", "256", "--output_dir", os.path.join(work, f"refined-{rows}")]  # fmt: skip
    results["refine_contrastive.py, 50 steps"] = launch(work, f"refine-{rows}", "refine_contrastive.py", refine)
    distill = [*common, "--query_file", paths["queries"], "--student_num_layers", "1", "--progressive_from", "none",
               "--num_ranked_ads", "1024", "--per_device_train_batch_size", "16",
               "--output_dir", os.path.join(work, f"student-{rows}")]  # fmt: skip
    name = "distill_student.py (L2 + KL over the ads), 50 steps"
    results[name] = launch(work, f"distill-{rows}", "distill_student.py", distill)
    results["evaluate.py --index sharded (main process)"] = launch(work, f"evaluate-{rows}", "evaluate.py", [
        "--teacher_model", teacher, "--students", f"refined={os.path.join(work, f'refined-{rows}')}",
        "--corpus_file", paths["ads"], "--ad_store", store, "--queries_file", paths["test"], "--qrels_file",
        paths["qrels"], "--index", "sharded", "--latency_queries", "2", "--throughput_queries", "8",
        "--store_dir", os.path.join(work, "stores"), "--output_dir", os.path.join(work, f"eval-{rows}")],
        processes=1)  # fmt: skip
    return results


def write_cut_model(work):
    """A Qwen3 model of ~1.7B parameters (Qwen3-1.7B's shape), random bf16 weights written shard by shard from
    a config (never whole in memory), with the real Qwen vocabulary; written once."""
    import torch
    from safetensors.torch import save_file
    from transformers import Qwen3Config, Qwen3Model

    from tests.conftest import make_real_qwen_tokenizer

    folder = os.path.join(work, "qwen3-1.7b-random")
    if os.path.exists(os.path.join(folder, "model.safetensors.index.json")):
        return folder
    os.makedirs(folder, exist_ok=True)
    tokenizer = make_real_qwen_tokenizer()
    config = Qwen3Config(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                         num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=4096,
                         tie_word_embeddings=True, dtype="bfloat16")  # fmt: skip
    with torch.device("meta"):
        shapes = {name: tensor.shape for name, tensor in Qwen3Model(config).state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    shard, shard_bytes, index, number = {}, 0, {}, 0
    names = list(shapes)
    for position, name in enumerate(names):
        shard[name] = (torch.randn(shapes[name], generator=generator) * 0.02).to(torch.bfloat16)
        shard_bytes += shard[name].numel() * 2
        if shard_bytes >= 1 << 30 or position == len(names) - 1:
            number += 1
            file = f"model-{number:05d}.safetensors"
            save_file(shard, os.path.join(folder, file), metadata={"format": "pt"})
            index.update(dict.fromkeys(shard, file))
            shard, shard_bytes = {}, 0
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as handle:
        json.dump({"metadata": {}, "weight_map": index}, handle)
    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def measure_cut(work):
    folder = write_cut_model(work)
    output = subprocess.run([sys.executable, "-c", CUT_PROBE.format(root=ROOT, folder=folder)], capture_output=True,
                            text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    line = next((line for line in output.stdout.splitlines() if line.startswith("RESULT")), None)
    if line is None:
        raise SystemExit(output.stderr[-3000:])
    return json.loads(line.split(" ", 1)[1])


MB = 2**20


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.work, exist_ok=True)
    lines = []

    def show(text=""):
        print(text, flush=True)
        lines.append(text)

    import platform

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    show(f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; 2 gloo processes; "
         f"commit {commit.stdout.strip()}")  # fmt: skip
    measured = {}
    if not args.skip_stores:
        teacher = write_models(args.work, args.dim)
        for rows in args.rows:
            measured[rows] = store_rows(args.work, rows, args.dim, teacher)
        slopes = {}
        for measure, title in (("peak_anon", "memory the rank owns (peak RssAnon, sampled every 20 ms)"),
                               ("peak", "resident memory with the store's mapped page cache (VmHWM)")):  # fmt: skip
            show()
            show(f"Peak {title} per rank, MB above the rank's baseline after imports (max over ranks; seconds)")
            show()
            show("| workload | " + " | ".join(f"{rows / 1e6:g}M rows" for rows in args.rows) + " | slope, bytes/row |")
            show("|" + "---|" * (len(args.rows) + 2))
            base = "anon_baseline" if measure == "peak_anon" else "baseline"
            for workload in measured[args.rows[0]]:
                cells, peaks = [], []
                for rows in args.rows:
                    figures, seconds = measured[rows][workload]
                    peak = max(f[measure] - f[base] for f in figures.values())
                    peaks.append(peak)
                    cells.append(f"{peak / MB:,.0f} ({seconds:.0f} s)")
                slope = (peaks[-1] - peaks[0]) / max(args.rows[-1] - args.rows[0], 1)
                if measure == "peak_anon":
                    slopes[workload] = (peaks[-1], slope)
                show(f"| {workload} | " + " | ".join(cells) + f" | {slope:.1f} |")
        show()
        show(f"A row of the store is {args.dim * 2} bytes of float16 vectors. Mapped page cache is the kernel's, "
             "shared "
             "and reclaimable: a read maps what it touches (and fault-around maps cached neighbours), so VmHWM follows "
             "the store once it is in the page cache, while the memory a rank owns should not.")  # fmt: skip
        show()
        show("Extrapolated to 47M ads x 4096-d float16 (385 GB store) on 8 ranks, memory each rank owns: the largest "
             "measured peak plus the slope x the rows beyond it (per row: id and index arrays grow with rows; a chunk "
             "of vectors is ~256 MB at any width)")  # fmt: skip
        show()
        show("| workload | extrapolated peak per rank, GB |")
        show("|---|---|")
        for workload, (peak, slope) in slopes.items():
            show(f"| {workload} | {(peak + max(slope, 0) * (47e6 - args.rows[-1])) / 2**30:.2f} |")
    if not args.skip_cut:
        cut = measure_cut(args.work)
        above = cut["peak"] - cut["baseline"]
        ratio = above / cut["kept_bytes"]
        show()
        show("Teacher cut: Qwen3 of 1.72B parameters (random bf16, sharded with an index) cut to 4 blocks in fp32")
        show()
        show("| kept blocks | kept parameters | kept fp32 MB | peak above baseline MB | ratio |")
        show("|---|---|---|---|---|")
        kept_mb, above_mb = cut["kept_bytes"] / MB, above / MB
        show(f"| {cut['layers']} | {cut['kept_params'] / 1e6:,.0f}M | {kept_mb:,.0f} | {above_mb:,.0f} | {ratio:.2f} |")
        # Qwen3-Embedding-8B: hidden 4096, 36 layers, FFN 12288, 32 query / 8 key-value heads of 128, vocab 151,665.
        embed, block = 151_665 * 4096, 4096 * 4096 * 2 + 2 * 4096 * 1024 + 3 * 4096 * 12288 + 3 * 4096
        kept8b = (embed + 4 * block + 4096) * 4
        show()
        show(f"Extrapolated: a 4-block student cut from Qwen3-Embedding-8B keeps {(embed + 4 * block) / 1e9:.2f}B "
             f"parameters ({kept8b / 2**30:.1f} GB in fp32): peak ~{ratio * kept8b / 2**30:.1f} GB per rank at the "
             f"measured ratio, against ~48 GB before (the whole teacher in bf16 to check stores, then in fp32 to "
             "cut it).")  # fmt: skip
    with open(os.path.join(args.work, "table.md"), "w") as handle:
        handle.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
