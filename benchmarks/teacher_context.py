"""Benchmark: what teacher-only context buys. On the embedded default (the demo queries carry a `context` column:
an offline classifier's category path and intent, wrong for 10% of queries and missing for 10%), two recipes
run end to end with the demo's settings and the same seed:

- plain: train_teacher.py, then distill_student.py (the student cut from it), both on the queries alone;
- context: train_teacher.py --query_context_column context (the teacher reads query + context), then
  distill_student.py --query_context_column context (the teacher's targets are its vectors of query + context;
  the student reads the query alone).

Each pair is scored by evaluate.py on the held-out test queries against its own teacher's ad index: the
teacher with the context (when it has one) and without it, the student always without it, as it is served.
The table gives nDCG@10 and R@100 and the student's recovery; what the student "inherits" is its gain over the
plain student, as a share of the teacher's gain. Seeds: --seeds repeats each recipe with other seeds.

    python benchmarks/teacher_context.py                  # about 8 minutes per seed on 2 CPU cores
"""

import argparse
import json
import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import distill_student  # noqa: E402
import evaluate  # noqa: E402
import train_teacher  # noqa: E402
from common.demo_data import demo_paths  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[42])
    parser.add_argument("--output_dir", default=os.path.join(ROOT, "outputs", "benchmarks", "teacher_context"))
    return parser.parse_args(argv)


def scores(folder, name):
    with open(os.path.join(folder, "results.json")) as handle:
        metrics = json.load(handle)["models"][name]["metrics"]
    return metrics["ndcg@10"], metrics["recall@100"]


def run_recipe(root, context, seed):
    """Teacher and student of one recipe; returns {row: (nDCG@10, R@100)}."""
    paths = demo_paths()
    flags = ["--query_context_column", "context"] if context else []
    run = os.path.join(root, f"{'context' if context else 'plain'}-seed{seed}")
    teacher, student = os.path.join(run, "teacher"), os.path.join(run, "student")
    common = ["--seed", str(seed), "--store_dir", os.path.join(run, "stores")]
    if not os.path.exists(os.path.join(teacher, "training_args.json")):
        train_teacher.main([*flags, "--seed", str(seed), "--output_dir", teacher])
    if not os.path.exists(os.path.join(student, "training_args.json")):
        distill_student.main([*flags, *common, "--teacher_model", teacher, "--output_dir", student])
    evaluation = ["--teacher_model", teacher, "--students", f"student={student}", "--baselines",
                  "--corpus_file", paths["ads"], "--queries_file", paths["test_queries"], "--qrels_file",
                  paths["qrels"], "--store_dir", os.path.join(run, "stores"), "--latency_queries", "0",
                  "--flops_queries", "0", "--throughput_queries", "1", "--plots", "false"]  # fmt: skip
    rows = {}
    evaluate.main([*evaluation, "--output_dir", os.path.join(run, "eval-raw")])
    rows["teacher, queries alone"] = scores(os.path.join(run, "eval-raw"), "teacher")
    rows["student"] = scores(os.path.join(run, "eval-raw"), "student")
    if context:
        out = os.path.join(run, "eval-context")
        evaluate.main([*evaluation, *flags, "--output_dir", out])
        rows["teacher, query + context"] = scores(out, "teacher")
    return rows


def main(argv=None):
    args = parse_args(argv)
    results = {}
    for seed in args.seeds:
        for context in (False, True):
            for row, values in run_recipe(args.output_dir, context, seed).items():
                name = f"{'context' if context else 'plain'} recipe: {row}"
                results.setdefault(name, []).append(values)
    print(f"\nEmbedded default, test queries; median over seeds {args.seeds}\n")
    print("| recipe: model (what it reads at test time) | nDCG@10 | R@100 |")
    print("|---|---|---|")
    median = {name: [statistics.median(v[i] for v in values) for i in (0, 1)] for name, values in results.items()}
    for name, (ndcg, recall) in median.items():
        print(f"| {name} | {ndcg:.4f} | {recall:.4f} |")
    plain_teacher = median["plain recipe: teacher, queries alone"]
    plain_student, context_student = median["plain recipe: student"], median["context recipe: student"]
    context_teacher = median["context recipe: teacher, query + context"]
    for i, metric in enumerate(("nDCG@10", "R@100")):
        lift = context_teacher[i] - plain_teacher[i]
        gain = context_student[i] - plain_student[i]
        share = f"{100 * gain / lift:.0f}% of it" if lift > 0 else "n/a"
        print(f"\n{metric}: the context lifts the teacher by {lift:+.4f}; the student gains {gain:+.4f} ({share})")
    with open(os.path.join(args.output_dir, "results.json"), "w") as handle:
        json.dump({"seeds": args.seeds, "runs": results, "median": median}, handle, indent=2)


if __name__ == "__main__":
    main()
