"""Evaluation: retrieval quality over the teacher's ad index, the student's recovery, query latency.

FAISS indexes the teacher's ad vectors (from the store; built once when missing). Each query encoder
is scored against it: the teacher itself, and every student (--students). Symmetric baselines
(--baselines, e.g. the untuned embedder) are scored against an index of their own ad vectors.
Metrics at each k: precision, recall, nDCG (graded judgments, linear gains) and MRR. A student's
recovery is its metric over the teacher's, in %. Latency is per query at batch size 1 (tokenisation
included, as in serving), p50 and p99; throughput is queries per second at --throughput_batch_size.
Writes results.json and report.md to --output_dir and prints the report.

Single machine (the embedded default: untuned teacher, teacher, aligned and refined students):
    python evaluate.py
Your data, on a GPU:
    python evaluate.py --teacher_model teacher --students student=student --corpus_file ads.parquet \
        --queries_file test_queries.jsonl --qrels_file qrels.tsv --output_dir eval
"""

import argparse
import json
import os
import time

import numpy as np
import torch

from common.cli import (
    add_model_safety_args,
    logger,
    make_accelerator,
    non_negative_int,
    parse_with_config,
    positive_int,
)
from common.data import data_fingerprint, read_qrels, read_texts
from common.demo_data import DEMO_ROOT, demo_base_model, demo_paths
from common.encoder import Encoder
from common.errors import UserError, run_cli
from common.retrieval import build_index, retrieval_metrics, search
from common.store import default_store_dir, open_or_build_store, store_for_student


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # Models
    group = parser.add_argument_group("Models")
    group.add_argument("--teacher_model", default=os.path.join(DEMO_ROOT, "teacher"), help="Encodes the ad index.")
    group.add_argument(
        "--students",
        nargs="*",
        default=None,
        metavar="NAME=PATH",
        help="Query encoders scored against the teacher's ads; default: the demo students.",
    )
    group.add_argument(
        "--baselines",
        nargs="*",
        default=None,
        metavar="NAME=PATH",
        help="Symmetric models scored against their own ad vectors; default (demo): the untuned base.",
    )
    add_model_safety_args(group)
    group.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default=None,
        help="Load the models in this precision (bfloat16 on GPUs); default: as saved.",
    )
    # Data
    group = parser.add_argument_group("Data")
    group.add_argument("--corpus_file", default=None, help="Ads (id, text); default: the built-in ads.")
    group.add_argument("--queries_file", default=None, help="Test queries (id, text).")
    group.add_argument("--qrels_file", default=None, help="Judgments (query_id, doc_id, relevance).")
    group.add_argument("--id_column", default="id")
    group.add_argument("--text_column", default="text")
    group.add_argument("--ad_store", default=None, help="The teacher's ad store; built when missing.")
    group.add_argument("--store_dir", default=None, help="Where default stores go; default: <output_dir>/../stores.")
    group.add_argument("--encode_batch_size", type=positive_int, default=128)
    # Metrics
    group = parser.add_argument_group("Metrics")
    group.add_argument("--k", type=positive_int, nargs="+", default=[10, 100])
    group.add_argument(
        "--latency_queries", type=non_negative_int, default=200, help="Queries timed one by one; 0: skip."
    )
    group.add_argument("--throughput_batch_size", type=positive_int, default=128)
    group.add_argument("--throughput_queries", type=positive_int, default=1024)
    group.add_argument("--no_gpu_index", action="store_true", help="Keep the FAISS index on the CPU.")
    # Output
    group = parser.add_argument_group("Output")
    group.add_argument("--output_dir", default=os.path.join(DEMO_ROOT, "eval"))
    group.add_argument("--report_to", default="none")
    group.add_argument("--mixed_precision", default=None, choices=["no", "fp16", "bf16"])
    return parse_with_config(parser, argv)


