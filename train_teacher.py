"""Phase 1: fine-tune a large embedder as a retriever with InfoNCE (the HARNESS-LM teacher).

Symmetric dual encoder: the same weights encode queries (with the query prompt) and ads. Negatives:
mined hard negatives, in-batch ads, in-batch queries and ad-ad pairs, gathered across processes
with gradient. A negative scoring above s(q, a+) + margin, with the positive's text or from the
positive's ad group, is masked as a likely false negative.

Single machine (the embedded default: all-MiniLM-L6-v2 on the built-in data, CPU, ~2 minutes):
    python train_teacher.py
Multi-GPU (DDP) / DeepSpeed ZeRO-3 for Qwen3-Embedding-4B/8B:
    accelerate launch --config_file accelerate_configs/multi_gpu.yaml train_teacher.py --train_file clicks.jsonl
    accelerate launch --config_file accelerate_configs/deepspeed_zero3.yaml train_teacher.py \
        --model_name_or_path Qwen/Qwen3-Embedding-8B --train_file clicks.jsonl --gradient_checkpointing \
        --per_device_train_batch_size 64 --temperature 0.01 --output_dir teacher
Two CPU processes (gloo), e.g. to check a multi-process run without GPUs:
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 train_teacher.py
"""

import argparse
import math
import os
import random

import numpy as np
import torch
from accelerate.utils import set_seed
from torch.utils.data import DataLoader

from common.args import (
    add_common_training_args,
    add_context_args,
    add_graph_args,
    check_has_negatives,
    check_run_args,
    finite_float,
    non_negative_int,
    parse_with_config,
    positive_float,
    positive_int,
    probability,
)
from common.data import (
    check_context,
    check_id,
    check_text,
    check_text_list,
    has_optional_column,
    load_table,
    optional_key,
    require_columns,
    text_key,
    with_context,
)
from common.demo_data import DEMO_ROOT, demo_base_model, demo_paths
from common.encoder import Encoder
from common.errors import UserError, run_cli
from common.grad_cache import backward_through_chunks, embed_without_graph
from common.graph import CorpusIds, draw_from_graphs, log_graph, read_graph, read_query_graph_of_rows
from common.loop import (
    TrainLoop,
    check_finite_loss,
    clip_and_check_gradients,
    get_scheduler,
    optimizer_param_groups,
    resume_from_checkpoint,
    save_final_model,
)
from common.lora import add_lora, merge_lora
from common.loss import contrastive_loss, graph_loss
from common.run_folder import tracker_config, tracker_init_kwargs
from common.runtime import log_banner, log_truncation, logger, make_accelerator

SCRIPT = "train_teacher.py"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # Model
    group = parser.add_argument_group("Model")
    group.add_argument("--model_name_or_path", default=None, help="Hub id or folder; default: all-MiniLM-L6-v2.")
    group.add_argument("--pooling", choices=["mean", "cls", "last"], default=None, help="Default: from the model.")
    group.add_argument("--query_prompt", default=None, help="e.g. 'Instruct: Given a web search query, ...\\nQuery:'")
    group.add_argument("--ad_prompt", default=None)
    group.add_argument("--max_length", type=positive_int, default=None)
    group.add_argument("--padding_side", choices=["left", "right"], default=None)
    # Data
    group = parser.add_argument_group("Data")
    group.add_argument("--train_file", default=None, help="Hub id or jsonl/parquet/csv; default: the built-in data.")
    group.add_argument("--train_split", default="train")
    group.add_argument("--query_column", default="query")
    group.add_argument("--positive_column", default="positive")
    group.add_argument("--negatives_column", default="negatives", help="List of hard-negative ad texts (optional).")
    group.add_argument("--group_column", default="group", help="Ad group / advertiser of the positive (optional).")
    group.add_argument(
        "--positive_id_column", default="positive_id", help="Ad id of the positive; read only with --ad_graph_file."
    )
    group.add_argument(
        "--num_hard_negatives", type=non_negative_int, default=1, help="Per query; missing ones are random ads."
    )
    add_context_args(group, where="--train_file")
    # Loss
    group = parser.add_argument_group("Loss")
    group.add_argument("--temperature", type=positive_float, default=0.05)
    group.add_argument(
        "--false_negative_margin", type=finite_float, default=0.1, help="Negative value: no margin mask."
    )
    group.add_argument("--no_query_query", action="store_true", help="Leave in-batch queries out of the negatives.")
    group.add_argument("--no_ad_ad", action="store_true", help="Leave ad-ad pairs out of the denominator.")
    group.add_argument(
        "--grad_cache_chunk_size",
        type=positive_int,
        default=None,
        help="Gradient caching: embed the batch's rows (queries, positives, negatives) this many at a time, so a "
        "large contrastive batch needs the activation memory of one chunk; same gradients as the plain batch.",
    )
    group = parser.add_argument_group("Graph regulariser")
    add_graph_args(group, "ids of --corpus_file, or without it of --train_file's --positive_id_column")
    group.add_argument(
        "--corpus_file",
        default=None,
        help="Ads (id, text) that the graph may name, streamed: only the training ads' neighbours' texts are kept. "
        "Default: the built-in ads with the built-in data; otherwise none (the graph names training ads only).",
    )
    group.add_argument("--id_column", default="id")
    group.add_argument("--text_column", default="text")
    # LoRA
    group = parser.add_argument_group("LoRA (peft): train low-rank adapters instead of every weight")
    group.add_argument("--lora_r", type=non_negative_int, default=0, help="Adapter rank; 0: full fine-tuning.")
    group.add_argument("--lora_alpha", type=positive_float, default=None, help="Scaling alpha / r; default 2 r.")
    group.add_argument("--lora_dropout", type=probability, default=0.05)
    group.add_argument(
        "--lora_target_modules",
        nargs="+",
        default=None,
        help="Adapt only the linear layers whose names end so (e.g. q_proj k_proj v_proj); default: all of them.",
    )
    # Output
    group = parser.add_argument_group("Output")
    group.add_argument("--output_dir", default=os.path.join(DEMO_ROOT, "teacher"))
    group.add_argument("--overwrite_output_dir", action="store_true")
    add_common_training_args(parser)
    parser.set_defaults(learning_rate=3e-5, per_device_train_batch_size=64)
    return parse_with_config(parser, argv)


