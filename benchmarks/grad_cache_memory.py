"""Benchmark: peak memory and time per optimiser step of train_teacher.py on a large contrastive batch, plain
and with gradient caching (--grad_cache_chunk_size), on the embedded default (all-MiniLM-L6-v2, the demo clicks).

Each run is a fresh process (`python train_teacher.py ...`) whose peak resident memory is read from the kernel
when it ends (getrusage of the children of a fresh wrapper process); time per step is the run's training
time over its steps, the first step included. Contenders alternate over --repeats rounds; the table gives
medians. On a GPU the same comparison is about GPU memory (activations live there); on CPU they live in RAM.

    python benchmarks/grad_cache_memory.py                       # a 512-pair batch, chunks of 64 and 128 rows
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WRAPPER = """
import resource, subprocess, sys
code = subprocess.run(sys.argv[1:]).returncode
print("PEAK_KB", resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, "CODE", code)
"""


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--pairs", type=int, default=512, help="Queries per batch (each with a positive and negatives)."
    )
    parser.add_argument("--num_hard_negatives", type=int, default=1)
    parser.add_argument("--chunk_sizes", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    return parser.parse_args(argv)


def run(args, chunk_size, folder):
    output = os.path.join(folder, f"run-{chunk_size or 'plain'}")
    command = [sys.executable, "train_teacher.py", "--per_device_train_batch_size", str(args.pairs),
               "--num_hard_negatives", str(args.num_hard_negatives), "--max_train_steps", str(args.steps),
               "--num_warmup_steps", "0", "--output_dir", output, "--overwrite_output_dir",
               "--logging_steps", "1"]  # fmt: skip
    if chunk_size:
        command += ["--grad_cache_chunk_size", str(chunk_size)]
    result = subprocess.run([sys.executable, "-c", WRAPPER, *command], cwd=ROOT, capture_output=True, text=True)
    line = next(line for line in result.stdout.splitlines() if line.startswith("PEAK_KB"))
    peak_kb, code = int(line.split()[1]), int(line.split()[3])
    if code != 0:
        raise SystemExit(result.stderr[-2000:])
    with open(os.path.join(output, "all_results.json"), encoding="utf-8") as handle:
        results = json.load(handle)
    return peak_kb / 1024, results["train_runtime"] / results["steps"], results["train_loss"]


def main(argv=None):
    args = parse_args(argv)
    contenders = [None, *args.chunk_sizes]
    measured = {chunk: [] for chunk in contenders}
    with tempfile.TemporaryDirectory() as folder:
        for _ in range(args.repeats):
            for chunk in contenders:
                measured[chunk].append(run(args, chunk, folder))
                peak, seconds, loss = measured[chunk][-1]
                print(
                    f"chunk {chunk or 'plain'}: peak {peak:.0f} MB, {seconds:.2f} s/step, loss {loss:.5f}", flush=True
                )
    rows = args.pairs * (2 + args.num_hard_negatives)
    print(f"\n{args.pairs} pairs x (query, positive, {args.num_hard_negatives} negative) = {rows} rows per step, "
          f"CPU, median of {args.repeats}\n")  # fmt: skip
    print("| run | peak resident MB | s / step | loss (last step) |\n|---|---|---|---|")
    for chunk in contenders:
        peak = statistics.median(value[0] for value in measured[chunk])
        seconds = statistics.median(value[1] for value in measured[chunk])
        name = "plain batch" if chunk is None else f"--grad_cache_chunk_size {chunk}"
        print(f"| {name} | {peak:.0f} | {seconds:.2f} | {measured[chunk][-1][2]:.5f} |")


if __name__ == "__main__":
    main()
