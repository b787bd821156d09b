"""Encode a corpus of ads (or a file of queries) with a model into an embedding store, once.

The other scripts build the stores they need when missing; this script does it ahead of time and on
all GPUs, which is what a large ad corpus wants: the rows are streamed from the file, each process encodes its
share of the chunks and writes each chunk when whole, so memory stays at one chunk and a killed run resumes at
the first missing chunk when started again with the same flags (common/store.py). The store records the model
and data fingerprints, so a later phase refuses it if either changed.

Single machine (the embedded default: the demo teacher's ad vectors):
    python encode.py
All GPUs of a machine, bf16 (ads; then the label-free queries for distill_student.py --teacher_query_store):
    accelerate launch --config_file accelerate_configs/multi_gpu.yaml encode.py --model_name_or_path runs/teacher \
        --input_file ads.parquet --kind ad --output_dir runs/stores/teacher-ads --encode_batch_size 512
    accelerate launch --config_file accelerate_configs/multi_gpu.yaml encode.py --model_name_or_path runs/teacher \
        --input_file logged_queries.parquet --kind query --text_column query --output_dir runs/stores/teacher-queries
Query files without an id column are numbered by row, as distill_student.py numbers them, so the
store above is the one distill_student.py expects for that file. With teacher-only context, pass the same
--query_context_column (and --context_template) to both.
"""

import argparse
import hashlib
import os
import shutil

from common.args import (
    add_context_args,
    add_model_safety_args,
    add_stream_filter_args,
    check_stream_filters_need_streaming,
    parse_with_config,
    positive_int,
)
from common.data import fingerprint_row, read_contexts, with_context
from common.demo_data import DEMO_ROOT, demo_paths
from common.encoder import Encoder
from common.errors import UserError, run_cli
from common.runtime import logger, make_accelerator
from common.store import (
    EmbeddingStore,
    build_store,
    check_store_matches,
    check_store_path,
    default_store_path,
    rows_of_corpus,
    shared_decision,
)
from common.streaming import TextStream, open_or_build_stream_store


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    group = parser.add_argument_group("Model")
    group.add_argument(
        "--model_name_or_path",
        "--teacher_model",
        dest="model_name_or_path",
        default=os.path.join(DEMO_ROOT, "teacher"),
        help="Model folder or hub id (the teacher).",
    )
    group.add_argument(
        "--model_dtype",
        choices=["float32", "bfloat16", "float16"],
        default=None,
        help="Precision to run the model in (bfloat16 on GPUs); default: as saved.",
    )
    group.add_argument("--mixed_precision", default=None, choices=["no", "fp16", "bf16"])
    add_model_safety_args(group)
    group = parser.add_argument_group("Data")
    group.add_argument("--input_file", default=None, help="Ads or queries; default: the built-in ads.")
    group.add_argument("--split", default="train")
    group.add_argument("--id_column", default="id", help="Required for ads; query files without it use row numbers.")
    group.add_argument("--text_column", default="text")
    group.add_argument("--kind", choices=["ad", "query"], default="ad", help="Which prompt to encode with.")
    add_context_args(group, where="--input_file (--kind query; the teacher's targets for distill_student.py)")
    group.add_argument("--encode_batch_size", type=positive_int, default=128, help="Per process.")
    group.add_argument(
        "--streaming",
        action="store_true",
        help="Queries at the scale of logged traffic: read --input_file (a file, a folder or glob of shards, or a hub "
        "id) as a stream and write a chunked store (chunks of --chunk_rows rows, each process its share; a killed "
        "run resumes at the first missing chunk when started again with the same flags), which distill_student.py "
        "--streaming reads.",
    )
    add_stream_filter_args(group)
    group = parser.add_argument_group("Output")
    group.add_argument(
        "--output_dir",
        "--store",
        dest="output_dir",
        default=None,
        help="The store folder; default: <store_dir>/<model>-<kind>-<model fp>-<data fp>.",
    )
    group.add_argument("--store_dir", default=os.path.join(DEMO_ROOT, "stores"), help="Where default stores go.")
    group.add_argument("--dtype", choices=["float32", "float16"], default="float32", help="Stored precision.")
    group.add_argument("--overwrite_output_dir", action="store_true", help="Rebuild a store that already exists.")
    parser.add_argument("--report_to", default="none", help=argparse.SUPPRESS)
    return parse_with_config(parser, argv)


