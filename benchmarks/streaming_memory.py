"""Benchmark: phase 2 on a growing stream of label-free queries, streamed against held whole.

A synthetic stream of --rows label-free queries (default 100k and 1M; words of the demo's sponsored-search
world plus a number, so nearly all are distinct), written as 8 local jsonl shards, goes through a tiny teacher
(BERT, 2 layers of width 64, the real MiniLM vocabulary) and its 1-layer student on CPU, one epoch each:

- `encode.py --streaming`: the teacher's chunked store (chunks of 50k rows, Bloom-filter dedupe on);
- `distill_student.py --streaming` from that store;
- `distill_student.py --streaming --teacher_in_loop` (no store; the teacher encodes each batch);
- `distill_student.py` without --streaming (every text read, the store built in one piece) for contrast.

Each run is a fresh process; its peak resident memory is read from the kernel when it ends (getrusage of the
children of a wrapper process). The table gives rows per second (wall time of the whole process, start-up and
reading included) and peak resident MB; flat memory means the 1M row matches the 100k row.

    python benchmarks/streaming_memory.py                  # about 15 minutes on 2 CPU cores
    python benchmarks/streaming_memory.py --rows 100000    # one size
"""

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from common.demo_data import INTENTS, PRODUCTS, SYLLABLES  # noqa: E402

WRAPPER = """
import resource, subprocess, sys
result = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
print("PEAK_KB", resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, "CODE", result.returncode)
sys.stderr.write(result.stderr[-3000:])
"""


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--batch_size", type=int, default=512)
    parser.add_argument("--skip_in_memory", action="store_true", help="Leave out the non-streaming contrast.")
    return parser.parse_args(argv)


def write_stream(folder, rows, shards=8, seed=0):
    """`rows` synthetic queries in `shards` jsonl files, and all of them in <folder>.jsonl (the in-memory path
    reads one file)."""
    rng = random.Random(seed)
    phrases = [phrase for intent in INTENTS.values() for phrase in intent["query"]]
    names = [name for synonyms in PRODUCTS.values() for name in synonyms]
    os.makedirs(folder, exist_ok=True)
    paths = [os.path.join(folder, f"part-{i:02d}.jsonl") for i in range(shards)] + [folder + ".jsonl"]
    handles = [open(path, "w", encoding="utf-8") for path in paths]  # noqa: SIM115
    for row in range(rows):
        query = rng.choice(phrases).format(p=rng.choice(names))
        line = json.dumps({"query": f"{query} {rng.choice(SYLLABLES)}{rng.choice(SYLLABLES)} {rng.randrange(10_000)}"})
        handles[row % shards].write(line + "\n")
        handles[-1].write(line + "\n")
    for handle in handles:
        handle.close()


def tiny_teacher(folder):
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from common.demo_data import demo_base_model
    from common.encoder import Encoder, EncoderConfig

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(demo_base_model())
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=128)  # fmt: skip
    encoder = Encoder(BertModel(config), tokenizer, EncoderConfig(pooling="mean", max_length=32, base_model="tiny"))
    encoder.save_pretrained(folder)
    return folder


def measure(command):
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", WRAPPER, *command], cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    line = next(line for line in result.stdout.splitlines() if line.startswith("PEAK_KB"))
    peak_kb, code = int(line.split()[1]), int(line.split()[3])
    if code != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return seconds, peak_kb / 1024


def main(argv=None):
    args = parse_args(argv)
    table = []
    with tempfile.TemporaryDirectory() as root:
        teacher = tiny_teacher(os.path.join(root, "teacher"))
        for rows in args.rows:
            data, stores = os.path.join(root, f"queries-{rows}"), os.path.join(root, f"stores-{rows}")
            write_stream(data, rows)
            common = ["--query_file", data, "--teacher_model", teacher, "--student_num_layers", "1",
                      "--per_device_train_batch_size", str(args.batch_size), "--num_train_epochs", "1",
                      "--progressive_from", "none", "--store_dir", stores, "--encode_batch_size", "512"]  # fmt: skip
            stream = ["--streaming", "--chunk_rows", "50000", "--dedupe_capacity", str(rows)]
            runs = {
                "encode.py --streaming": [
                    "encode.py", "--model_name_or_path", teacher, "--input_file", data, "--kind", "query",
                    "--text_column", "query", "--store_dir", stores, "--encode_batch_size", "512", *stream,
                ],
                "distill_student.py --streaming (chunked store)": [
                    "distill_student.py", *common, *stream, "--output_dir", os.path.join(root, f"s-{rows}-store"),
                ],
                "distill_student.py --streaming --teacher_in_loop": [
                    "distill_student.py", *common, *stream, "--teacher_in_loop", "--shuffle_buffer", "10000",
                    "--max_train_steps", str(rows // args.batch_size),
                    "--output_dir", os.path.join(root, f"s-{rows}-loop"),
                ],
            }  # fmt: skip
            if not args.skip_in_memory:
                runs["distill_student.py (in memory, for contrast)"] = [
                    "distill_student.py", *common, "--query_file", data + ".jsonl",
                    "--output_dir", os.path.join(root, f"s-{rows}-memory"),
                ]  # fmt: skip
            for name, command in runs.items():
                seconds, peak = measure([sys.executable, *command])
                table.append((rows, name, seconds, rows / seconds, peak))
                if name.startswith("encode.py"):
                    size = sum(
                        os.path.getsize(os.path.join(path, f)) for path, _, files in os.walk(stores) for f in files
                    )
                    print(f"chunked store: {size / rows:.0f} bytes per row (64-d float32 vectors and the texts)")
                print(f"{rows} rows, {name}: {seconds:.1f} s, {rows / seconds:.0f} rows/s, peak {peak:.0f} MB",
                      flush=True)  # fmt: skip
    print("\nCPU, tiny teacher (2 x 64-d BERT layers) and 1-layer student; one epoch; wall time of each process\n")
    print("| rows | run | s | rows/s | peak resident MB |\n|---|---|---|---|---|")
    for rows, name, seconds, rate, peak in table:
        print(f"| {rows:,} | {name} | {seconds:.1f} | {rate:,.0f} | {peak:,.0f} |")


if __name__ == "__main__":
    main()
