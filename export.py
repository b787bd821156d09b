"""Export a student query encoder for serving: ONNX (fp32) and int8 (per-token W8A8), behind a parity gate.

The output folder is the student's folder as it was (it still loads with Encoder and SentenceTransformer)
plus onnx/model.onnx and onnx/model_qint8.onnx, each with the pooling, projection head and normalisation
inside the graph (output `sentence_embedding`), and `last_hidden_state` for sentence-transformers' ONNX
backend:
    SentenceTransformer(folder, backend="onnx", model_kwargs={"file_name": "onnx/model_qint8.onnx"})
The parity gate searches the teacher's ad index with the test queries encoded by the fp32 student and by
each export: overlap@k with the student's top-k must be at least --min_overlap and recall@k (with
judgments) within --max_recall_drop points, and a query's vector must not depend on the other queries of its
batch (1 - cos between it alone and inside shuffled batches of 7 and 64 at most --max_batch_dependence: dynamic
int8 quantises each activation tensor with one scale, so it fails this), else the export is refused with the
numbers and nothing is written. results.json gives those numbers and the speed of each at batch 1 and at
--batch_size.

Single machine (the embedded default: the refined demo student against the demo teacher's ads, CPU):
    python export.py
Your student:
    python export.py --model_name_or_path runs/student --teacher_model runs/teacher \
        --ad_store runs/stores/teacher-ads --corpus_file ads.parquet --queries_file test_queries.jsonl \
        --qrels_file qrels.tsv --output_dir runs/student-serving
"""

import argparse
import itertools
import os
import shutil
import time

import numpy as np
import torch

from common.args import (
    add_model_safety_args,
    boolean,
    fraction,
    non_negative_float,
    non_negative_int,
    parse_with_config,
    positive_int,
)
from common.data import check_judgments, corpus_summary, iter_corpus, read_qrels, read_texts
from common.demo_data import DEMO_ROOT, demo_paths
from common.encoder import Encoder, EncoderSpec, check_student_of
from common.errors import UserError, run_cli
from common.onnx_export import INT8_FILE, INT8_SCHEMES, ONNX_FILE, OnnxEncoder, export_onnx, quantize_int8
from common.retrieval import IndexSpec, build_index, overlap_at_k, retrieval_metrics, search
from common.run_folder import STAGING, check_output_dir, lock_folder, move_into_place, save_run_files
from common.runtime import LoadProbe, cpu_features, logger, make_accelerator
from common.store import default_store_dir, open_or_build_store, rows_of_corpus, store_for_student