def main(argv=None):
    args = parse_args(argv)
    accelerator = make_accelerator(args)
    if args.input_file is None:
        with accelerator.main_process_first():
            args.input_file = demo_paths()["ads"]
    if args.query_context_column and args.kind != "query":
        raise UserError("--query_context_column is the teacher's context of queries; use it with --kind query.")
    check_stream_filters_need_streaming(args)
    if args.output_dir:
        check_store_path(args.output_dir)  # before any data is read
    if args.streaming:
        return encode_stream(args, accelerator)
    # The rows are streamed from the file in batches (a fingerprint pass, then the build): no text is held whole.
    ids_optional = args.kind == "query"
    rows = rows_of_corpus(args.input_file, args.id_column, args.text_column, args.split, ids_optional)
    if args.query_context_column:  # as distill_student.py composes them, so it finds this store current
        rows = rows_with_context(args, rows)
    data_fp = data_fingerprint_of(rows)
    encoder = load_encoder(args, accelerator)
    store_path = args.output_dir or default_store_path(
        args.store_dir, args.model_name_or_path, args.kind, encoder, data_fp
    )
    exists = shared_decision(accelerator, os.path.exists(os.path.join(store_path, "metadata.json")))  # one for all
    if exists and not args.overwrite_output_dir:
        store = EmbeddingStore.open(store_path, encoder.fingerprint, data_fp, encoder.embedding_dim, kind=args.kind)
        check_store_matches(store, encoder, args.kind)
        logger.info(f"{store_path} is current ({len(store)} vectors); pass --overwrite_output_dir to rebuild it.")
        return store_path
    if args.overwrite_output_dir and exists:
        remove_store(accelerator, store_path)
    store = build_store(
        accelerator, encoder, rows, args.kind, store_path, batch_size=args.encode_batch_size, dtype=args.dtype,
        chunk_rows=args.chunk_rows, data_fp=data_fp,
    )  # fmt: skip
    logger.info(f"Wrote {len(store)} {args.kind} vectors ({store.dim}-d, {args.dtype}) to {store_path}")
    return store_path


def rows_with_context(args, rows):
    """The rows with what the teacher reads: each query with its teacher-only context."""

    def with_contexts():
        contexts = iter(read_contexts(args.input_file, args.query_context_column, args.split))
        for item_id, text, _ in rows():
            yield item_id, text, with_context(text, next(contexts), args.context_template)

    return with_contexts


def data_fingerprint_of(rows):
    """data_fingerprint over (id, what the model encodes) of the rows, in one streamed pass."""
    digest = hashlib.sha256()
    for item_id, _, encoded in rows():
        fingerprint_row(digest, item_id, encoded)
    return digest.hexdigest()


def remove_store(accelerator, store_path):
    """--overwrite_output_dir on a finished store: its files go (the folder is recognisably a store: checked by
    EmbeddingStore.open before), then the build starts afresh."""
    EmbeddingStore.open(store_path)
    if accelerator.is_main_process:
        for name in os.listdir(store_path):
            path = os.path.join(store_path, name)
            if name != ".lock":
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    accelerator.wait_for_everyone()


def load_encoder(args, accelerator):
    return Encoder.from_pretrained(
        args.model_name_or_path,
        dtype=args.model_dtype,
        trust_remote_code=args.trust_remote_code,
        allow_pickle=args.allow_pickle_weights,
    ).to(accelerator.device)


def encode_stream(args, accelerator):
    """--streaming: the store of the query stream (with its texts), built or its build resumed (finished: checked)."""
    if args.kind != "query":
        raise UserError("--streaming writes query stores for distill_student.py --streaming; use --kind query.")
    if args.overwrite_output_dir:
        raise UserError(
            "--overwrite_output_dir does not apply to a streamed store (a killed build resumes); pass another "
            "--output_dir."
        )
    encoder = load_encoder(args, accelerator)
    stream = TextStream(
        args.input_file,
        args.text_column,
        args.split,
        context_column=args.query_context_column,
        context_template=args.context_template,
        min_chars=args.min_query_chars,
        max_chars=args.max_query_chars,
        dedupe_capacity=args.dedupe_capacity,
    )
    store = open_or_build_stream_store(
        accelerator, encoder, stream, args.output_dir, args.store_dir, args.model_name_or_path, args.chunk_rows,
        args.encode_batch_size, dtype=args.dtype,
    ).store  # fmt: skip
    stats = store.metadata.get("description", {}).get("stream_stats", {})
    logger.info(
        f"{store.folder}: {len(store)} query vectors in {len(store.parts)} chunks ({store.dim}-d, "
        f"{store.metadata['dtype']}); rows read {stats.get('read')}, dropped: too short {stats.get('too_short')}, "
        f"too long {stats.get('too_long')}, duplicates {stats.get('duplicate')}"
    )
    return store.folder


if __name__ == "__main__":
    run_cli(main)