def read_pairs(args):
    """Validated training rows: query, what the teacher reads for it (the query with its teacher-only context, if
    any), positive, hard negatives (texts) and the positive's group."""
    table = load_table(args.train_file, split=args.train_split)
    required = [args.query_column, args.positive_column]
    require_columns(table, required + ([args.query_context_column] if args.query_context_column else []),
                    args.train_file, "--query_column/--positive_column/--query_context_column")  # fmt: skip
    source = args.train_file
    has_negatives = has_optional_column(table, args.negatives_column, "negatives", source, "--negatives_column")
    has_groups = has_optional_column(table, args.group_column, "group", source, "--group_column")
    negatives = table[args.negatives_column] if has_negatives else [None] * len(table)
    groups = table[args.group_column] if has_groups else [None] * len(table)
    contexts = table[args.query_context_column] if args.query_context_column else [None] * len(table)
    if args.ad_graph_file:  # the graph names ads by id: the positive's id is needed
        require_columns(table, [args.positive_id_column], source, "--positive_id_column (needed by --ad_graph_file)")
    positive_ids = table[args.positive_id_column] if args.ad_graph_file else [None] * len(table)
    if args.query_graph_file:  # the graph names queries by id
        require_columns(table, [args.query_id_column], source, "--query_id_column (needed by --query_graph_file)")
    query_ids = table[args.query_id_column] if args.query_graph_file else [None] * len(table)
    rows = []
    for row, (query, positive, row_negatives, group, context, positive_id, query_id) in enumerate(
        zip(table[args.query_column], table[args.positive_column], negatives, groups, contexts, positive_ids, query_ids)
    ):
        query = check_text(query, args.train_file, row, args.query_column)
        context = check_context(context, args.train_file, row, args.query_context_column)
        rows.append(
            {
                "query": query,
                "teacher_query": with_context(query, context, args.context_template),
                "positive": check_text(positive, args.train_file, row, args.positive_column),
                "negatives": check_text_list(row_negatives, args.train_file, row, args.negatives_column),
                "group": optional_key(group),
            }
        )
        if args.ad_graph_file:
            rows[-1]["positive_id"] = check_id(positive_id, source, row, args.positive_id_column)
        if args.query_graph_file:
            rows[-1]["query_id"] = check_id(query_id, source, row, args.query_id_column)
    if not rows:
        raise UserError(f"{args.train_file} has no rows; point --train_file at the training pairs.")
    return rows


