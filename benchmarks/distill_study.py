"""Study: how much of the teacher a small student keeps, per phase-2 recipe, on real collections.

The setting (the reference budget of issue 8): teacher all-MiniLM-L6-v2 (real weights, untuned,
symmetric); students are K of its 6 layers; one pass over ~30k label-free texts at batch 64 (about 470
optimiser steps); each student's query vectors are searched against the teacher's document vectors, as
in serving. The evaluation queries and judgments are never used for training.

Label-free text (written under --output_dir, never into the repository):
- general text, shared by all collections: the English Wikipedia articles and the Lee news corpus that
  ship in the `gensim` wheel (gensim/test/test_data), split into sentences of 6 to 60 words (~20k);
- document-side text, per collection: each document's title and its sentences of 4 words or more
  (`sentences`), and for the recipes marked `docs` also every whole document (`sentences+documents`).
Texts are shuffled together; the teacher's vectors of each file are encoded once into a store. Recipes
with `kl-ads` also rank the teacher's document vectors (the index the student is served against; the
`--ad_store` of distill_student.py); `+refine` adds refine_contrastive.py on pseudo-clicks (each
document's first sentence or title -> that document).

For every collection in --data_root (folders with corpus.jsonl, queries.jsonl, qrels.tsv; by default
../shared/data) and every recipe in --recipes, this trains the student with `distill_student.py` (and
`refine_contrastive.py` for refined recipes), then prints one table: nDCG@10 and R@100, recovery of the
teacher's value (mean and spread over --seeds, each trained recipe once per seed; a 95% bootstrap interval over
queries of one seed), overlap@10 with the teacher's top 10,
p50 latency at batch 1, parameters and training time; then the mean recovery of each recipe over the
collections, and the leave-one-collection-out selection. Rows accumulate in --results_file
(benchmarks/results/distill_study_rows.jsonl, in the repository) across runs: a row already there is kept
and not measured again unless --retrain, so the study can be run a few recipes, collections or seeds at a
time, and a stopped run resumes where it stopped.

    pip install gensim                                        # the general text
    python benchmarks/distill_study.py                        # every recipe, every collection
    python benchmarks/distill_study.py --recipes l2-2 cut-2 --collections med
    python benchmarks/distill_study.py --list                 # the recipes and their flags
    python benchmarks/distill_study.py --table                # the table of the rows measured so far
"""

import argparse
import bz2
import json
import os
import random
import re
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import distill_student  # noqa: E402
import encode  # noqa: E402
import evaluate  # noqa: E402  (the repository's evaluate.py)
import refine_contrastive  # noqa: E402
from common.data import iter_corpus, read_qrels  # noqa: E402
from common.demo_data import demo_base_model  # noqa: E402
from common.encoder import Encoder  # noqa: E402
from common.errors import UserError  # noqa: E402
from common.retrieval import (  # noqa: E402
    bootstrap_ratio_interval,
    build_index,
    overlap_at_k,
    per_query_metrics,
    search,
)
from common.store import EmbeddingStore  # noqa: E402
from common.surgery import evenly_spaced_layers, keep_layers, truncate_output  # noqa: E402


@dataclass
class Recipe:
    """One row of the study. layers: teacher layers kept (None: the teacher itself); distill: flags of
    distill_student.py (None: no training); refine: flags of refine_contrastive.py on the collection's
    pseudo-clicks (None: no phase 3), starting from the student of recipe `base`; dim: Matryoshka width;
    text: the document-side label-free text (`sentences`, or `sentences+documents`: also whole documents)."""

    layers: int | None = None
    distill: list | None = None
    refine: list | None = None
    base: str | None = None
    dim: int | None = None
    text: str = "sentences"

    def describe(self):
        parts = ["teacher" if self.layers is None else f"{self.layers} layers"]
        parts += [f"distill_student.py {' '.join(self.distill)}".strip()] if self.distill is not None else []
        parts += (
            [f"refine_contrastive.py (from {self.base}) {' '.join(self.refine)}".strip()]
            if self.refine is not None
            else []
        )
        parts += [f"{self.dim}-d"] if self.dim else []
        parts += [f"document-side text: {self.text}"] if self.distill is not None else []
        return ", ".join(parts)


