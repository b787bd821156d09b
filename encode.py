"""Encode a corpus of ads (or a file of queries) with a model into an embedding store, once.

The other scripts build the stores they need when missing; this script does it ahead of time and on
all GPUs, which is what a large ad corpus wants: each process encodes its slice and writes its own
shard, then the store is renamed into place complete. The store records the model and data
fingerprints, so a later phase refuses it if either changed.

Single machine (the embedded default: the demo teacher's ad vectors):
    python encode.py
All GPUs of a machine, bf16:
    accelerate launch --config_file accelerate_configs/multi_gpu.yaml encode.py --model runs/teacher \
        --input_file ads.parquet --kind ad --store runs/stores/teacher-ads --per_device_batch_size 512
"""

import argparse
import os

from common.data import data_fingerprint, read_texts
from common.demo_data import DEMO_ROOT, demo_paths
from common.encoder import Encoder
from common.errors import UserError, run_cli
from common.store import build_store, default_store_path, store_for
from common.training import add_model_safety_args, logger, make_accelerator, parse_with_config


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=os.path.join(DEMO_ROOT, "teacher"), help="Model folder or hub id.")
    parser.add_argument("--input_file", default=None, help="Ads or queries (id, text); default: the built-in ads.")
    parser.add_argument("--split", default="train")
    parser.add_argument("--id_column", default="id")
    parser.add_argument("--text_column", default="text")
    parser.add_argument("--kind", choices=["ad", "query"], default="ad", help="Which prompt to encode with.")
    parser.add_argument("--store", default=None, help="Store folder; default: <store_dir>/<model>-<kind>-<fps>.")
    parser.add_argument("--store_dir", default=os.path.join(DEMO_ROOT, "stores"))
    parser.add_argument("--per_device_batch_size", type=int, default=128)
    parser.add_argument("--dtype", choices=["float32", "float16"], default="float32", help="Stored precision.")
    parser.add_argument(
        "--model_dtype",
        choices=["float32", "bfloat16", "float16"],
        default=None,
        help="Precision to run the model in (bfloat16 on GPUs); default: as saved.",
    )
    parser.add_argument("--overwrite", action="store_true", help="Rebuild a store that already exists.")
    parser.add_argument("--mixed_precision", default=None, choices=["no", "fp16", "bf16"])
    add_model_safety_args(parser)
    parser.add_argument("--output_dir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--report_to", default="none", help=argparse.SUPPRESS)
    return parse_with_config(parser, argv)


def main(argv=None):
    args = parse_args(argv)
    args.gradient_accumulation_steps = 1
    accelerator = make_accelerator(args)
    if args.input_file is None:
        with accelerator.main_process_first():
            args.input_file = demo_paths()["ads"]
    ids, texts = read_texts(args.input_file, args.id_column, args.text_column, split=args.split)
    encoder = Encoder.from_pretrained(
        args.model,
        dtype=args.model_dtype,
        trust_remote_code=args.trust_remote_code,
        allow_pickle=args.allow_pickle_weights,
    ).to(accelerator.device)
    data_fp = data_fingerprint(ids, texts)
    store_path = args.store or default_store_path(args.store_dir, args.model, args.kind, encoder, data_fp)
    exists = os.path.exists(os.path.join(store_path, "metadata.json"))
    if exists and not args.overwrite:
        store = store_for(accelerator, encoder, ids, texts, args.kind, store_path, data_fp=data_fp)  # refuses stale
        logger.info(f"{store_path} is current ({len(store)} vectors); pass --overwrite to rebuild it.")
        return store_path
    if len(texts) < accelerator.num_processes:
        raise UserError(f"{args.input_file} has fewer rows than processes; launch fewer processes.")
    store = build_store(
        accelerator, encoder, ids, texts, args.kind, store_path, args.per_device_batch_size, args.dtype, data_fp
    )
    logger.info(f"Wrote {len(store)} {args.kind} vectors ({store.dim}-d, {args.dtype}) to {store_path}")
    return store_path


if __name__ == "__main__":
    run_cli(main)