SCRIPT = "export.py"
MIN_OPSET = 14  # torch exports scaled_dot_product_attention from opset 14 on


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    group = parser.add_argument_group("Models")
    group.add_argument("--model_name_or_path", default=os.path.join(DEMO_ROOT, "student"), help="The student.")
    group.add_argument("--teacher_model", default=os.path.join(DEMO_ROOT, "teacher"), help="Encodes the ad index.")
    add_model_safety_args(group)
    group = parser.add_argument_group("Export")
    group.add_argument("--quantize", type=boolean, nargs="?", const=True, default=True, help="Also write int8.")
    group.add_argument(
        "--int8_scheme",
        choices=["auto", *INT8_SCHEMES],
        default="auto",
        help="per_token: W8A8, int8 weights per output channel and activations per token (batch-independent); "
        "blockwise: 8-bit weights in blocks of 32; dynamic: activations per tensor, i.e. per batch (refused by the "
        "batch-dependence check); auto: the first of these that passes the gate.",
    )
    group.add_argument("--opset", type=positive_int, default=17)
    group.add_argument(
        "--calibration_texts",
        type=non_negative_int,
        default=512,
        help="per_token: smooth activations on this many ads of --corpus_file, encoded as queries (SmoothQuant); "
        "0: no smoothing. The gate's queries are never used for it.",
    )
    group = parser.add_argument_group("Parity gate")
    group.add_argument("--corpus_file", default=None, help="Ads (id, text); default: the built-in ads.")
    group.add_argument("--queries_file", default=None, help="Test queries (id, text).")
    group.add_argument("--qrels_file", default=None, help="Judgments; without: the overlap gate only.")
    group.add_argument("--id_column", default="id")
    group.add_argument("--text_column", default="text")
    group.add_argument("--ad_store", default=None, help="The teacher's ad store; built when missing.")
    group.add_argument("--store_dir", default=None, help="Where default stores go; default: <output_dir>/../stores.")
    group.add_argument("--encode_batch_size", type=positive_int, default=128)
    group.add_argument("--gate_k", type=positive_int, default=100)
    group.add_argument("--min_overlap", type=fraction, default=0.995, help="overlap@k with the fp32 student.")
    group.add_argument("--max_recall_drop", type=non_negative_float, default=0.5, help="recall@k points.")
    group.add_argument(
        "--max_batch_dependence",
        type=non_negative_float,
        default=1e-4,
        help="Largest 1 - cos between a query's vector alone and inside shuffled batches of 7 and 64 (a server "
        "batches requests as they come, so a query must not depend on its neighbours).",
    )
    group.add_argument(
        "--batch_dependence_queries", type=positive_int, default=256, help="Gate queries the check encodes."
    )
    group = parser.add_argument_group("Speed")
    group.add_argument("--speed_queries", type=non_negative_int, default=256, help="Queries timed; 0: skip.")
    group.add_argument("--batch_size", type=positive_int, default=64, help="Batched throughput at this size.")
    group = parser.add_argument_group("Output")
    group.add_argument("--output_dir", default=os.path.join(DEMO_ROOT, "student-serving"))
    group.add_argument("--overwrite_output_dir", action="store_true")
    return parse_with_config(parser, argv)


@torch.inference_mode()
def batch_dependence(encoder, texts, sizes=(7, 64), seed=0):
    """The largest 1 - cos over `texts` between a query's vector encoded alone and encoded inside a batch of each
    size in `sizes` (the texts shuffled, then cut into consecutive batches: neighbours of any length, as a server
    batches its requests). 0 up to float noise for a model whose ops treat rows independently; dynamic int8,
    which quantises each activation tensor with one scale, depends on the batch."""
    alone = np.concatenate([encoder(**encoder.tokenize([text], "query")).float().numpy() for text in texts])
    worst = 0.0
    for size in sizes:
        order = np.random.default_rng([seed, size]).permutation(len(texts))
        batched = np.zeros_like(alone)
        for start in range(0, len(texts), size):
            rows = order[start : start + size]
            batched[rows] = encoder(**encoder.tokenize([texts[i] for i in rows], "query")).float().numpy()
        cosine = (alone * batched).sum(1) / (np.linalg.norm(alone, axis=1) * np.linalg.norm(batched, axis=1))
        worst = max(worst, float((1 - cosine).max()))
    return worst


@torch.inference_mode()
def queries_per_second(encoder, texts, batch_size, count):
    """Queries per second over `count` queries in batches of `batch_size`, tokenisation included, after a
    warm-up batch (batch 1: one query at a time, as a serving request)."""
    texts = [texts[i % len(texts)] for i in range(max(count, batch_size))]
    encoder.encode(texts[:batch_size], "query", batch_size=batch_size)
    start = time.perf_counter()
    if batch_size == 1:
        for text in texts:
            encoder(**encoder.tokenize([text], "query"))
    else:
        encoder.encode(texts, "query", batch_size=batch_size)
    return len(texts) / (time.perf_counter() - start)


def calibration_batches(student, args, batch_size=64):
    """The first --calibration_texts ads of the corpus tokenised as queries, in batches (numpy arrays), for the
    per_token scheme's activation smoothing; None for 0."""
    ads = itertools.islice(iter_corpus(args.corpus_file, args.id_column, args.text_column), args.calibration_texts)
    texts = [text for _, text in ads]
    batches = [
        student.tokenize(texts[start : start + batch_size], "query") for start in range(0, len(texts), batch_size)
    ]
    return [{name: tensor.numpy() for name, tensor in batch.items()} for batch in batches] or None