# What distill_student.py does by default when it is given the teacher's ads (see its --help).
BEST = ["--learning_rate", "1e-3", "--alignment_loss", "l2+kl", "--ad_store", "{document_store}"]
DOCS = "sentences+documents"
OLD = ["--learning_rate", "2e-4"]  # distill_student.py's learning rate before this study

# The candidates of issue 21 in each protocol, by blocks: distill_student.py's old default (progressive from
# min(2K, depth) teacher layers pruned by block influence; pinned, so that its rows keep their meaning after
# the default changed to `fromteacher` for a teacher of at most 3K layers), the same keeping the first and
# last blocks or
# ranking blocks by norm ratio, the one-shot cut of K evenly spaced layers at the default learning rate and
# at the old 2e-4.
# Without ads, also the one-shot cut with the kl objective over the teacher's vectors of the label-free texts
# (--kl_ranks texts: 1024 of them drawn per step), the label-free stand-in for ranking the ads.
CANDIDATES = {
    "default": ["--progressive_from", "{old_auto}"],
    "firstlast": ["--progressive_from", "{old_auto}", "--layer_importance", "first_last"],
    "normratio": ["--progressive_from", "{old_auto}", "--layer_importance", "norm_ratio"],
    "cut": [],
    "cut-lr2e-4": OLD,
    # The whole 6-layer teacher pruned to K blocks by block influence, one stage with the whole budget: the
    # old default's pruning without its first stage (for 3 blocks this is the old default itself); the
    # default of distill_student.py since this study.
    "fromteacher": ["--progressive_from", "6"],
}
PROTOCOL_CANDIDATES = {
    "noads": {**CANDIDATES, "cut-kltexts": ["--alignment_loss", "l2+kl", "--kl_ranks", "texts"]},
    "ads": CANDIDATES,
}


def protocol_recipes():
    recipes = {}
    for protocol, extra, text in (("noads", [], "sentences"), ("ads", ["--ad_store", "{document_store}"], DOCS)):
        for blocks in (2, 3):

            def pinned(flags, blocks=blocks):  # the old `auto` of the 6-layer teacher: min(2K, depth)
                return [str(min(2 * blocks, 6)) if flag == "{old_auto}" else flag for flag in flags]

            for name, flags in PROTOCOL_CANDIDATES[protocol].items():
                recipes[f"{protocol}-{name}-{blocks}"] = Recipe(blocks, [*pinned(flags), *extra], text=text)
            for name in ("default", "cut", "fromteacher"):  # phase 3 on pseudo-clicks (no clicks) after a schedule
                recipes[f"{protocol}-{name}-{blocks}+refine"] = Recipe(
                    blocks,
                    [*pinned(CANDIDATES[name]), *extra],
                    refine=[],
                    base=f"{protocol}-{name}-{blocks}",
                    text=text,
                )
    return recipes


def pseudo_queries(documents_file):
    """Phase 3's pseudo-clicks: each document's first sentence, or its first words (refine_contrastive.py's
    --pseudo_query_words) where no document has a sentence end (NPL's texts are unpunctuated)."""
    try:
        refine_contrastive.pseudo_clicks(iter_corpus(documents_file, "id", "text"))
        return "first_sentence"
    except UserError:
        return "first_words"


