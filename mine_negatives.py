"""Mine hard negatives for training queries: the ads a model ranks highest that are not the query's positive
and that pass a false-negative rule, written as a clicks file that train_teacher.py and refine_contrastive.py read.

For every click (query, positive ad), the ads are searched with the model (FAISS over its ad store, built once
when missing); among the top --top_k, a candidate is dropped when it
- is the positive itself (same id, or the same text),
- belongs to the positive's group (--group_column of the clicks against --ad_group_column of the ads), or
- scores too close to the positive: above s(q, p) - --margin (absolute), or above --relative_margin x s(q, p)
  (hard negatives mined with a fine-tuned model are often unlabelled positives: these rules are the usual
  guard, as in NV-Retriever's "positive-aware" mining);
the first --num_negatives that remain (after skipping the --skip_top highest) become the row's `negatives`
(texts) and `negative_ids`. mining_stats.json says how many candidates each rule removed.

Single machine (the embedded default: the demo teacher mining the demo clicks):
    python mine_negatives.py
Your data (then: train_teacher.py --train_file runs/mined/clicks.parquet --num_hard_negatives 7):
    python mine_negatives.py --model_name_or_path runs/teacher --train_file clicks.parquet \
        --corpus_file ads.parquet --ad_store runs/stores/teacher-ads --num_negatives 7 --margin 0.05 \
        --output_dir runs/mined
"""

import argparse
import json
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from common.args import add_model_safety_args, finite_float, fraction, non_negative_int, parse_with_config, positive_int
from common.data import (
    check_text,
    has_optional_column,
    load_table,
    optional_key,
    require_columns,
    scan_corpus,
    text_key,
)
from common.demo_data import DEMO_ROOT, demo_paths
from common.encoder import Encoder
from common.errors import UserError, run_cli
from common.retrieval import IndexSpec, build_index, search
from common.run_folder import STAGING, check_output_dir, lock_folder, move_into_place, save_run_files
from common.runtime import logger, make_accelerator
from common.store import default_store_dir, open_or_build_store, rows_of_corpus

SCRIPT = "mine_negatives.py"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    group = parser.add_argument_group("Model")
    group.add_argument("--model_name_or_path", default=os.path.join(DEMO_ROOT, "teacher"), help="The miner.")
    add_model_safety_args(group)
    group = parser.add_argument_group("Data")
    group.add_argument("--train_file", default=None, help="Clicks (query, positive[, positive_id, group]).")
    group.add_argument("--query_column", default="query")
    group.add_argument("--positive_column", default="positive")
    group.add_argument("--positive_id_column", default="positive_id", help="Optional; else positives match by text.")
    group.add_argument("--group_column", default="group", help="Optional ad group of the positive.")
    group.add_argument("--corpus_file", default=None, help="Ads (id, text[, group]); default: the built-in ads.")
    group.add_argument("--id_column", default="id")
    group.add_argument("--text_column", default="text")
    group.add_argument("--ad_group_column", default="group", help="Optional ad group of each ad.")
    group.add_argument("--ad_store", default=None, help="The model's ad store; built when missing.")
    group.add_argument("--store_dir", default=None, help="Where default stores go; default: <output_dir>/../stores.")
    group.add_argument("--encode_batch_size", type=positive_int, default=128)
    group = parser.add_argument_group("Mining")
    group.add_argument("--num_negatives", type=positive_int, default=7)
    group.add_argument("--top_k", type=positive_int, default=100, help="Candidates searched per query.")
    group.add_argument("--skip_top", type=non_negative_int, default=0, help="Highest-ranked candidates skipped.")
    group.add_argument(
        "--margin", type=finite_float, default=0.0, help="Drop candidates scoring above s(q, positive) - margin."
    )
    group.add_argument(
        "--relative_margin",
        type=fraction,
        default=None,
        help="Drop candidates scoring above this fraction of s(q, positive) (e.g. 0.95), besides --margin.",
    )
    group.add_argument("--index", choices=["auto", "flat", "sharded", "ivf", "hnsw"], default="auto")
    group = parser.add_argument_group("Output")
    group.add_argument("--output_dir", default=os.path.join(DEMO_ROOT, "mined"))
    group.add_argument("--overwrite_output_dir", action="store_true")
    return parse_with_config(parser, argv)


def read_clicks(args):
    table = load_table(args.train_file)
    require_columns(table, [args.query_column, args.positive_column], args.train_file)
    queries = [check_text(v, args.train_file, row, args.query_column) for row, v in enumerate(table[args.query_column])]
    positives = [
        check_text(v, args.train_file, row, args.positive_column) for row, v in enumerate(table[args.positive_column])
    ]
    optional = {}
    for name, column, default, flag in (
        ("positive_ids", args.positive_id_column, "positive_id", "--positive_id_column"),
        ("groups", args.group_column, "group", "--group_column"),
    ):
        present = has_optional_column(table, column, default, args.train_file, flag)
        optional[name] = [optional_key(value) for value in table[column]] if present else None
    return table, queries, positives, optional["positive_ids"], optional["groups"]


