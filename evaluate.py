"""Evaluation: retrieval quality over the teacher's ad index, the student's recovery, query latency.

FAISS indexes the teacher's ad vectors (from the store; built once when missing): exact by default (flat
inner product, or, for stores larger than --index_memory_gb, the memory-mapped store searched chunk by chunk
with the top-k merged), IVF or HNSW with --index. Each query encoder is scored against it: the teacher
itself, and every student (--students). Symmetric baselines (--baselines, e.g. the untuned embedder) are
scored against an index of their own ad vectors.
Metrics at each k: precision, recall, nDCG (graded judgments, linear gains) and MRR. A student's recovery
is its metric over the teacher's, in %, with a paired bootstrap confidence interval over queries.
overlap@k is the share of the teacher's top-k that a model also returns: it needs no judgments, so
--queries_file without --qrels_file (logged traffic) reports overlap only. Latency is per query at batch 1
(tokenisation included, as in serving; warm-up first, device synchronised), p50/p95/p99; throughput is
queries per second at --throughput_batch_size; forward FLOPs per query are counted on the test queries. How many
cores other work kept busy during each model's timings is measured beside them (results.json:
other_load_cores), and the report flags timings taken on a busy machine.
Writes results.json, report.md and the plots recall_at_k.png and quality_vs_latency.png to --output_dir.

Single machine (the embedded default: untuned teacher, teacher, aligned and refined students):
    python evaluate.py
Your data, on a GPU:
    python evaluate.py --teacher_model teacher --students student=student --corpus_file ads.parquet \
        --queries_file test_queries.jsonl --qrels_file qrels.tsv --output_dir eval
Logged queries without judgments, 50M ads searched exactly from the memory-mapped store:
    python evaluate.py --teacher_model teacher --ad_store stores/teacher-ads --students student=student \
        --corpus_file ads.parquet --queries_file logged.parquet --index sharded --output_dir eval-traffic
"""

import argparse
import json
import os
import time

import numpy as np
import torch