def read_ad_graph(args, rows):
    """The graph over ads, each row's positive a node (by --positive_id_column). Nodes are the ads of
    --corpus_file (streamed; the texts kept are those of the training ads' neighbours only) or, without it,
    the training positives. Returns the Graph and {node: text}; one id with two texts is refused."""
    columns = (args.graph_node_column, args.graph_neighbor_column, args.graph_weight_column)
    if args.corpus_file:
        corpus = CorpusIds(args.corpus_file, args.id_column, args.text_column)
        nodes = corpus.find_rows([row["positive_id"] for row in rows])
        for row_number, (row, node) in enumerate(zip(rows, nodes)):
            if node < 0:
                raise UserError(
                    f"{args.train_file} row {row_number}: ad id '{row['positive_id']}' is not in {args.corpus_file}; "
                    "add the ad to the corpus or fix the id."
                )
            row["positive_node"] = int(node)
        keep = np.zeros(len(corpus), dtype=bool)
        keep[nodes] = True
        graph = read_graph(args.ad_graph_file, corpus.find_rows, len(corpus), columns=columns,
                           what=f"an ad of {args.corpus_file}", keep=keep)  # fmt: skip
        node_texts = corpus.texts(np.concatenate([nodes, graph.targets]))
        for row_number, row in enumerate(rows):
            check_one_text(args, row_number, row, node_texts, args.corpus_file)
    else:
        node_of, node_texts = {}, {}
        for row_number, row in enumerate(rows):
            row["positive_node"] = node_of.setdefault(row["positive_id"], len(node_of))
            check_one_text(args, row_number, row, node_texts, "an earlier row")
        graph = read_graph(
            args.ad_graph_file,
            lambda ids: [node_of.get(item_id, -1) for item_id in ids],
            len(node_of),
            columns=columns,
            what=f"the id of a positive of {args.train_file} (give the ads with --corpus_file)",
        )
    log_graph(logger, graph, [row["positive_node"] for row in rows], "positive")
    return graph, node_texts


def read_graphs(args, rows):
    """The graphs of --ad_graph_file and --query_graph_file as (Graph, row field naming its node) pairs whose
    targets are ad nodes, and {ad node: text}. Without a graph over ads, the ad nodes are the distinct training
    positives (by text); a graph over queries reaches the ads its neighbour queries were clicked on."""
    graphs, node_texts = [], {}
    if args.ad_graph_file:
        graph, node_texts = read_ad_graph(args, rows)
        graphs.append((graph, "positive_node"))
    else:
        node_of = {}
        for row in rows:
            row["positive_node"] = node_of.setdefault(row["positive"], len(node_of))
            node_texts[row["positive_node"]] = row["positive"]
    if args.query_graph_file:  # query ids -> the ads their neighbours clicked (ad nodes)
        columns = (args.graph_node_column, args.graph_neighbor_column, args.graph_weight_column)
        graphs.append(read_query_graph_of_rows(args.query_graph_file, rows, "positive_node", columns=columns,
                                               what=f"a query id of {args.train_file}", logger=logger))  # fmt: skip
    return graphs, node_texts


def check_one_text(args, row_number, row, node_texts, where):
    """One ad id is one ad text: the row's positive must be the text its id has in `node_texts` (set if new)."""
    if node_texts.setdefault(row["positive_node"], row["positive"]) != row["positive"]:
        raise UserError(
            f"{args.train_file} row {row_number}: ad id '{row['positive_id']}' has another text than in {where}; "
            f"one id is one ad text, so fix column '{args.positive_id_column}'."
        )


class PairCollator:
    """Tokenises a batch as one sequence list: queries (query prompt), positives, hard negatives and, with
    graphs, `graph_neighbours` extra targets of each row from each graph (ad prompt): `graphs` pairs a Graph
    whose targets are ad nodes with the row field naming its node (the positive's, or the query's).

    One forward pass per step covers both sides: DDP expects exactly one forward per backward.
    """

    def __init__(self, encoder, num_hard_negatives, ad_pool, seed, graphs=(), graph_neighbours=0, weighted=True):
        self.encoder, self.num_hard_negatives, self.ad_pool, self.seed = encoder, num_hard_negatives, ad_pool, seed
        self.graphs, self.graph_neighbours, self.weighted = list(graphs), graph_neighbours, weighted
        self.node_texts = None  # with graphs: the ads' texts by node (set by main)

    def __call__(self, rows):
        negatives = []
        for row in rows:
            chosen = row["negatives"][: self.num_hard_negatives]
            # Fill up with random ads (masked if equal to the positive), drawn from the row itself so that
            # a resumed run and worker processes draw the same ones.
            rng = random.Random(text_key(row["query"]) ^ self.seed)
            chosen += rng.sample(self.ad_pool, self.num_hard_negatives - len(chosen))
            negatives.extend(chosen)
        positives = [row["positive"] for row in rows]
        queries = [row["teacher_query"] for row in rows]  # with teacher-only context, if any
        neighbours, weights = [], torch.zeros(0)
        if self.graphs:  # padding: the positive itself, at weight 0 (masked in the loss)
            query_keys = [text_key(row["query"]) for row in rows]
            drawn, drawn_weights = draw_from_graphs(
                self.graphs, rows, self.graph_neighbours, self.seed, query_keys, self.weighted
            )
            for row, nodes in zip(rows, drawn):
                neighbours += [self.node_texts[node] if node >= 0 else row["positive"] for node in nodes]
            weights = torch.from_numpy(drawn_weights.ravel())
        batch = {
            "inputs": self.encoder.tokenize_mixed(queries, positives + negatives + neighbours),
            "query_keys": torch.tensor([text_key(row["query"]) for row in rows]),
            "positive_keys": torch.tensor([text_key(text) for text in positives]),
            "negative_keys": torch.tensor([text_key(text) for text in negatives], dtype=torch.long),
            "positive_groups": torch.tensor([text_key(row["group"] or row["positive"]) for row in rows]),
        }
        if self.graphs:
            batch["graph_keys"] = torch.tensor([text_key(text) for text in neighbours], dtype=torch.long)
            batch["graph_weights"] = weights
        return batch