def main(argv=None):
    args = parse_args(argv)
    demo = args.corpus_file is None and args.queries_file is None and args.qrels_file is None
    if not demo and (args.corpus_file is None or args.queries_file is None):
        raise UserError(
            "The parity gate needs --corpus_file and --queries_file (and --qrels_file for the recall check), or "
            "none of them for the built-in data."
        )
    if args.opset < MIN_OPSET:
        raise UserError(
            f"--opset {args.opset} cannot express the attention of transformers' models (scaled_dot_product_attention "
            f"needs opset {MIN_OPSET}); use --opset {MIN_OPSET} or later (default 17)."
        )
    args.resume_from_checkpoint = None
    inputs = [args.model_name_or_path, args.teacher_model, args.corpus_file, args.queries_file, args.qrels_file]
    check_output_dir(args, SCRIPT, inputs=[*inputs, args.ad_store])
    args.gradient_accumulation_steps, args.mixed_precision, args.report_to = 1, None, "none"
    accelerator = make_accelerator(args)
    if not accelerator.is_main_process:
        raise UserError("export.py runs in one process; start it with python, not accelerate launch.")
    lock_folder(args.output_dir, "the output folder")
    if demo:
        paths = demo_paths()
        args.corpus_file, args.queries_file, args.qrels_file = paths["ads"], paths["test_queries"], paths["qrels"]
    # ids and fingerprint streamed; the ads' texts are read only if the teacher's store must be built
    qrels = read_qrels(args.qrels_file) if args.qrels_file else None
    judged_ads = {doc for grades in (qrels or {}).values() for doc in grades}
    ads_fp, num_ads, known_ads = corpus_summary(args.corpus_file, args.id_column, args.text_column, judged_ads)
    query_ids, query_texts = read_texts(args.queries_file, args.id_column, args.text_column)
    if qrels is not None:
        check_judgments(qrels, args.qrels_file, query_ids, args.queries_file, known_ads, args.corpus_file)
    if args.gate_k > num_ads:
        raise UserError(f"--gate_k {args.gate_k} is more than the {num_ads} ads of {args.corpus_file}; lower it.")
    load = {"trust_remote_code": args.trust_remote_code, "allow_pickle": args.allow_pickle_weights}
    teacher_files = EncoderSpec.read(args.teacher_model, **load)
    student = Encoder.from_pretrained(args.model_name_or_path, dtype="float32", **load).eval()
    check_student_of(student, teacher_files, args.model_name_or_path)  # the gate searches the teacher's ad space

    # The export: the student's own folder, then its graphs, written into a staging folder first.
    staging = os.path.join(args.output_dir, STAGING)
    if os.path.exists(staging):
        shutil.rmtree(staging)
    student.save_pretrained(staging)
    os.makedirs(os.path.join(staging, "onnx"))
    fp32_path, int8_path = os.path.join(staging, "onnx", ONNX_FILE), os.path.join(staging, "onnx", INT8_FILE)
    logger.info(f"Exporting {args.model_name_or_path} to ONNX (opset {args.opset})")
    export_onnx(student, fp32_path, opset=args.opset)

    # The parity gate: every export searched against the teacher's ad index beside the fp32 student.
    store = open_or_build_store(
        accelerator,
        teacher_files,
        rows_of_corpus(args.corpus_file, args.id_column, args.text_column),  # read only if the store is built
        "ad",
        path=args.ad_store,
        store_dir=default_store_dir(args),
        model_path=args.teacher_model,
        batch_size=args.encode_batch_size,
        data_fp=ads_fp,
    )
    teacher_files.release()
    index = build_index(store_for_student(store, student), spec=IndexSpec(kind="auto", use_gpu=False))
    k = args.gate_k

    def score(encoder):
        """The encoder's vectors, top-k ad ids per query and recall@k (with judgments)."""
        vectors = encoder.encode(query_texts, "query", batch_size=args.encode_batch_size)
        _, rows = search(index, vectors, k)
        lists = store.ranked_ids(rows)
        entry = {}
        if qrels is not None:
            entry[f"recall@{k}"] = retrieval_metrics(dict(zip(query_ids, lists)), qrels, [k])[f"recall@{k}"]
        if args.speed_queries:
            with LoadProbe() as load:  # other work on the machine during the timings: recorded, flagged
                entry["qps_batch_1"] = queries_per_second(encoder, query_texts, 1, args.speed_queries)
                entry[f"qps_batch_{args.batch_size}"] = queries_per_second(
                    encoder, query_texts, args.batch_size, args.speed_queries
                )
            entry["other_load_cores"] = load.other_cores
            if load.other_cores is not None and load.other_cores > LoadProbe.FLAG_CORES:
                logger.warning(
                    f"Timed while other work kept {load.other_cores:.1f} cores of this machine busy: the queries per "
                    "second are lower than the model's; time again on an idle machine."
                )
        entry["batch_dependence"] = batch_dependence(encoder, query_texts[: args.batch_dependence_queries])
        return vectors, lists, entry

    base_vectors, base_lists, base = score(student)
    results = {"gate_k": k, "min_overlap": args.min_overlap, "max_recall_drop": args.max_recall_drop,
               "max_batch_dependence": args.max_batch_dependence,
               "device": f"{cpu_features()}, {torch.get_num_threads()} threads"}  # fmt: skip
    results["models"] = {"torch fp32": base}

    def gate(name, path):
        """Scores one export against the fp32 student; returns the failures (empty: it passes)."""
        vectors, lists, entry = score(OnnxEncoder(student, path))
        entry["file"], entry["bytes"] = os.path.relpath(path, staging), os.path.getsize(path)
        entry["max_abs_diff"] = float(np.abs(vectors - base_vectors).max())
        entry[f"overlap@{k}"] = overlap = overlap_at_k(lists, base_lists, k)
        for key in [key for key in entry if key.startswith("qps_")]:
            entry[f"speedup_{key[4:]}"] = entry[key] / base[key]
        failures = (
            [] if overlap >= args.min_overlap else [f"overlap@{k} {100 * overlap:.2f}% < {100 * args.min_overlap:.2f}%"]
        )
        if entry["batch_dependence"] > args.max_batch_dependence:
            failures.append(
                f"a query's vector depends on its batch (1 - cos up to {entry['batch_dependence']:.2e} > "
                f"{args.max_batch_dependence:g})"
            )
        if qrels is not None:
            entry["recall_drop_points"] = drop = 100 * (base[f"recall@{k}"] - entry[f"recall@{k}"])
            if drop > args.max_recall_drop:
                failures.append(f"recall@{k} {drop:.2f} points below fp32 (> {args.max_recall_drop})")
        results["models"][name] = entry
        logger.info(
            f"{name}: "
            + ", ".join(f"{key} {value:.4g}" for key, value in entry.items() if isinstance(value, float))
            + (f"; refused: {'; '.join(failures)}" if failures else "; passes the gate")
        )
        return [f"{name}: {failure}" for failure in failures]

    refusals = gate("onnx fp32", fp32_path)
    if args.quantize and not refusals:
        schemes = INT8_SCHEMES if args.int8_scheme == "auto" else [args.int8_scheme]
        calibration = calibration_batches(student, args) if "per_token" in schemes else None
        for scheme in schemes:  # the fastest scheme that passes the gate
            quantize_int8(fp32_path, int8_path, scheme, calibration=calibration)
            failures = gate(f"onnx int8 ({scheme})", int8_path)
            if not failures:
                results["int8_scheme"] = scheme
                break
            refusals += failures
        else:
            refusals.append("no int8 scheme passes")
        if "int8_scheme" in results:
            refusals = []  # an earlier scheme's refusal is superseded by the one that passed
    if refusals:
        shutil.rmtree(staging)
        raise UserError(
            "The export was refused by the parity gate: " + "; ".join(refusals) + ". Nothing was written; export "
            "without int8 (--quantize false) or loosen --min_overlap / --max_recall_drop / --max_batch_dependence "
            "knowingly."
        )
    results["passed_gate"] = True
    save_run_files(staging, args, SCRIPT, results)
    move_into_place(staging, args.output_dir, last="training_args.json")
    logger.info(f"Saved the student and its ONNX exports to {args.output_dir}")
    return results


if __name__ == "__main__":
    run_cli(main)