from common.args import (
    add_context_args,
    add_model_safety_args,
    boolean,
    fraction,
    non_negative_int,
    parse_with_config,
    positive_float,
    positive_int,
)
from common.data import check_judgments, corpus_summary, read_contexts, read_qrels, read_texts, with_context
from common.demo_data import DEMO_ROOT, demo_base_model, demo_paths
from common.encoder import Encoder, EncoderSpec, check_student_of
from common.errors import UserError, run_cli
from common.hub import update_model_card
from common.report import render_report, write_atomic, write_plots
from common.retrieval import (
    INDEX_TYPES,
    IndexSpec,
    bootstrap_ratio_interval,
    build_index,
    overlap_at_k,
    per_query_metrics,
    search,
)
from common.runtime import LoadProbe, cpu_features, logger, make_accelerator
from common.store import default_store_dir, open_or_build_store, rows_of_corpus, store_for_student


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
    group.add_argument(
        "--qrels_file", default=None, help="Judgments (query_id, doc_id, relevance); without: overlap only."
    )
    group.add_argument("--id_column", default="id")
    group.add_argument("--text_column", default="text")
    group.add_argument("--ad_store", default=None, help="The teacher's ad store; built when missing.")
    group.add_argument("--store_dir", default=None, help="Where default stores go; default: <output_dir>/../stores.")
    add_context_args(group, where="--queries_file (read by the teacher only, as in phases 1-2)")
    group.add_argument("--encode_batch_size", type=positive_int, default=128)
    # Index
    group = parser.add_argument_group("Index")
    group.add_argument(
        "--index",
        choices=INDEX_TYPES,
        default="auto",
        help="flat: exact in memory; sharded: exact over the memory-mapped store, chunk by chunk; ivf, hnsw: "
        "approximate; auto: flat when the vectors fit --index_memory_gb, else sharded.",
    )
    group.add_argument("--index_memory_gb", type=positive_float, default=8.0)
    group.add_argument("--nlist", type=positive_int, default=None, help="IVF cells; default 4 sqrt(ads).")
    group.add_argument("--nprobe", type=positive_int, default=32, help="IVF cells searched per query.")
    group.add_argument("--hnsw_m", type=positive_int, default=32, help="HNSW links per vector.")
    group.add_argument("--ef_construction", type=positive_int, default=200)
    group.add_argument("--ef_search", type=positive_int, default=256, help="HNSW candidates per query.")
    group.add_argument("--no_gpu_index", action="store_true", help="Keep the FAISS index on the CPU.")
    # Metrics
    group = parser.add_argument_group("Metrics")
    group.add_argument("--k", type=positive_int, nargs="+", default=[10, 100])
    group.add_argument("--bootstrap_samples", type=positive_int, default=1000)
    group.add_argument("--confidence_level", type=fraction, default=0.95)
    group.add_argument(
        "--latency_queries", type=non_negative_int, default=200, help="Queries timed one by one; 0: skip."
    )
    group.add_argument("--throughput_batch_size", type=positive_int, default=128)
    group.add_argument("--throughput_queries", type=positive_int, default=1024)
    group.add_argument(
        "--flops_queries", type=non_negative_int, default=32, help="Queries whose forward FLOPs are counted; 0: skip."
    )
    # Output
    group = parser.add_argument_group("Output")
    group.add_argument("--output_dir", default=os.path.join(DEMO_ROOT, "eval"))
    group.add_argument("--plots", type=boolean, nargs="?", const=True, default=True, help="Write the PNG plots.")
    group.add_argument(
        "--write_model_cards",
        action="store_true",
        help="Add this evaluation (metrics, recovery with its interval, latency, plots) to the model card "
        "(README.md) of every student folder made by this project's scripts.",
    )
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
    with LoadProbe() as load:  # other work on the machine during the timings: reported, flagged above 0.5 cores
        for i in range(latency_queries):
            sync()
            start = time.perf_counter()
            encoder(**encoder.tokenize([texts[i % len(texts)]], "query").to(device))
            sync()
            timings.append((time.perf_counter() - start) * 1000)
        batch_texts = [texts[i % len(texts)] for i in range(throughput_queries)]
        encoder.encode(batch_texts[:batch_size], "query", batch_size=batch_size, device=device)  # warm-up
        sync()
        start = time.perf_counter()
        encoder.encode(batch_texts, "query", batch_size=batch_size, device=device)
        sync()
        throughput_seconds = time.perf_counter() - start
    return {
        "latency_p50_ms": float(np.percentile(timings, 50)),
        "latency_p95_ms": float(np.percentile(timings, 95)),
        "latency_p99_ms": float(np.percentile(timings, 99)),
        "throughput_qps": throughput_queries / throughput_seconds,
        "throughput_batch_size": batch_size,
        "other_load_cores": load.other_cores,
    }


@torch.inference_mode()
def forward_flops_per_query(encoder, texts, device, count):
    """Mean forward FLOPs of one query at batch 1 (matrix products and attention, as torch counts them)
    over the first `count` texts: the work a speed-up can at most remove."""
    from torch.utils.flop_counter import FlopCounterMode

    texts = texts[:count]
    if not texts:
        return None
    counter = FlopCounterMode(display=False)
    with counter:
        for text in texts:
            encoder(**encoder.tokenize([text], "query").to(device))
    return counter.get_total_flops() / len(texts)


def recall_curve(ranked, qrels, ks):
    """Mean recall at every k of `ks` over the queries with a relevant judgment (for the plot)."""
    curves = []
    for qid, grades in qrels.items():
        relevant = {doc for doc, grade in grades.items() if grade > 0}
        if relevant:
            hits = np.cumsum([doc in relevant for doc in ranked.get(qid, [])[: ks[-1]]] or [0])
            curves.append([hits[min(k, len(hits)) - 1] / len(relevant) for k in ks])
    return np.mean(curves, axis=0).tolist()