def teacher_loss(vectors, batch, args):
    """InfoNCE of one batch from the vectors of its rows (queries, positives, the hard negatives, then any graph
    neighbours), which the model computed on its device from the batch the prepared loader moved there. With a
    graph, plus --graph_weight x the graph term: the positive's neighbours are extra targets of the query and
    of the positive itself (both encoders are one model here), never negatives. Returns the loss and the
    values to log."""
    batch_size, num_negatives = len(batch["query_keys"]), len(batch["negative_keys"])
    query_vectors, positives = vectors[:batch_size], vectors[batch_size : 2 * batch_size]
    negatives, neighbours = (
        vectors[2 * batch_size : 2 * batch_size + num_negatives],
        vectors[2 * batch_size + num_negatives :],
    )
    graph_keys = batch.get("graph_keys")
    loss, accuracy = contrastive_loss(
        query_vectors,
        positives,
        negatives,
        temperature=args.temperature,
        positive_keys=batch["positive_keys"],
        negative_keys=batch["negative_keys"],
        query_keys=batch["query_keys"],
        positive_groups=batch["positive_groups"],
        false_negative_margin=args.false_negative_margin if args.false_negative_margin >= 0 else None,
        query_query=not args.no_query_query,
        ad_ad=not args.no_ad_ad,
        not_negative_keys=graph_keys.view(batch_size, -1) if graph_keys is not None else None,
    )
    logs = {"accuracy": accuracy}
    if graph_keys is not None and args.graph_weight > 0:
        terms = [
            graph_loss(
                anchors,
                neighbours,
                batch["graph_weights"],
                temperature=args.temperature,
                anchor_keys=batch["positive_keys"],
                neighbour_keys=graph_keys,
                candidates=torch.cat([positives, negatives]),
                candidate_keys=torch.cat([batch["positive_keys"], batch["negative_keys"]]),
            )
            for anchors in (query_vectors, positives)
        ]
        logs["graph_loss"] = (terms[0] + terms[1]) / 2
        loss = loss + args.graph_weight * logs["graph_loss"]
    return loss, logs