def check_report_dir(output_dir):
    """The report goes to a new or empty folder, or replaces an earlier report of this script, nothing else."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise UserError(f"--output_dir {output_dir} is a file, not a folder; choose a folder path.")
    if os.path.isdir(output_dir):
        names = set(os.listdir(output_dir)) - {".lock"}
        if names and not {"results.json", "report.md"} <= names:
            raise UserError(
                f"--output_dir {output_dir} is not empty and holds no earlier report of evaluate.py; choose a new "
                "or empty folder (nothing there was changed)."
            )


def named_paths(values, flag):
    pairs = []
    for value in values or []:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise UserError(f"{flag} takes NAME=PATH items, got {value!r}; e.g. {flag} student=outputs/student.")
        pairs.append((name, path))
    return pairs


@torch.inference_mode()
def time_queries(encoder, texts, device, latency_queries, batch_size, throughput_queries):
    """Per-query latency at batch 1 (tokenise + forward) and batched throughput, on `device`."""
    if latency_queries <= 0 or not texts:
        return {}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    encoder.eval()
    for text in texts[:10]:  # warm-up: allocator, kernels, tokenizer caches
        encoder(**encoder.tokenize([text], "query").to(device))
    timings = []
    for i in range(latency_queries):
        sync()
        start = time.perf_counter()
        encoder(**encoder.tokenize([texts[i % len(texts)]], "query").to(device))
        sync()
        timings.append((time.perf_counter() - start) * 1000)
    batch_texts = [texts[i % len(texts)] for i in range(throughput_queries)]
    sync()
    start = time.perf_counter()
    encoder.encode(batch_texts, "query", batch_size=batch_size, device=device)
    sync()
    return {
        "latency_p50_ms": float(np.percentile(timings, 50)),
        "latency_p99_ms": float(np.percentile(timings, 99)),
        "throughput_qps": throughput_queries / (time.perf_counter() - start),
    }


def score(encoder, index, ad_ids, query_ids, query_texts, qrels, args, device):
    query_vectors = encoder.encode(query_texts, "query", batch_size=args.encode_batch_size, device=device)
    _, rows = search(index, query_vectors, max(args.k))
    ranked = {qid: [ad_ids[r] for r in row if r >= 0] for qid, row in zip(query_ids, rows)}
    return retrieval_metrics(ranked, qrels, args.k)


def render_report(results, ks):
    k_small, k_large = min(ks), max(ks)
    lines = [
        "# Retrieval report",
        "",
        f"{results['num_queries']} queries ({results['num_queries_scored']} scored, "
        f"{results['num_queries_skipped']} skipped for having no relevant judgment), {results['num_ads']} ads; "
        f"teacher ad index: `{results['teacher']}`",
        "",
        f"| model | role | P@{k_small} | R@{k_small} | nDCG@{k_small} | MRR@{k_small} | R@{k_large} | "
        f"recovery nDCG@{k_small} | recovery R@{k_large} | p50 ms | p99 ms | q/s | params (M) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, entry in results["models"].items():
        m, rec = entry["metrics"], entry.get("recovery", {})

        def pct(key, rec=rec):
            return f"{rec[key]:.1f}%" if key in rec else "-"

        speed = entry.get("speed", {})
        lines.append(
            f"| {name} | {entry['role']} | {m[f'precision@{k_small}']:.4f} | {m[f'recall@{k_small}']:.4f} | "
            f"{m[f'ndcg@{k_small}']:.4f} | {m[f'mrr@{k_small}']:.4f} | {m[f'recall@{k_large}']:.4f} | "
            f"{pct(f'ndcg@{k_small}')} | {pct(f'recall@{k_large}')} | "
            f"{speed.get('latency_p50_ms', float('nan')):.2f} | {speed.get('latency_p99_ms', float('nan')):.2f} | "
            f"{speed.get('throughput_qps', float('nan')):.0f} | {entry['parameters'] / 1e6:.1f} |"
        )
    lines += [
        "",
        f"Device: {results['device']}, {results['threads']} CPU threads. Latency: batch 1, tokenisation "
        "included. Recovery: the model's metric over the teacher's.",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    check_report_dir(args.output_dir)
    args.gradient_accumulation_steps = 1
    accelerator = make_accelerator(args)
    demo = args.corpus_file is None and args.queries_file is None and args.qrels_file is None
    if demo:
        with accelerator.main_process_first():
            paths = demo_paths()
        args.corpus_file, args.queries_file, args.qrels_file = paths["ads"], paths["test_queries"], paths["qrels"]
    elif None in (args.corpus_file, args.queries_file, args.qrels_file):
        raise UserError("Pass all of --corpus_file, --queries_file and --qrels_file (or none for the built-in data).")
    if args.students is None:
        candidates = [
            ("student-aligned", os.path.join(DEMO_ROOT, "student-aligned")),
            ("student", os.path.join(DEMO_ROOT, "student")),
        ]
        args.students = [f"{name}={path}" for name, path in candidates if os.path.isdir(path)] if demo else []
    if args.baselines is None:
        args.baselines = [f"untuned-base={demo_base_model()}"] if demo else []
    students, baselines = named_paths(args.students, "--students"), named_paths(args.baselines, "--baselines")
    names = [name for name, _ in baselines + students]
    if "teacher" in names or len(set(names)) != len(names):
        clash = "teacher" if "teacher" in names else next(name for name in names if names.count(name) > 1)
        raise UserError(f"The model name '{clash}' is used twice (or is the reserved 'teacher'); name each model once.")

    ad_ids, ad_texts = read_texts(args.corpus_file, args.id_column, args.text_column)
    query_ids, query_texts = read_texts(args.queries_file, args.id_column, args.text_column)
    qrels = read_qrels(args.qrels_file)
    unknown_queries = set(qrels) - set(query_ids)
    if unknown_queries:
        raise UserError(
            f"{args.qrels_file} judges query '{sorted(unknown_queries)[0]}' that is not in "
            f"{args.queries_file}; use the matching judgments file."
        )
    known_ads = set(ad_ids)
    unknown_ads = {doc for grades in qrels.values() for doc in grades if doc not in known_ads}
    if unknown_ads:
        raise UserError(
            f"{args.qrels_file} judges ad '{sorted(unknown_ads)[0]}' that is not in {args.corpus_file}; "
            "use the matching corpus."
        )
    device = accelerator.device

    judged = {qid for qid, grades in qrels.items() if any(grade > 0 for grade in grades.values())}
    results = {
        "teacher": args.teacher_model,
        "num_queries": len(query_ids),
        "num_queries_scored": len(judged),  # the metrics average over queries with a relevant judgment
        "num_queries_skipped": len(query_ids) - len(judged),
        "num_ads": len(ad_ids),
        "models": {},
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "threads": torch.get_num_threads(),
        "k": args.k,
    }
    entries = [(name, path, "baseline (own ads)") for name, path in baselines]
    entries += [("teacher", args.teacher_model, "teacher")] + [(n, p, "student (teacher ads)") for n, p in students]
    teacher_store, teacher_indexes = None, {}
    ads_fp = data_fingerprint(ad_ids, ad_texts)  # once for all models
    for name, path, role in entries:
        encoder = Encoder.from_pretrained(
            path, dtype=args.dtype, trust_remote_code=args.trust_remote_code, allow_pickle=args.allow_pickle_weights
        ).to(device)
        if role != "student (teacher ads)":  # the model encodes its own ads
            store = open_or_build_store(
                accelerator,
                encoder,
                ad_ids,
                ad_texts,
                "ad",
                path=args.ad_store if role == "teacher" else None,
                store_dir=default_store_dir(args),
                model_path=path,
                batch_size=args.encode_batch_size,
                data_fp=ads_fp,
            )
            index = build_index(store, use_gpu=not args.no_gpu_index)
            if role == "teacher":
                teacher_store, teacher_indexes = store, {store.dim: index}
        else:
            # the teacher's ad index; for a student aligned with --teacher_dim, one of the truncated vectors
            store = store_for_student(teacher_store, encoder)
            if store.dim not in teacher_indexes:
                teacher_indexes[store.dim] = build_index(store, use_gpu=not args.no_gpu_index)
            index = teacher_indexes[store.dim]
        if not accelerator.is_main_process:
            continue
        logger.info(f"Scoring {name} ({path})")
        entry = {
            "path": str(path),
            "role": role,
            "parameters": sum(p.numel() for p in encoder.parameters()),
            "metrics": score(encoder, index, ad_ids, query_ids, query_texts, qrels, args, device),
            "speed": time_queries(
                encoder, query_texts, device, args.latency_queries, args.throughput_batch_size, args.throughput_queries
            ),
        }
        results["models"][name] = entry
        del encoder
    if accelerator.is_main_process:
        teacher_metrics = results["models"]["teacher"]["metrics"]
        for entry in results["models"].values():
            entry["recovery"] = {
                key: 100 * value / teacher_metrics[key]
                for key, value in entry["metrics"].items()
                if teacher_metrics[key] > 0
            }
        os.makedirs(args.output_dir, exist_ok=True)
        report = render_report(results, args.k)
        for name, text in (("results.json", json.dumps(results, indent=2)), ("report.md", report)):
            path = os.path.join(args.output_dir, name)
            with open(path + ".partial", "w", encoding="utf-8") as handle:
                handle.write(text)
            os.replace(path + ".partial", path)  # atomic: an earlier report is never left half-overwritten
        print(report)
    accelerator.wait_for_everyone()
    return results


if __name__ == "__main__":
    run_cli(main)
