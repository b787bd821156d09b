"""Benchmark: phase-2 training speed of distill_student.py against sentence-transformers' trainer with MSELoss.

Same student (layers 0 and 5 of all-MiniLM-L6-v2, real weights), same texts (Wikipedia and news sentences
from gensim's test data, see benchmarks/distill_study.py), same batch, learning rate and number of
optimiser steps, and the same precomputed teacher vectors (a store written once by encode.py; the
sentence-transformers run gets the same vectors as its `label` column). Each run is a fresh process; the
runs of the contenders alternate, and the table gives the median over --repeats of the training loop's
samples per second as each trainer reports it (HF Trainer's `train_samples_per_second`; ours computes
it the same way: samples of the loop over the loop's wall time).

    pip install gensim
    python benchmarks/distill_speed.py                 # 3 repeats x 100 steps of batch 64
    python benchmarks/distill_speed.py --repeats 5 --steps 100
"""

import argparse
import json
import os
import random
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CONTENDERS = {
    "sentence-transformers MSELoss": "st",
    "distill_student.py": "ours",
    "distill_student.py --group_by_length false": "ours-ungrouped",
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--learning_rate", type=float, default=2e-4)
    parser.add_argument("--output_dir", default=os.path.join(ROOT, "outputs", "benchmarks", "distill_speed"))
    parser.add_argument("--run", default=None, help=argparse.SUPPRESS)  # one contender, in a fresh process
    return parser.parse_args(argv)


def prepare(args):
    """Texts (the first steps x batch Wikipedia/news sentences, shuffled), the teacher's store, the cut student."""
    import encode
    from benchmarks.distill_study import general_text, write_jsonl
    from common.demo_data import demo_base_model
    from common.encoder import Encoder
    from common.surgery import keep_layers

    work = args.output_dir
    texts_file = os.path.join(work, "texts.jsonl")
    count = args.steps * args.batch_size
    if not os.path.exists(texts_file):
        texts = general_text()
        random.Random(0).shuffle(texts)
        write_jsonl(texts_file, ({"query": text} for text in texts[:count]))
    store = os.path.join(work, "teacher-store")
    if not os.path.exists(os.path.join(store, "metadata.json")):
        encode.main(["--model_name_or_path", demo_base_model(), "--input_file", texts_file, "--kind", "query",
                     "--text_column", "query", "--output_dir", store])  # fmt: skip
    student = os.path.join(work, "student-cut")
    if not os.path.exists(os.path.join(student, "config.json")):
        keep_layers(Encoder.from_pretrained(demo_base_model()), [0, 5]).save_pretrained(student)
    return texts_file, store, student


def run_sentence_transformers(args, texts_file, store, student, output):
    import torch
    from datasets import Dataset
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
        losses,
    )

    from common.store import EmbeddingStore

    with open(texts_file, encoding="utf-8") as handle:
        texts = [json.loads(line)["query"] for line in handle]
    vectors = EmbeddingStore.open(store).read(np.arange(len(texts)))
    dataset = Dataset.from_dict({"sentence": texts, "label": vectors.tolist()})
    torch.manual_seed(42)
    model = SentenceTransformer(student, device="cpu")
    training_args = SentenceTransformerTrainingArguments(
        output_dir=output,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        max_steps=args.steps,
        warmup_ratio=0.05,
        weight_decay=0.01,
        save_strategy="no",
        report_to="none",
        logging_steps=10**6,
        dataloader_drop_last=True,
        disable_tqdm=True,
        use_cpu=True,
        seed=42,
    )
    trainer = SentenceTransformerTrainer(
        model=model, args=training_args, train_dataset=dataset, loss=losses.MSELoss(model)
    )
    return trainer.train().metrics["train_samples_per_second"]


def run_ours(args, texts_file, store, output, grouped):
    import distill_student
    from common.demo_data import demo_base_model

    results = distill_student.main([
        "--teacher_model", demo_base_model(), "--student_layers", "0,5", "--query_file", texts_file,
        "--teacher_query_store", store, "--per_device_train_batch_size", str(args.batch_size),
        "--learning_rate", str(args.learning_rate), "--max_train_steps", str(args.steps),
        "--output_dir", output, "--overwrite_output_dir", "--logging_steps", str(10**6),
        "--group_by_length", "true" if grouped else "false",
    ])  # fmt: skip
    return results["train_samples_per_second"]


def main(argv=None):
    args = parse_args(argv)
    args.output_dir = os.path.abspath(args.output_dir)
    if args.run:  # inside the fresh process of one run
        os.environ.setdefault("TQDM_DISABLE", "1")
        texts_file, store, student = prepare(args)
        output = os.path.join(args.output_dir, f"run-{args.run}")
        if args.run == "st":
            speed = run_sentence_transformers(args, texts_file, store, student, output)
        else:
            speed = run_ours(args, texts_file, store, output, grouped=args.run == "ours")
        print(json.dumps({"samples_per_second": speed}))
        return speed
    prepare(args)
    speeds = {name: [] for name in CONTENDERS}
    flags = ["--steps", str(args.steps), "--batch_size", str(args.batch_size), "--learning_rate",
             str(args.learning_rate), "--output_dir", args.output_dir]  # fmt: skip
    for repeat in range(args.repeats):
        for name, run in CONTENDERS.items():
            finished = subprocess.run(
                [sys.executable, os.path.abspath(__file__), "--run", run, *flags],
                check=True,
                capture_output=True,
                text=True,
            )
            speed = json.loads(finished.stdout.strip().splitlines()[-1])["samples_per_second"]
            speeds[name].append(speed)
            print(f"repeat {repeat + 1}: {name}: {speed:.1f} samples/s", flush=True)
    reference = float(np.median(speeds["sentence-transformers MSELoss"]))
    lines = [
        f"{args.steps} optimiser steps of batch {args.batch_size}; median of {args.repeats} runs, each a fresh process",
        "",
        "| trainer | samples/s (median) | runs | vs sentence-transformers |",
        "|---|---|---|---|",
    ]
    for name, values in speeds.items():
        median = float(np.median(values))
        runs = ", ".join(f"{value:.1f}" for value in values)
        lines.append(f"| {name} | {median:.1f} | {runs} | {median / reference:.2f}x |")
    table = "\n".join(lines)
    with open(os.path.join(args.output_dir, "table.md"), "w", encoding="utf-8") as handle:
        handle.write(table + "\n")
    print(table)
    return speeds


if __name__ == "__main__":
    main()
