"""Benchmark: how much of the teacher's quality a cut student recovers on real collections, label-free.

For each real retrieval collection (real queries, documents and human judgments; by default the ones
in ../shared/data) this runs, side by side in one process:
- the teacher: all-MiniLM-L6-v2 (real weights), symmetric, indexing the documents;
- a student cut to K of its layers WITHOUT alignment (what cutting alone costs);
- the same student after `distill_student.py` L2 alignment on sentences of the collection's documents
  (label-free: no query and no judgment is used for training; the test queries are never seen).
Students are scored against the teacher's document index, as in serving. Prints one table; writes
results under --output_dir. The collections are read where they are, never copied into the repository.

    python benchmarks/real_collections.py                       # both collections, 2-layer student
    python benchmarks/real_collections.py --student_layers 2 3 --collections med
    python benchmarks/real_collections.py --progressive_from 4    # + progressive 4 -> 2 (same total epochs)
"""

import argparse
import json
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import distill_student  # noqa: E402
import evaluate  # noqa: E402  (the repository's evaluate.py)
from common.demo_data import demo_base_model  # noqa: E402
from common.encoder import Encoder, evenly_spaced_layers, keep_layers  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data_root", default=os.path.join(ROOT, "..", "shared", "data"))
    parser.add_argument("--collections", nargs="+", default=None, help="Folder names; default: all found.")
    parser.add_argument("--student_layers", type=int, nargs="+", default=[2], help="Student sizes to try.")
    parser.add_argument("--max_sentences", type=int, default=4000, help="Label-free training sentences.")
    parser.add_argument(
        "--progressive_from",
        type=int,
        default=None,
        help="Also train a progressive student: cut to this many layers, align for half the epochs, "
        "prune by importance to each --student_layers size, re-align for the other half.",
    )
    parser.add_argument("--num_train_epochs", type=float, default=3.0)
    parser.add_argument("--layer_importance", choices=["block_influence", "norm_ratio"], default="block_influence")
    parser.add_argument("--output_dir", default=os.path.join(ROOT, "outputs", "benchmarks", "real_collections"))
    return parser.parse_args(argv)


def prepare(collection_dir, work_dir, max_sentences):
    """Our formats from {corpus,queries}.jsonl + qrels.tsv; label-free sentences from the documents."""
    os.makedirs(work_dir, exist_ok=True)
    paths = {name: os.path.join(work_dir, f"{name}.jsonl") for name in ("ads", "queries", "sentences")}
    paths["qrels"] = os.path.join(collection_dir, "qrels.tsv")
    sentences = []
    with (
        open(os.path.join(collection_dir, "corpus.jsonl"), encoding="utf-8") as source,
        open(paths["ads"], "w", encoding="utf-8") as ads,
    ):
        for line in source:
            doc = json.loads(line)
            text = f"{doc.get('title', '')}. {doc['text']}".strip(". ")
            ads.write(json.dumps({"id": doc["id"], "text": text}) + "\n")
            sentences += [s for s in re.split(r"(?<=[.?!])\s+", doc["text"]) if len(s.split()) >= 4]
    with (
        open(os.path.join(collection_dir, "queries.jsonl"), encoding="utf-8") as source,
        open(paths["queries"], "w", encoding="utf-8") as queries,
    ):
        for line in source:
            queries.write(line)
    step = max(len(sentences) // max_sentences, 1)
    with open(paths["sentences"], "w", encoding="utf-8") as handle:
        for sentence in sentences[::step][:max_sentences]:
            handle.write(json.dumps({"query": sentence}) + "\n")
    return paths


def main(argv=None):
    args = parse_args(argv)
    data_root = os.path.abspath(args.data_root)
    names = args.collections or sorted(
        name for name in os.listdir(data_root) if os.path.exists(os.path.join(data_root, name, "qrels.tsv"))
    )
    teacher = demo_base_model()
    rows = []
    for name in names:
        work = os.path.join(args.output_dir, name)
        paths = prepare(os.path.join(data_root, name), os.path.join(work, "data"), args.max_sentences)
        students = []
        for layers in args.student_layers:
            cut = Encoder.from_pretrained(teacher)
            keep_layers(cut, evenly_spaced_layers(cut.backbone.config.num_hidden_layers, layers))
            cut.save_pretrained(os.path.join(work, f"cut-{layers}"))
            aligned = os.path.join(work, f"aligned-{layers}")
            distill_student.main(
                [
                    "--teacher_model",
                    teacher,
                    "--query_file",
                    paths["sentences"],
                    "--student_num_layers",
                    str(layers),
                    "--output_dir",
                    aligned,
                    "--overwrite_output_dir",
                    "--num_train_epochs",
                    str(args.num_train_epochs),
                    "--store_dir",
                    os.path.join(work, "stores"),
                ]
            )
            students += [f"cut-{layers}={os.path.join(work, f'cut-{layers}')}", f"aligned-{layers}={aligned}"]
            if args.progressive_from:
                progressive = os.path.join(work, f"progressive-{args.progressive_from}-{layers}")
                distill_student.main([
                    "--teacher_model", teacher, "--query_file", paths["sentences"], "--student_num_layers",
                    str(args.progressive_from), "--prune_schedule", str(layers), "--output_dir", progressive,
                    "--overwrite_output_dir", "--num_train_epochs", str(args.num_train_epochs / 2),
                    "--store_dir", os.path.join(work, "stores"), "--layer_importance", args.layer_importance,
                ])  # fmt: skip
                students.append(f"progressive-{args.progressive_from}-{layers}={progressive}")
        results = evaluate.main(
            [
                "--teacher_model",
                teacher,
                "--students",
                *students,
                "--baselines",
                "--corpus_file",
                paths["ads"],
                "--queries_file",
                paths["queries"],
                "--qrels_file",
                paths["qrels"],
                "--output_dir",
                os.path.join(work, "eval"),
                "--store_dir",
                os.path.join(work, "stores"),
                "--latency_queries",
                "100",
            ]
        )
        teacher_latency = results["models"]["teacher"]["speed"]["latency_p50_ms"]
        for model, entry in results["models"].items():
            metrics, recovery = entry["metrics"], entry["recovery"]
            rows.append(
                (
                    name,
                    model,
                    metrics["ndcg@10"],
                    metrics["recall@100"],
                    recovery["ndcg@10"],
                    recovery["recall@100"],
                    entry["speed"]["latency_p50_ms"],
                    entry["speed"]["latency_p50_ms"] / teacher_latency,
                    entry["parameters"] / 1e6,
                )
            )
    lines = [
        "| collection | model | nDCG@10 | R@100 | recovery nDCG@10 | recovery R@100 | p50 ms | latency vs teacher "
        "| params (M) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r[0]} | {r[1]} | {r[2]:.4f} | {r[3]:.4f} | {r[4]:.1f}% | {r[5]:.1f}% | {r[6]:.2f} | {r[7]:.2f}x "
        f"| {r[8]:.1f} |"
        for r in rows
    ]
    table = "\n".join(lines)
    with open(os.path.join(args.output_dir, "table.md"), "w", encoding="utf-8") as handle:
        handle.write(table + "\n")
    print(table)
    return rows


if __name__ == "__main__":
    main()