# One pass over the label-free texts at batch 64 for every trained student (the reference budget).
RECIPES = {
    "cut-2": Recipe(2),
    # the learning rate and the batches (l2 on titles and sentences)
    "l2-2-lr2e-4-ungrouped": Recipe(2, [*OLD, "--group_by_length", "false"]),
    "l2-2-lr2e-4": Recipe(2, OLD),
    "l2-2-lr2e-4-frozen": Recipe(2, [*OLD, "--freeze_embeddings"]),
    "l2-2-lr5e-4": Recipe(2, ["--learning_rate", "5e-4"]),
    "l2-2-lr1e-3": Recipe(2, ["--learning_rate", "1e-3"]),
    "tok-2-lr1e-3": Recipe(2, ["--learning_rate", "1e-3", "--token_loss_weight", "1"]),
    # + whole documents among the label-free text
    "l2-2-lr1e-3-docs": Recipe(2, ["--learning_rate", "1e-3"], text=DOCS),
    "l2-2-lr2e-3-docs": Recipe(2, ["--learning_rate", "2e-3"], text=DOCS),
    # + the teacher's ranking of its document vectors (kl over 1024 of them per step)
    "l2+kl-ads-2-lr1e-3-docs": Recipe(2, BEST, text=DOCS),
    "l2+4kl-ads-2-lr1e-3-docs": Recipe(
        2, ["--learning_rate", "1e-3", "--alignment_loss", "l2+4*kl", "--ad_store", "{document_store}"], text=DOCS
    ),
    "kl-ads-2-lr1e-3-docs": Recipe(
        2, ["--learning_rate", "1e-3", "--alignment_loss", "kl", "--ad_store", "{document_store}"], text=DOCS
    ),
    "kernel-2-lr1e-3-docs": Recipe(2, ["--learning_rate", "1e-3", "--alignment_loss", "l2+kernel"], text=DOCS),
    # + refinement on pseudo-clicks (each document's first sentence or title -> the document)
    "l2+kl-ads-2-lr1e-3-docs+refine": Recipe(2, BEST, refine=[], base="l2+kl-ads-2-lr1e-3-docs", text=DOCS),
    # a Matryoshka width: the teacher's first 192 of 384 coordinates
    "teacher-192": Recipe(None, dim=192),
    "l2+kl-ads-2-lr1e-3-docs-192": Recipe(2, [*BEST, "--teacher_dim", "192"], dim=192, text=DOCS),
    # Progressive pruning at the compute of one pass of the 2-layer student: a 4-layer stage costs twice a
    # 2-layer one, so each stage gets 1/3 of a pass (4/3 + 2/3 = 2 units).
    "prune-4-2-firstlast-best": Recipe(
        4,
        [*BEST, "--prune_schedule", "2", "--num_train_epochs", "0.3334", "--layer_importance", "first_last"],
        text=DOCS,
    ),
    "prune-4-2-best": Recipe(4, [*BEST, "--prune_schedule", "2", "--num_train_epochs", "0.3334"], text=DOCS),
    # From the whole (aligned) teacher: 6 -> 4 -> 2 blocks, 1/3 of a pass per stage (4/3 + 2/3 = 2 units).
    "prune-6-4-2-best": Recipe(6, [*BEST, "--prune_schedule", "4,2", "--num_train_epochs", "0.3334"], text=DOCS),
    # Attention against MLP at equal size: 3 blocks with half of their FFN units (3 x (4 + 4) d^2 weights)
    # against 2 whole blocks (2 x (4 + 8) d^2), pruned from the teacher once, one pass.
    "prune-6-3-ffn0.5-best": Recipe(6, [*BEST, "--prune_schedule", "3", "--ffn_keep_ratio", "0.5"], text=DOCS),
    # distill_student.py's default for a cut of K layers: progressive from min(2K, depth) teacher layers
    # (2 blocks: 4 -> 2 as prune-4-2-best; 3 blocks: the whole 6-layer teacher pruned to 3, one stage, one pass),
    # and the whole recipe with phase 3 on pseudo-clicks.
    "prune-4-2-best+refine": Recipe(
        4, [*BEST, "--prune_schedule", "2", "--num_train_epochs", "0.3334"], refine=[], base="prune-4-2-best", text=DOCS
    ),
    "prune-6-3-best": Recipe(6, [*BEST, "--prune_schedule", "3"], text=DOCS),
    "prune-6-3-best+refine": Recipe(6, [*BEST, "--prune_schedule", "3"], refine=[], base="prune-6-3-best", text=DOCS),
    # The whole 3-block recipe inside the reference budget's optimiser steps: phase 2 on 0.95 of a pass (~450
    # steps) plus phase 3's ~20 steps on pseudo-clicks.
    "prune-6-3-best-0.95": Recipe(6, [*BEST, "--prune_schedule", "3", "--num_train_epochs", "0.95"], text=DOCS),
    "prune-6-3-best-0.95+refine": Recipe(
        6,
        [*BEST, "--prune_schedule", "3", "--num_train_epochs", "0.95"],
        refine=[],
        base="prune-6-3-best-0.95",
        text=DOCS,
    ),
    # Issue 21: the two protocols, every row with seeds. noads: general text + the collection's titles and
    # sentences, no ad corpus, so the objective is L2 alone (the paper's phase 2); ads: + whole documents, and
    # the documents as the ad corpus (the default objective is then L2 + KL over the teacher's ad vectors).
    **protocol_recipes(),
    # 3 layers
    "cut-3": Recipe(3),
    "l2+kl-ads-3-lr1e-3-docs": Recipe(3, BEST, text=DOCS),
    "l2+kl-ads-3-lr1e-3-docs+refine": Recipe(3, BEST, refine=[], base="l2+kl-ads-3-lr1e-3-docs", text=DOCS),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data_root", default=os.path.join(ROOT, "..", "shared", "data"))
    parser.add_argument("--collections", nargs="+", default=None, help="Folder names; default: all found.")
    parser.add_argument("--recipes", nargs="+", default=None, help="Recipe names; default: all.")
    parser.add_argument("--list", action="store_true", help="Print the recipes and exit.")
    parser.add_argument(
        "--table", action="store_true", help="Print the table of the rows in --results_file and exit (no training)."
    )
    parser.add_argument("--latency_queries", type=int, default=200)
    parser.add_argument("--bootstrap_samples", type=int, default=2000)
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[0, 1, 2], help="Each trained recipe runs once per seed (--seed)."
    )
    parser.add_argument("--output_dir", default=os.path.join(ROOT, "outputs", "benchmarks", "distill_study"))
    parser.add_argument(
        "--results_file",
        default=os.path.join(ROOT, "benchmarks", "results", "distill_study_rows.jsonl"),
        help="The measured rows, kept in the repository so that the study can go on over several sessions: a "
        "(collection, recipe, seed) already there is not measured again (see --retrain).",
    )
    parser.add_argument(
        "--retrain",
        action="store_true",
        help="Measure every row again and train every student again (default: a row in --results_file is kept, "
        "and a student an earlier run in --output_dir finished is re-scored).",
    )
    args = parser.parse_args(argv)
    unknown = sorted(set(args.recipes or []) - set(RECIPES))
    if unknown:
        parser.error(f"unknown recipes {unknown}; known: {', '.join(RECIPES)}")
    return args