def main(argv=None):
    args = parse_args(argv)
    check_has_negatives(args)
    if args.lora_r and args.lora_alpha is None:
        args.lora_alpha = 2.0 * args.lora_r
    if not args.lora_r and (args.lora_alpha is not None or args.lora_target_modules):
        raise UserError("--lora_alpha and --lora_target_modules need --lora_r > 0 (LoRA is off at 0).")
    check_run_args(args, SCRIPT, inputs=[args.model_name_or_path, args.train_file])
    accelerator = make_accelerator(args)
    if args.train_file is None:
        with accelerator.main_process_first():
            args.train_file = demo_paths()["train"]
            if args.ad_graph_file and args.corpus_file is None:
                args.corpus_file = demo_paths()["ads"]
    args.model_name_or_path = args.model_name_or_path or demo_base_model()
    set_seed(args.seed)

    # fp32 master weights whatever dtype the checkpoint was saved in; bf16 comes from mixed precision.
    encoder = Encoder.from_pretrained(
        args.model_name_or_path,
        pooling=args.pooling,
        query_prompt=args.query_prompt,
        ad_prompt=args.ad_prompt,
        max_length=args.max_length,
        padding_side=args.padding_side,
        dtype="float32",
        trust_remote_code=args.trust_remote_code,
        allow_pickle=args.allow_pickle_weights,
    )
    if args.lora_r:  # adapters in place: the model stays an Encoder; only the adapters train
        trainable = add_lora(encoder, args.lora_r, args.lora_alpha, args.lora_dropout, args.lora_target_modules)
        accelerator.print(f"LoRA r={args.lora_r} alpha={args.lora_alpha:g}: {trainable:,} trainable parameters")
    if args.gradient_checkpointing:
        encoder.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    rows = read_pairs(args)
    log_truncation(encoder, [row["teacher_query"] for row in rows], "query", args.train_file)
    log_truncation(encoder, [row["positive"] for row in rows], "ad", args.train_file)
    ad_pool = sorted({row["positive"] for row in rows})
    # The collator holds the encoder itself (not the DDP-wrapped model prepare returns) for tokenising.
    collate = PairCollator(encoder, args.num_hard_negatives, ad_pool, args.seed)
    if args.ad_graph_file or args.query_graph_file:
        collate.graphs, collate.node_texts = read_graphs(args, rows)
        collate.graph_neighbours, collate.weighted = args.graph_neighbours, args.graph_sampling == "weighted"
    dataloader = DataLoader(
        rows,
        batch_size=args.per_device_train_batch_size,
        shuffle=True,
        drop_last=True,
        collate_fn=collate,
        num_workers=args.dataloader_num_workers,
    )
    if len(rows) < args.per_device_train_batch_size * accelerator.num_processes:
        raise UserError(
            f"{len(rows)} training rows are fewer than one global batch; lower --per_device_train_batch_size."
        )

    # Optimiser and schedule. Each process sees 1/num_processes of the batches; one optimiser step per
    # --gradient_accumulation_steps of them.
    optimizer = torch.optim.AdamW(
        optimizer_param_groups(encoder, args.weight_decay, accelerator), lr=args.learning_rate
    )
    steps_per_epoch = math.ceil(len(dataloader) / accelerator.num_processes / args.gradient_accumulation_steps)
    args.max_train_steps = args.max_train_steps or max(math.ceil(args.num_train_epochs * steps_per_epoch), 1)
    if args.num_warmup_steps is None:
        args.num_warmup_steps = int(0.05 * args.max_train_steps)
    # accelerate steps a prepared scheduler once per process at every optimiser step, so the schedule counts
    # num_processes x the optimiser steps (as in the HF *_no_trainer examples); the learning rate at each
    # optimiser step is then the same for any number of processes.
    scheduler = get_scheduler(
        args.lr_scheduler_type,
        optimizer,
        num_warmup_steps=args.num_warmup_steps * accelerator.num_processes,
        num_training_steps=args.max_train_steps * accelerator.num_processes,
    )
    model, optimizer, dataloader, scheduler = accelerator.prepare(encoder, optimizer, dataloader, scheduler)
    accelerator.init_trackers(
        "train_teacher", config=tracker_config(args), init_kwargs=tracker_init_kwargs(accelerator, "train_teacher")
    )
    progress = resume_from_checkpoint(accelerator, args, SCRIPT)
    loop = TrainLoop(accelerator, args, dataloader, progress, SCRIPT)
    log_banner(args, accelerator, len(rows))

    model.train()
    for batch in loop:
        with accelerator.accumulate(model):
            if args.grad_cache_chunk_size:  # vectors without a graph; the model's backward comes chunk by chunk
                vectors, random_states = embed_without_graph(model, batch["inputs"], args.grad_cache_chunk_size)
            else:
                vectors = model(**batch["inputs"])  # queries, positives, then the hard negatives
            loss, logs = teacher_loss(vectors, batch, args)
            check_finite_loss(loss, loop.step)
            if args.grad_cache_chunk_size:
                loss.backward()  # d loss / d vector, into vectors.grad (no parameter is touched)
                backward_through_chunks(
                    accelerator, model, batch["inputs"], args.grad_cache_chunk_size, vectors, random_states
                )
            else:
                accelerator.backward(loss)
            if accelerator.sync_gradients:
                clip_and_check_gradients(accelerator, model, args, loop.step)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        loop.end_of_batch(loss=loss, **logs, lr=scheduler.get_last_lr()[0])

    results = {f"train_{key}": value for key, value in loop.last_logs.items() if key != "step"}
    results.update(loop.speed())
    results["steps"] = loop.step
    # With LoRA the adapters are merged into the weights: the saved teacher is a plain model (no peft needed).
    merge = (lambda state_dict: merge_lora(state_dict, args.lora_alpha, args.lora_r)) if args.lora_r else None
    save_final_model(accelerator, args, model, SCRIPT, "teacher", results, progress.log_history, merge)
    accelerator.end_training()
    return results


if __name__ == "__main__":
    run_cli(main)