def main(argv=None):
    args = parse_args(argv)
    if args.train_file is None and args.corpus_file is None:
        paths = demo_paths()
        args.train_file, args.corpus_file = paths["train"], paths["ads"]
    elif args.train_file is None or args.corpus_file is None:
        raise UserError("Pass both --train_file and --corpus_file, or neither for the built-in data.")
    if args.num_negatives > args.top_k:  # every row would come back short, silently
        raise UserError(
            f"--num_negatives {args.num_negatives} is more than the --top_k {args.top_k} candidates searched per "
            "query; raise --top_k or lower --num_negatives."
        )
    args.resume_from_checkpoint = None
    check_output_dir(args, SCRIPT, inputs=[args.model_name_or_path, args.train_file, args.corpus_file, args.ad_store])
    args.gradient_accumulation_steps, args.mixed_precision, args.report_to = 1, None, "none"
    accelerator = make_accelerator(args)
    if not accelerator.is_main_process:
        raise UserError("mine_negatives.py runs in one process; start it with python, not accelerate launch.")
    lock_folder(args.output_dir, "the output folder")

    table, queries, positives, positive_ids, groups = read_clicks(args)
    ad_ids, ads_fp = scan_corpus(args.corpus_file, args.id_column, args.text_column)
    spec = IndexSpec(kind=args.index, use_gpu=torch.cuda.is_available())
    spec.check(len(ad_ids), args.top_k + args.skip_top)
    corpus = load_table(args.corpus_file)
    ad_groups = None
    if has_optional_column(corpus, args.ad_group_column, "group", args.corpus_file, "--ad_group_column"):
        ad_groups = [optional_key(value) for value in corpus[args.ad_group_column]]
    if (groups is None) != (ad_groups is None):  # one side only: the same-group rule cannot apply
        given, missing = ("clicks", "ads") if ad_groups is None else ("ads", "clicks")
        logger.warning(
            f"The {given} have groups but the {missing} have none, so the same-group rule is off; name the "
            f"{missing}' group column with {'--ad_group_column' if missing == 'ads' else '--group_column'}."
        )
    model = Encoder.from_pretrained(
        args.model_name_or_path, trust_remote_code=args.trust_remote_code, allow_pickle=args.allow_pickle_weights
    ).to(accelerator.device)
    store = open_or_build_store(
        accelerator,
        model,
        rows_of_corpus(args.corpus_file, args.id_column, args.text_column),  # read only if the store is built
        "ad",
        path=args.ad_store,
        store_dir=default_store_dir(args),
        model_path=args.model_name_or_path,
        batch_size=args.encode_batch_size,
        data_fp=ads_fp,
    )
    index = build_index(store, spec=spec)
    device = accelerator.device
    query_vectors = model.encode(queries, "query", batch_size=args.encode_batch_size, device=device, progress=True)
    positive_vectors = model.encode(positives, "ad", batch_size=args.encode_batch_size, device=device, progress=True)
    positive_scores = np.einsum("ij,ij->i", query_vectors, positive_vectors)
    scores, rows = search(index, query_vectors, args.top_k + args.skip_top)

    # The rules, in order; each candidate is counted under the first rule that removes it.
    removed = {"positive (same id or text)": 0, "same group": 0, "margin": 0, "skipped (--skip_top)": 0}
    negatives, negative_ids, short_rows = [], [], 0
    ad_text_of = {}  # only the texts of kept negatives are read, row by row from the memory-mapped table
    for row_index in range(len(queries)):
        positive_key = text_key(positives[row_index])
        limit = positive_scores[row_index] - args.margin
        if args.relative_margin is not None:
            limit = min(limit, args.relative_margin * positive_scores[row_index])
        kept, skipped = [], 0
        for score, ad_row in zip(scores[row_index], rows[row_index]):
            if ad_row < 0 or len(kept) == args.num_negatives:
                break
            ad_id = ad_ids[ad_row]
            if ad_row not in ad_text_of:
                ad_text_of[ad_row] = corpus[int(ad_row)][args.text_column]
            if (positive_ids and ad_id == positive_ids[row_index]) or text_key(ad_text_of[ad_row]) == positive_key:
                removed["positive (same id or text)"] += 1
            elif groups and ad_groups and groups[row_index] is not None and ad_groups[ad_row] == groups[row_index]:
                removed["same group"] += 1
            elif score > limit:
                removed["margin"] += 1
            elif skipped < args.skip_top:
                skipped += 1
                removed["skipped (--skip_top)"] += 1
            else:
                kept.append(ad_row)
        short_rows += len(kept) < args.num_negatives
        negatives.append([ad_text_of[ad_row] for ad_row in kept])
        negative_ids.append([ad_ids[ad_row] for ad_row in kept])

    kept_total = sum(len(row) for row in negatives)
    stats = {
        "rows": len(queries),
        "candidates_examined": kept_total + sum(removed.values()),
        "removed": removed,
        "negatives_kept": kept_total,
        "rows_with_fewer_than_num_negatives": short_rows,
        "mean_positive_score": float(np.mean(positive_scores)),
        "same_group_rule": bool(groups and ad_groups),
    }
    logger.info(
        f"Mined {kept_total} negatives for {len(queries)} clicks; removed "
        + ", ".join(f"{count} as {rule}" for rule, count in removed.items())
        + f"; {short_rows} rows got fewer than {args.num_negatives}"
    )
    staging = os.path.join(args.output_dir, STAGING)
    if os.path.exists(staging):
        shutil.rmtree(staging)
    os.makedirs(staging)
    mined = table.remove_columns([name for name in ("negatives", "negative_ids") if name in table.column_names])
    arrow = mined.data.table  # the pyarrow table behind the datasets.Dataset
    arrow = arrow.append_column("negatives", pa.array(negatives, type=pa.list_(pa.string())))
    arrow = arrow.append_column("negative_ids", pa.array(negative_ids, type=pa.list_(pa.string())))
    pq.write_table(arrow, os.path.join(staging, "clicks.parquet"))
    with open(os.path.join(staging, "mining_stats.json"), "w", encoding="utf-8") as handle:
        json.dump(stats, handle, indent=2)
    save_run_files(staging, args, SCRIPT, stats)
    move_into_place(staging, args.output_dir, last="training_args.json")
    logger.info(f"Wrote {os.path.join(args.output_dir, 'clicks.parquet')}")
    return stats


if __name__ == "__main__":
    run_cli(main)