def split_sentences(text, min_words, max_words=10**9):
    sentences = re.split(r"(?<=[.?!])\s+", text)
    return [s.strip() for s in sentences if min_words <= len(s.split()) <= max_words]


def general_text():
    """Wikipedia and news sentences from gensim's test data (real text that installs from PyPI)."""
    try:
        import gensim
        from gensim.corpora.wikicorpus import extract_pages, filter_wiki
    except ImportError:
        sys.exit("The general text comes from the gensim wheel: pip install gensim")
    data = os.path.join(os.path.dirname(gensim.__file__), "test", "test_data")
    texts = []
    wiki = os.path.join(data, "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2")
    with bz2.open(wiki) as dump:
        for _, markup, _ in extract_pages(dump):
            if markup.lower().startswith("#redirect"):
                continue
            for paragraph in filter_wiki(markup).replace("'''", "").replace("''", "").split("\n"):
                paragraph = paragraph.strip()
                if paragraph and not paragraph.startswith(("*", "|", "!", "{", "=", ":", ";")):
                    texts += [s for s in split_sentences(paragraph, 6, 60) if s[-1] in ".?!"]
    with open(os.path.join(data, "lee_background.cor"), encoding="utf-8") as handle:
        for line in handle:
            texts += split_sentences(line, 6, 60)
    return texts