def main(argv=None):
    args = parse_args(argv)
    args.k = sorted(set(args.k))
    check_report_dir(args.output_dir)
    args.gradient_accumulation_steps = 1
    accelerator = make_accelerator(args)
    demo = args.corpus_file is None and args.queries_file is None and args.qrels_file is None
    if demo:
        with accelerator.main_process_first():
            paths = demo_paths()
        args.corpus_file, args.queries_file, args.qrels_file = paths["ads"], paths["test_queries"], paths["qrels"]
    elif args.corpus_file is None or args.queries_file is None:
        raise UserError(
            "Pass all of --corpus_file and --queries_file (with --qrels_file for metrics, without it overlap with "
            "the teacher only), or none of them for the built-in data."
        )
    if args.students is None:
        candidates = [
            ("student-aligned", os.path.join(DEMO_ROOT, "student-aligned")),
            ("student", os.path.join(DEMO_ROOT, "student")),
            ("contrastive-only", os.path.join(DEMO_ROOT, "student-contrastive-only")),  # no phase 2: the baseline
        ]
        args.students = [f"{name}={path}" for name, path in candidates if os.path.isdir(path)] if demo else []
    if args.baselines is None:
        args.baselines = [f"untuned-base={demo_base_model()}"] if demo else []
    students, baselines = named_paths(args.students, "--students"), named_paths(args.baselines, "--baselines")
    names = [name for name, _ in baselines + students]
    if "teacher" in names or len(set(names)) != len(names):
        clash = "teacher" if "teacher" in names else next(name for name in names if names.count(name) > 1)
        raise UserError(f"The model name '{clash}' is used twice (or is the reserved 'teacher'); name each model once.")

    # The ads' ids and fingerprint in one streamed pass; their texts are read only if a store must be built
    # (a baseline's own ads, or a teacher without --ad_store), so 50M ads scored against stores keep ids only.
    qrels = read_qrels(args.qrels_file) if args.qrels_file else None
    judged_ads = {doc for grades in (qrels or {}).values() for doc in grades}
    ads_fp, num_ads, known_ads = corpus_summary(args.corpus_file, args.id_column, args.text_column, judged_ads)
    query_ids, query_texts = read_texts(args.queries_file, args.id_column, args.text_column)
    teacher_query_texts = query_texts  # the teacher reads the queries with their teacher-only context, if any
    if args.query_context_column:
        contexts = read_contexts(args.queries_file, args.query_context_column)
        teacher_query_texts = [with_context(q, c, args.context_template) for q, c in zip(query_texts, contexts)]
    if qrels is not None:
        check_judgments(qrels, args.qrels_file, query_ids, args.queries_file, known_ads, args.corpus_file)
    device = accelerator.device
    spec = IndexSpec(
        kind=args.index,
        use_gpu=not args.no_gpu_index,
        memory_gb=args.index_memory_gb,
        nlist=args.nlist,
        nprobe=args.nprobe,
        hnsw_m=args.hnsw_m,
        ef_construction=args.ef_construction,
        ef_search=args.ef_search,
    )
    options = {"trust_remote_code": args.trust_remote_code, "allow_pickle": args.allow_pickle_weights}
    teacher_files = EncoderSpec.read(args.teacher_model, **options)
    spec.check(num_ads, max(args.k), teacher_files.embedding_dim)
    for name, path in students:  # their configs only: a student of another teacher is refused before any work
        check_student_of(EncoderSpec.read(path, **options), teacher_files, name)

    judged = sorted(qid for qid, grades in (qrels or {}).items() if any(grade > 0 for grade in grades.values()))
    results = {
        "teacher": args.teacher_model,
        "judged": qrels is not None,
        "num_queries": len(query_ids),
        "num_queries_scored": len(judged),  # the metrics average over queries with a relevant judgment
        "num_queries_skipped": len(query_ids) - len(judged),
        "num_ads": num_ads,
        "index": args.index,  # auto is resolved on the teacher's store below
        "models": {},
        "device": cpu_features() if device.type != "cuda" else torch.cuda.get_device_name(device),
        "threads": torch.get_num_threads(),
        "k": args.k,
        "confidence_level": args.confidence_level,
        "throughput_batch_size": args.throughput_batch_size,
        "teacher_query_context": args.query_context_column,
    }
    entries = [(name, path, "baseline (own ads)") for name, path in baselines]
    entries += [("teacher", args.teacher_model, "teacher")] + [(n, p, "student (teacher ads)") for n, p in students]
    teacher_store, teacher_indexes = None, {}
    ranked, per_query, curves = {}, {}, {}
    curve_ks = sorted({int(k) for k in np.unique(np.geomspace(1, max(args.k), num=25).round())} | set(args.k))
    for name, path, role in entries:
        encoder = Encoder.from_pretrained(
            path, dtype=args.dtype, trust_remote_code=args.trust_remote_code, allow_pickle=args.allow_pickle_weights
        ).to(device)
        if role != "student (teacher ads)":  # the model encodes its own ads
            store = open_or_build_store(
                accelerator,
                encoder,
                rows_of_corpus(args.corpus_file, args.id_column, args.text_column),  # read only if built
                "ad",
                path=args.ad_store if role == "teacher" else None,
                store_dir=default_store_dir(args),
                model_path=path,
                batch_size=args.encode_batch_size,
                data_fp=ads_fp,
            )
            index = build_index(store, spec=spec) if accelerator.is_main_process else None
            if role == "teacher":
                teacher_store, teacher_indexes = store, {store.dim: index}
                results["index"] = spec.describe(len(store), store.dim)
        else:
            # the teacher's ad index; for a student aligned with --teacher_dim, one of the truncated vectors
            store = store_for_student(teacher_store, encoder)
            if store.dim not in teacher_indexes:
                teacher_indexes[store.dim] = build_index(store, spec=spec) if accelerator.is_main_process else None
            index = teacher_indexes[store.dim]
        if not accelerator.is_main_process:
            continue
        logger.info(f"Scoring {name} ({path})")
        texts = teacher_query_texts if role == "teacher" else query_texts
        query_vectors = encoder.encode(texts, "query", batch_size=args.encode_batch_size, device=device)
        _, rows = search(index, query_vectors, max(args.k))
        ranked[name] = dict(zip(query_ids, store.ranked_ids(rows)))  # ids from the store, not held here
        entry = {"path": str(path), "role": role, "parameters": sum(p.numel() for p in encoder.parameters())}
        if qrels is not None:
            per_query[name] = per_query_metrics(ranked[name], qrels, args.k)
            entry["metrics"] = {key: float(np.mean(list(v.values()))) for key, v in per_query[name].items()}
            curves[name] = (curve_ks, recall_curve(ranked[name], qrels, curve_ks))
        else:
            entry["metrics"] = {}
        entry["speed"] = time_queries(
            encoder, texts, device, args.latency_queries, args.throughput_batch_size, args.throughput_queries
        )
        entry["flops_per_query"] = forward_flops_per_query(encoder, texts, device, args.flops_queries)
        results["models"][name] = entry
        del encoder
    if accelerator.is_main_process:
        teacher_lists = [ranked["teacher"][qid] for qid in query_ids]
        for name, entry in results["models"].items():
            lists = [ranked[name][qid] for qid in query_ids]
            entry["overlap"] = (
                {} if name == "teacher" else {f"overlap@{k}": overlap_at_k(lists, teacher_lists, k) for k in args.k}
            )
            if qrels is None and name != "teacher":
                curves[name] = (curve_ks, [overlap_at_k(lists, teacher_lists, k) for k in curve_ks])
            entry["recovery"], entry["recovery_interval"] = {}, {}
            for key, teacher_value in results["models"]["teacher"]["metrics"].items():
                if teacher_value <= 0:
                    continue
                entry["recovery"][key] = 100 * entry["metrics"][key] / teacher_value
                if name != "teacher":
                    low, high = bootstrap_ratio_interval(
                        [per_query[name][key][q] for q in judged],
                        [per_query["teacher"][key][q] for q in judged],
                        samples=args.bootstrap_samples,
                        level=args.confidence_level,
                    )
                    entry["recovery_interval"][key] = [100 * low, 100 * high]
        os.makedirs(args.output_dir, exist_ok=True)
        if args.plots:
            results["plots"] = write_plots(results, curves, args.output_dir)
        report = render_report(results)
        write_atomic(os.path.join(args.output_dir, "results.json"), json.dumps(results, indent=2))
        write_atomic(os.path.join(args.output_dir, "report.md"), report)
        print(report)
        if args.write_model_cards:
            for name, path in students:
                update_model_card(path, name, results, args.output_dir, args)
    accelerator.wait_for_everyone()
    return results


if __name__ == "__main__":
    run_cli(main)