def write_jsonl(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")


# Document-side texts per collection at most (a seeded sample of the larger collections), so that every
# collection's pass is ~30k texts with the ~20k general ones: the reference budget (CISI and MED are below).
MAX_DOCUMENT_SIDE_TEXTS = 10_000


def prepare_collection(collection_dir, work_dir):
    """Documents (title. text) for the teacher's index, and two sets of document-side label-free text:
    `sentences` (titles and sentences) and `documents` (the same plus every whole document)."""
    documents, sentences = [], []
    with open(os.path.join(collection_dir, "corpus.jsonl"), encoding="utf-8") as handle:
        for line in handle:
            doc = json.loads(line)
            title = (doc.get("title") or "").strip()
            documents.append({"id": doc["id"], "text": f"{title}. {doc['text']}" if title else doc["text"]})
            sentences += ([title] if title else []) + split_sentences(doc["text"], 4)
    paths = {
        "documents": os.path.join(work_dir, "documents.jsonl"),
        "sentences": os.path.join(work_dir, "document_text.jsonl"),
        "sentences+documents": os.path.join(work_dir, "document_text_and_documents.jsonl"),
        "queries": os.path.join(collection_dir, "queries.jsonl"),
        "qrels": os.path.join(collection_dir, "qrels.tsv"),
    }
    write_jsonl(paths["documents"], documents)
    with_documents = sentences + [doc["text"] for doc in documents]
    for key, texts in (("sentences", sentences), ("sentences+documents", with_documents)):
        random.Random(0).shuffle(texts)
        write_jsonl(paths[key], ({"query": text} for text in texts[:MAX_DOCUMENT_SIDE_TEXTS]))
    return paths


def encode_store(model, input_file, kind, path, text_column):
    if not os.path.exists(os.path.join(path, "metadata.json")):
        encode.main(["--model_name_or_path", model, "--input_file", input_file, "--kind", kind,
                     "--text_column", text_column, "--output_dir", path, "--encode_batch_size", "128"])  # fmt: skip
    return EmbeddingStore.open(path)


def read_queries(path):
    with open(path, encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle]
    return [str(row["id"]) for row in rows], [row["text"] for row in rows]


def latency_p50_ms(encoder, texts, count):
    return evaluate.time_queries(encoder, texts, torch.device("cpu"), count, 64, 64)["latency_p50_ms"]


class Scorer:
    """One collection's evaluation: the teacher's document index, the test queries and the teacher's results."""

    def __init__(self, collection, document_store, paths, teacher, args):
        self.collection, self.args, self.document_store = collection, args, document_store
        self.indexes, self.doc_ids = {}, document_store.ids
        self.query_ids, self.query_texts = read_queries(paths["queries"])
        self.qrels = read_qrels(paths["qrels"])
        self.teacher_rows, self.teacher_metrics = self.search(teacher)
        self.teacher_latency = latency_p50_ms(teacher, self.query_texts, args.latency_queries)
        self.judged = sorted(self.teacher_metrics["ndcg@10"])

    def search(self, encoder):
        with torch.inference_mode():
            vectors = encoder.encode(self.query_texts, "query", batch_size=64)
        dim = encoder.embedding_dim  # a Matryoshka student is scored against the truncated teacher vectors
        if dim not in self.indexes:
            self.indexes[dim] = build_index(self.document_store.truncated(dim), use_gpu=False)
        _, found = search(self.indexes[dim], vectors, 100)
        ranked = {qid: [self.doc_ids[r] for r in row if r >= 0] for qid, row in zip(self.query_ids, found)}
        return found, per_query_metrics(ranked, self.qrels, [10, 100])

    def row(self, name, encoder, train_seconds):
        """The table row of one encoder: metrics, recovery with its interval, overlap, latency, size."""
        found, metrics = self.search(encoder)
        row = {"collection": self.collection, "model": name, "train_s": train_seconds}
        for key in ("ndcg@10", "recall@100"):
            student = [metrics[key][q] for q in self.judged]
            reference = [self.teacher_metrics[key][q] for q in self.judged]
            row[key] = float(np.mean(student))
            row[f"recovery {key}"] = row[key] / float(np.mean(reference))
            row[f"interval {key}"] = bootstrap_ratio_interval(student, reference, self.args.bootstrap_samples)
        row["overlap@10"] = overlap_at_k(found, self.teacher_rows, 10)
        row["latency_ms"] = (
            self.teacher_latency
            if name == "teacher"
            else latency_p50_ms(encoder, self.query_texts, self.args.latency_queries)
        )
        row["params_m"] = sum(p.numel() for p in encoder.parameters()) / 1e6
        print(json.dumps(row), flush=True)
        return row


def main(argv=None):
    args = parse_args(argv)
    recipes = args.recipes or list(RECIPES)
    if args.list:
        for name in recipes:
            print(f"{name}: {RECIPES[name].describe()}")
        return
    if args.table:
        rows = read_rows(args.results_file)
        print(render_table(rows))
        return rows
    data_root = os.path.abspath(args.data_root)
    names = args.collections or sorted(
        name for name in os.listdir(data_root) if os.path.exists(os.path.join(data_root, name, "qrels.tsv"))
    )
    torch.set_num_threads(torch.get_num_threads())
    teacher_path = demo_base_model()
    work = os.path.abspath(args.output_dir)
    general_file = os.path.join(work, "general_text.jsonl")
    if not os.path.exists(general_file):
        texts = general_text()
        random.Random(0).shuffle(texts)
        write_jsonl(general_file, ({"query": text} for text in texts))
    general_store = os.path.join(work, "stores", "teacher-general")
    general_count = len(encode_store(teacher_path, general_file, "query", general_store, "query"))
    teacher = Encoder.from_pretrained(teacher_path).eval()

    rows = []
    for collection in names:
        collection_work = os.path.join(work, collection)
        paths = prepare_collection(os.path.join(data_root, collection), collection_work)
        pseudo_query_mode = None  # phase 3's --pseudo_queries for this collection, found at its first +refine row
        document_store = encode_store(
            teacher_path, paths["documents"], "ad", os.path.join(collection_work, "stores", "teacher-documents"), "text"
        )
        text_stores = {}
        for key in sorted({RECIPES[name].text for name in recipes}):
            text_stores[key] = os.path.join(collection_work, "stores", f"teacher-{key}")
            count = len(encode_store(teacher_path, paths[key], "query", text_stores[key], "query"))
            print(f"{collection}: label-free text '{key}': {general_count} general + {count} document-side")
        scorer = Scorer(collection, document_store, paths, teacher, args)
        rows.append(scorer.row("teacher", teacher, 0.0))
        print(f"{collection}: {len(scorer.doc_ids)} documents, {len(scorer.judged)} judged queries")
        for name in recipes:
            recipe = RECIPES[name]
            if recipe.distill is None:  # the teacher or a cut of it, untrained (truncated for a width): no seed
                model = Encoder.from_pretrained(teacher_path)
                if recipe.layers:
                    keep_layers(model, evenly_spaced_layers(model.backbone.config.num_hidden_layers, recipe.layers))
                if recipe.dim:
                    truncate_output(model, recipe.dim)
                rows.append(scorer.row(name, model.eval(), 0.0))
        measured = {row_key(row) for row in save_rows(args.results_file, rows)}
        for seed in args.seeds:
            trained = {}  # recipe name -> (output folder, training seconds), this seed's
            for name in [name for name in recipes if RECIPES[name].distill is not None]:
                recipe = RECIPES[name]
                if (collection, name, seed) in measured and not args.retrain:
                    print(
                        f"{collection}: {name} seed {seed} is in {args.results_file}: kept (--retrain measures it anew)"
                    )
                    continue
                folder = os.path.join(collection_work, "{}", f"seed{seed}")
                base_results = os.path.join(folder.format(recipe.base or name), "all_results.json")
                if recipe.base in trained:
                    output, train_seconds = trained[recipe.base]
                elif os.path.exists(base_results) and not args.retrain:  # a student an earlier study run trained
                    with open(base_results, encoding="utf-8") as handle:
                        output, train_seconds = os.path.dirname(base_results), json.load(handle)["train_runtime"]
                else:
                    output = folder.format(recipe.base or name)
                    started = time.perf_counter()
                    distill_student.main([
                        "--teacher_model", teacher_path, "--student_num_layers", str(recipe.layers),
                        "--query_file", paths[recipe.text], "--teacher_query_store", text_stores[recipe.text],
                        "--general_text_file", general_file, "--teacher_general_store", general_store,
                        "--num_train_epochs", "1", "--per_device_train_batch_size", "64", "--seed", str(seed),
                        "--output_dir", output, "--overwrite_output_dir", "--logging_steps", "100",
                        "--progressive_from", "none",  # each recipe states its schedule (prune-*)
                        *[flag.replace("{document_store}", document_store.folder) for flag in recipe.distill],
                    ])  # fmt: skip
                    train_seconds = time.perf_counter() - started
                    trained[recipe.base or name] = (output, train_seconds)
                refined = folder.format(name)
                if (
                    recipe.refine is not None
                    and os.path.exists(os.path.join(refined, "all_results.json"))
                    and not args.retrain
                ):
                    output = refined  # refined by an earlier study run
                elif recipe.refine is not None:
                    pseudo_query_mode = pseudo_query_mode or pseudo_queries(paths["documents"])
                    started = time.perf_counter()
                    refine_contrastive.main([
                        "--student_model", output, "--teacher_model", teacher_path, "--pseudo_queries",
                        pseudo_query_mode, "--corpus_file", paths["documents"], "--ad_store", document_store.folder,
                        "--output_dir", refined, "--overwrite_output_dir", "--logging_steps", "100",
                        "--seed", str(seed), *recipe.refine,
                    ])  # fmt: skip
                    output, train_seconds = refined, train_seconds + time.perf_counter() - started
                trained[name] = (output, train_seconds)
                row = scorer.row(name, Encoder.from_pretrained(output).eval(), train_seconds)
                rows.append({**row, "seed": seed})
                save_rows(args.results_file, rows)
    rows = save_rows(args.results_file, rows)
    table = render_table(rows)
    with open(os.path.join(work, "table.md"), "w", encoding="utf-8") as handle:
        handle.write(table + "\n")
    print(table)
    return rows


def row_key(row):
    return row["collection"], row["model"], row.get("seed")


def read_rows(results_file):
    """The rows of earlier runs in results_file ([] when there is none yet)."""
    if not os.path.exists(results_file):
        return []
    with open(results_file, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def save_rows(results_file, rows):
    """Writes the rows of earlier runs in results_file and these rows, a row measured again replacing the
    earlier one (so a study can be run a few recipes at a time, and a stopped one keeps what it measured);
    atomically; returns them all."""
    previous = read_rows(results_file)
    fresh = {row_key(row) for row in rows}
    rows = [row for row in previous if row_key(row) not in fresh] + rows
    write_jsonl(results_file + ".tmp", rows)
    os.replace(results_file + ".tmp", results_file)
    return rows


def spread(values):
    """'mean ± sample standard deviation' of recoveries over seeds ('mean' alone for one value)."""
    if len(values) == 1:
        return f"{values[0]:.1%}"
    return f"{np.mean(values):.1%} ± {np.std(values, ddof=1):.1%}"


def render_table(rows):
    """One row per (collection, model): the mean over its seeds with the spread (sample standard deviation) of
    each recovery, and the 95% bootstrap interval over queries of its first seed; then, per model, the mean
    recovery over the collections it ran on and its worst collection."""
    order = {name: index for index, name in enumerate(["teacher", *RECIPES])}
    groups = {}
    for row in rows:
        groups.setdefault((row["collection"], row["model"]), []).append(row)
    lines = [
        "| collection | model | seeds | nDCG@10 | recovery (± sd over seeds) | 95% CI, one seed | R@100 "
        "| recovery (± sd over seeds) | 95% CI, one seed | overlap@10 | p50 ms | params (M) | train s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    means = {}
    for collection, model in sorted(groups, key=lambda key: (key[0], order.get(key[1], len(order)))):
        runs = sorted(groups[collection, model], key=lambda row: (row.get("seed") is None, row.get("seed") or 0))
        cells = [collection, model, ",".join(str(row.get("seed", "-")) for row in runs)]
        for key in ("ndcg@10", "recall@100"):
            recoveries = [row[f"recovery {key}"] for row in runs]
            means.setdefault(model, {}).setdefault(key, {})[collection] = float(np.mean(recoveries))
            low, high = runs[0][f"interval {key}"]
            cells += [f"{np.mean([row[key] for row in runs]):.4f}", spread(recoveries), f"{low:.1%}-{high:.1%}"]
        cells += [f"{np.mean([row['overlap@10'] for row in runs]):.3f}",
                  f"{np.median([row['latency_ms'] for row in runs]):.2f}", f"{runs[0]['params_m']:.1f}",
                  f"{np.mean([row['train_s'] for row in runs]):.0f}"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| model | mean recovery nDCG@10 | worst collection | mean recovery R@100 | worst collection "
              "| collections |", "|---|---|---|---|---|---|"]  # fmt: skip
    for model in sorted(means, key=lambda name: order.get(name, len(order))):
        cells = [model]
        for key in ("ndcg@10", "recall@100"):
            per_collection = means[model][key]
            worst = min(per_collection, key=per_collection.get)
            cells += [f"{np.mean(list(per_collection.values())):.1%}", f"{worst} {per_collection[worst]:.1%}"]
        lines.append("| " + " | ".join(cells) + f" | {len(means[model]['ndcg@10'])} |")
    return "\n".join(lines + leave_one_out(rows))


def criterion(recoveries):
    """What a selection maximises: the mean of a run's nDCG@10 and R@100 recoveries."""
    return (recoveries["ndcg@10"] + recoveries["recall@100"]) / 2


def leave_one_out(rows):
    """Per protocol and block count, the choice among CANDIDATES made without each collection, scored on it.

    For every collection X: the candidate with the best mean criterion over the other collections (mean over
    seeds per collection, then over collections) is chosen, and its recovery on X is the held-out score. Only
    candidates measured on every collection take part. Also, per candidate, whether it beats the incumbent
    (distill_student.py's default) on every collection by more than the larger of the two spreads over seeds.
    Returns markdown lines."""
    runs = {}
    for row in rows:
        if row.get("seed") is not None:
            runs.setdefault((row["model"], row["collection"]), []).append(row)

    def summary(model, collection):
        values = runs[model, collection]
        recoveries = {key: float(np.mean([r[f"recovery {key}"] for r in values])) for key in ("ndcg@10", "recall@100")}
        spreads = [criterion({key: r[f"recovery {key}"] for key in recoveries}) for r in values]
        return recoveries, float(np.std(spreads, ddof=1)) if len(spreads) > 1 else float("nan")

    lines = []
    for protocol in ("noads", "ads"):
        for blocks in (2, 3):
            names = [f"{protocol}-{name}-{blocks}" for name in PROTOCOL_CANDIDATES[protocol]]
            collections = sorted({c for (m, c) in runs if m in names})
            names = [m for m in names if all((m, c) in runs for c in collections)]
            if len(collections) < 2 or len(names) < 2:
                continue
            table = {(m, c): summary(m, c) for m in names for c in collections}
            title = f"Leave one collection out, {protocol}, {blocks} blocks (candidates: {', '.join(names)}):"
            lines += ["", title, "",
                      "| held-out collection | chosen on the others | its nDCG@10 recovery there | R@100 |",
                      "|---|---|---|---|"]  # fmt: skip
            held_out = []
            for collection in collections:
                others = [c for c in collections if c != collection]
                chosen = max(names, key=lambda m: np.mean([criterion(table[m, c][0]) for c in others]))
                recoveries = table[chosen, collection][0]
                held_out.append(recoveries)
                lines.append(
                    f"| {collection} | {chosen} | {recoveries['ndcg@10']:.1%} | {recoveries['recall@100']:.1%} |"
                )
            lines.append(f"| mean | | {np.mean([r['ndcg@10'] for r in held_out]):.1%} "
                         f"| {np.mean([r['recall@100'] for r in held_out]):.1%} |")  # fmt: skip
            overall = max(names, key=lambda m: np.mean([criterion(table[m, c][0]) for c in collections]))
            incumbent = f"{protocol}-default-{blocks}"
            lines.append(f"\nChosen on all {len(collections)} collections: {overall}.")
            if incumbent in names:
                for name in names:
                    if name == incumbent:
                        continue
                    margins = [criterion(table[name, c][0]) - criterion(table[incumbent, c][0])
                               - max(table[name, c][1], table[incumbent, c][1]) for c in collections]  # fmt: skip
                    if any(np.isnan(m) for m in margins):  # a spread needs two seeds
                        lines.append(f"{name} against {incumbent}: undecided, a collection has one seed (the "
                                     "spread needs two or more).")  # fmt: skip
                        continue
                    verdict = "beats" if all(m > 0 for m in margins) else "does not beat"
                    lines.append(f"{name} {verdict} {incumbent} on every collection by more than the spread "
                                 f"(worst margin beyond the spread {min(margins):+.1%}).")  # fmt: skip
    return lines


if __name__ == "__main__":
    main()
