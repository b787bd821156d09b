"""Phase 3: contrastive refinement of the student's queries against the teacher's frozen ad vectors.

Only the student query encoder trains. Ads are never re-encoded: positives, hard negatives and
random negatives are rows of the teacher's ad store, so the teacher's ad index is reused as it is.
Because ad vectors are free here, every batch also gets --num_random_negatives ads from the store.

Single machine (the embedded default: refines the aligned demo student, CPU):
    python refine_contrastive.py
The paper's baseline, contrastive learning without alignment (phase 3 from 2 layers cut from the teacher):
    python refine_contrastive.py --student_model teacher --student_num_layers 2 --output_dir contrastive-only
Multi-GPU (DDP):
    accelerate launch --config_file accelerate_configs/multi_gpu.yaml refine_contrastive.py \
        --student_model student-aligned --teacher_model teacher --corpus_file ads.parquet \
        --train_file clicks.jsonl --output_dir student
"""

import argparse
import math
import os
import re

import numpy as np
import torch
from accelerate.utils import set_seed
from torch.utils.data import DataLoader

from common.args import (
    add_common_training_args,
    add_graph_args,
    check_has_negatives,
    check_run_args,
    finite_float,
    non_negative_int,
    parse_with_config,
    positive_float,
    positive_int,
)
from common.data import (
    check_id,
    check_text,
    corpus_fingerprint,
    has_optional_column,
    iter_corpus,
    load_table,
    optional_key,
    require_columns,
    text_key,
)
from common.demo_data import DEMO_ROOT, demo_paths
from common.encoder import EncoderSpec, check_student_of
from common.errors import UserError, run_cli
from common.graph import draw_from_graphs, log_graph, read_graph, read_query_graph_of_rows
from common.loop import (
    TrainLoop,
    check_finite_loss,
    clip_and_check_gradients,
    get_scheduler,
    optimizer_param_groups,
    resume_from_checkpoint,
    save_final_model,
)
from common.loss import contrastive_loss, graph_loss
from common.model_files import model_depth
from common.run_folder import tracker_config, tracker_init_kwargs
from common.runtime import log_banner, log_truncation, logger, make_accelerator
from common.store import default_store_dir, open_or_build_store, rows_of_corpus, store_for_student
from common.surgery import evenly_spaced_layers

SCRIPT = "refine_contrastive.py"


PSEUDO_QUERY_WORDS = 8  # --pseudo_queries first_words: the words of a pseudo-query when not given


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # Models
    group = parser.add_argument_group("Models")
    group.add_argument("--student_model", default=os.path.join(DEMO_ROOT, "student-aligned"))
    group.add_argument(
        "--student_num_layers",
        type=positive_int,
        default=None,
        help="Keep this many evenly spaced layers of --student_model first (e.g. of the teacher: the baseline "
        "without phase 2).",
    )
    group.add_argument(
        "--teacher_model",
        default=os.path.join(DEMO_ROOT, "teacher"),
        help="Encodes the ad store if it does not exist yet, and proves an existing one current.",
    )
    # Data
    group = parser.add_argument_group("Data")
    group.add_argument("--train_file", default=None, help="Clicks; default: the built-in data.")
    group.add_argument(
        "--pseudo_queries",
        choices=["first_sentence", "first_words"],
        default=None,
        help="No clicks: train on pseudo-clicks made from the corpus instead of --train_file: each ad's first "
        "sentence (its title, when the text starts with one) is a query whose click is that ad; first_words: its "
        "first --pseudo_query_words words (for texts without sentence punctuation).",
    )
    group.add_argument(
        "--pseudo_query_words",
        type=positive_int,
        default=None,
        help="With --pseudo_queries first_words: the words of each pseudo-query (ads of no more words give none); "
        f"default {PSEUDO_QUERY_WORDS}.",
    )
    group.add_argument("--train_split", default="train")
    group.add_argument("--query_column", default="query")
    group.add_argument("--positive_id_column", default="positive_id", help="Ad id of the click.")
    group.add_argument("--negative_ids_column", default="negative_ids", help="Hard-negative ad ids (optional).")
    group.add_argument("--positive_column", default="positive", help="Used when there is no id column.")
    group.add_argument("--negatives_column", default="negatives", help="Used when there is no ids column.")
    group.add_argument("--group_column", default="group")
    group.add_argument("--corpus_file", default=None, help="Ads (id, text); default: the built-in ads.")
    group.add_argument("--id_column", default="id")
    group.add_argument("--text_column", default="text")
    group.add_argument("--ad_store", default=None, help="The teacher's ad store; built here when missing.")
    group.add_argument("--store_dir", default=None, help="Where default stores go; default: <output_dir>/../stores.")
    group.add_argument("--encode_batch_size", type=positive_int, default=128)
    # Loss
    group = parser.add_argument_group("Loss")
    group.add_argument("--num_hard_negatives", type=non_negative_int, default=1)
    group.add_argument(
        "--num_random_negatives",
        type=non_negative_int,
        default=256,
        help="Ads drawn from the store per optimiser step for the whole batch (split over processes).",
    )
    group.add_argument("--temperature", type=positive_float, default=0.05)
    group.add_argument(
        "--false_negative_margin", type=finite_float, default=0.1, help="Negative value: no margin mask."
    )
    group = parser.add_argument_group("Graph regulariser")
    add_graph_args(group, "the ad ids of --corpus_file")
    # Output
    group = parser.add_argument_group("Output")
    group.add_argument("--output_dir", default=os.path.join(DEMO_ROOT, "student"))
    group.add_argument("--overwrite_output_dir", action="store_true")
    add_common_training_args(parser)
    parser.set_defaults(learning_rate=5e-5, per_device_train_batch_size=64, num_train_epochs=1.0)
    return parse_with_config(parser, argv)


def read_clicks(args, store):
    """(query text, positive row, hard-negative rows, group key) per click; rows index the ad store, found by id
    (or by text) in the store's own on-disk index: no process holds the ads' texts or an id-to-row dict."""
    table = load_table(args.train_file, split=args.train_split)
    source = args.train_file
    use_ids = has_optional_column(table, args.positive_id_column, "positive_id", source, "--positive_id_column")
    require_columns(
        table, [args.query_column, args.positive_id_column if use_ids else args.positive_column], args.train_file
    )
    if use_ids:
        column = args.positive_id_column
        positive_rows = store.rows([check_id(v, args.train_file, r, column) for r, v in enumerate(table[column])])
        has_negatives = has_optional_column(
            table, args.negative_ids_column, "negative_ids", args.train_file, "--negative_ids_column"
        )
        negative_ids = table[args.negative_ids_column] if has_negatives else [[]] * len(table)
        negative_rows = []
        for row, ids in enumerate(negative_ids):
            if ids is not None and not isinstance(ids, list):
                raise UserError(
                    f"{args.train_file} row {row}, column '{args.negative_ids_column}': expected a list of ad ids, "
                    f"got {type(ids).__name__}; fix the row."
                )
            negative_rows.append(
                store.rows([check_id(i, args.train_file, row, args.negative_ids_column) for i in ids or []])
            )
    else:  # texts only: find each ad by its text in the corpus

        def rows_of(texts, row, column):
            found = store.rows_of_texts(texts)
            if (found < 0).any():
                missing = texts[int(np.flatnonzero(found < 0)[0])]
                raise UserError(
                    f"{args.train_file} row {row}, column '{column}': ad text {missing[:60]!r} is not in the "
                    "corpus; add the ad to --corpus_file or give ad ids."
                )
            return found.tolist()

        positive_rows = [rows_of([text], row, args.positive_column)[0] for row, text in enumerate(
            table[args.positive_column])]  # fmt: skip
        has_negatives = has_optional_column(
            table, args.negatives_column, "negatives", args.train_file, "--negatives_column"
        )
        negatives = table[args.negatives_column] if has_negatives else [[]] * len(table)
        negative_rows = [rows_of(texts or [], row, args.negatives_column) for row, texts in enumerate(negatives)]
    has_groups = has_optional_column(table, args.group_column, "group", args.train_file, "--group_column")
    groups = table[args.group_column] if has_groups else [None] * len(table)
    positive_keys = store.keys_of(np.asarray(positive_rows, dtype=np.int64))
    if args.query_graph_file:  # the graph names queries by id
        require_columns(table, [args.query_id_column], source, "--query_id_column (needed by --query_graph_file)")
    clicks = []
    for row, query in enumerate(table[args.query_column]):
        clicks.append(
            {
                "query": check_text(query, args.train_file, row, args.query_column),
                "positive": int(positive_rows[row]),
                "negatives": [int(r) for r in negative_rows[row]],
                "group": group_key(optional_key(groups[row]), int(positive_keys[row])),
            }
        )
        if args.query_graph_file:
            clicks[-1]["query_id"] = check_id(table[args.query_id_column][row], source, row, args.query_id_column)
    if not clicks:
        raise UserError(f"{args.train_file} has no rows; point --train_file at the clicks.")
    return clicks


def pseudo_clicks(ads, min_words=3, words=None):
    """Clicks made from the corpus alone: (first sentence of an ad -> that ad), for ads whose first sentence
    has at least `min_words` words and is not the whole text (the query must say less than the ad); with
    `words`, (the ad's first `words` words -> the ad) for ads of more words. `ads` gives (id, text) in the
    store's row order (the corpus file the store was built from, streamed)."""
    clicks, count = [], 0
    for row, (_, text) in enumerate(ads):
        count += 1
        if words is None:
            first = re.split(r"(?<=[.?!])\s+", text.strip(), maxsplit=1)[0].strip()
            made = len(first.split()) >= min_words and len(first) < len(text.strip())
        else:
            split = text.split()
            first, made = " ".join(split[:words]), len(split) > words
        if made:
            clicks.append({"query": first, "positive": row, "negatives": [], "group": text_key(text)})
    if not clicks and words is None:
        raise UserError(
            f"No ad has a first sentence of at least {min_words} words followed by more text, so --pseudo_queries "
            "first_sentence makes no click; use --pseudo_queries first_words for texts without sentence "
            "punctuation, or give real clicks with --train_file."
        )
    if not clicks:
        raise UserError(
            f"No ad has more than {words} words, so --pseudo_queries first_words makes no click; lower "
            "--pseudo_query_words, or give real clicks with --train_file."
        )
    made_of = "first sentence" if words is None else f"first {words} words"
    logger.info(f"Pseudo-clicks: {len(clicks)} of {count} ads give their {made_of} as a query")
    return clicks


def group_key(group, positive_key):
    """The key that masks another click's ad as a false negative: the ad group when the click has one; a
    click without a group (null or no column) is only in a group with ads of the same text (the key of the
    positive's text, from the store)."""
    return text_key(f"group\x00{group}") if group is not None else positive_key


def ad_keys(ad_store, rows):
    """Keys of ads by text, read from the store: the same ad text under another id is the positive, never a
    negative."""
    return torch.from_numpy(ad_store.keys_of(rows))


def random_negative_rows(args, num_ads, epoch, batch_in_epoch, accelerator):
    """This process's share of the step's random negatives.

    One global draw per batch, a function of (seed, epoch, batch) only, split over the processes; gathered,
    the candidates are the same --num_random_negatives ads for any number of processes (rounded up to a
    multiple of it), and a resumed run draws them again without any saved RNG state.
    """
    per_process = math.ceil(args.num_random_negatives / accelerator.num_processes)
    rng = np.random.default_rng([args.seed, epoch, batch_in_epoch])
    rows = rng.integers(num_ads, size=per_process * accelerator.num_processes)
    return rows[accelerator.process_index * per_process : (accelerator.process_index + 1) * per_process]


class ClickCollator:
    """A batch of clicks: the queries tokenised, their clicked and hard-negative ads as the teacher's vectors
    read from the ad store (only these rows), with the keys that mask duplicates and same-group ads. With
    graphs, also `graph_neighbours` extra targets (store rows, drawn per query) from each: `graphs` pairs a
    Graph whose targets are store rows with the click field naming its node (the clicked ad's row for a graph
    over ads, the query's node for a graph over queries)."""

    def __init__(self, encoder, ad_store, num_hard_negatives, seed, graphs=(), graph_neighbours=0, weighted=True):
        self.encoder, self.ad_store = encoder, ad_store
        self.num_hard_negatives, self.seed = num_hard_negatives, seed
        self.graphs, self.graph_neighbours, self.weighted = list(graphs), graph_neighbours, weighted

    def __call__(self, rows):
        hard = []
        for row in rows:  # missing hard negatives: random ads drawn from the row, the same in a resumed run
            chosen = row["negatives"][: self.num_hard_negatives]
            rng = np.random.default_rng(text_key(row["query"]) ^ self.seed)
            hard += chosen + rng.integers(len(self.ad_store), size=self.num_hard_negatives - len(chosen)).tolist()
        positive_rows, hard_rows = np.array([row["positive"] for row in rows]), np.array(hard, dtype=np.int64)
        batch = self.encoder.tokenize([row["query"] for row in rows], "query")
        batch["positive_vectors"] = torch.from_numpy(self.ad_store.read(positive_rows))
        batch["positive_keys"] = ad_keys(self.ad_store, positive_rows)
        batch["hard_negative_vectors"] = torch.from_numpy(self.ad_store.read(hard_rows))
        batch["hard_negative_keys"] = ad_keys(self.ad_store, hard_rows)
        batch["positive_groups"] = torch.tensor([row["group"] for row in rows])
        if self.graphs:  # padding: the clicked ad itself, at weight 0 (masked in the loss)
            query_keys = [text_key(row["query"]) for row in rows]
            neighbours, weights = draw_from_graphs(
                self.graphs, rows, self.graph_neighbours, self.seed, query_keys, self.weighted
            )
            neighbours = np.where(neighbours >= 0, neighbours, positive_rows[:, None]).ravel()
            batch["graph_vectors"] = torch.from_numpy(self.ad_store.read(neighbours))
            batch["graph_keys"] = ad_keys(self.ad_store, neighbours)
            batch["graph_weights"] = torch.from_numpy(weights.ravel())
        return batch


def refinement_loss(model, batch, random_vectors, random_keys, args):
    """InfoNCE of one batch: each query against its clicked ad, the hard negatives and the step's random ads;
    with a graph, plus --graph_weight x the graph term (the clicked ad's neighbours, and the ads the query's
    neighbours clicked, as extra targets of the query, never its negatives). Returns the loss and the values to log.

    The prepared data loader has moved `batch` to the model's device; the random negatives are read from the
    store in host memory during the step, so they are moved here (on a GPU, mixing the two is an error:
    tests/test_device.py runs this function with the batch on a non-CPU device)."""
    device = batch["input_ids"].device
    positives, positive_keys = batch.pop("positive_vectors"), batch.pop("positive_keys")
    negatives = torch.cat([batch.pop("hard_negative_vectors"), random_vectors.to(device)])
    negative_keys = torch.cat([batch.pop("hard_negative_keys"), random_keys.to(device)])
    positive_groups = batch.pop("positive_groups")
    graph = {name: batch.pop(name) for name in ("graph_vectors", "graph_keys", "graph_weights") if name in batch}
    query_vectors = model(**batch)
    positives, negatives = positives.to(query_vectors), negatives.to(query_vectors)
    loss, accuracy = contrastive_loss(
        query_vectors,
        positives,
        negatives,
        temperature=args.temperature,
        positive_keys=positive_keys,
        negative_keys=negative_keys,
        positive_groups=positive_groups,
        false_negative_margin=args.false_negative_margin if args.false_negative_margin >= 0 else None,
        not_negative_keys=graph["graph_keys"].view(len(positive_keys), -1) if graph else None,
    )
    logs = {"accuracy": accuracy}
    if graph and args.graph_weight > 0:
        logs["graph_loss"] = graph_loss(
            query_vectors,
            graph["graph_vectors"].to(query_vectors),
            graph["graph_weights"],
            temperature=args.temperature,
            anchor_keys=positive_keys,
            neighbour_keys=graph["graph_keys"],
            candidates=torch.cat([positives, negatives]),
            candidate_keys=torch.cat([positive_keys, negative_keys]),
        )
        loss = loss + args.graph_weight * logs["graph_loss"]
    return loss, logs


def main(argv=None):
    args = parse_args(argv)
    check_has_negatives(args, args.num_random_negatives)
    if args.pseudo_queries and args.query_graph_file:
        raise UserError("--query_graph_file names the queries of --train_file; pseudo-clicks have none, so drop it.")
    if args.pseudo_query_words is not None and args.pseudo_queries != "first_words":
        raise UserError("--pseudo_query_words sets the length of --pseudo_queries first_words; add that, or drop it.")
    if args.pseudo_queries and args.train_file:
        raise UserError(
            "--pseudo_queries makes the clicks from the corpus; drop --train_file, or drop --pseudo_queries."
        )
    if args.student_num_layers:
        total = model_depth(args.student_model, args.trust_remote_code)
        if args.student_num_layers >= total:
            raise UserError(
                f"--student_num_layers {args.student_num_layers} keeps all {total} layers of {args.student_model}; "
                "keep fewer, or drop the flag to refine the model as it is."
            )
    check_run_args(
        args, SCRIPT, inputs=[args.student_model, args.teacher_model, args.train_file, args.corpus_file, args.ad_store]
    )
    accelerator = make_accelerator(args)
    if (args.train_file is None and not args.pseudo_queries) or args.corpus_file is None:
        with accelerator.main_process_first():
            paths = demo_paths()
        args.train_file = args.train_file or (None if args.pseudo_queries else paths["train"])
        args.corpus_file = args.corpus_file or paths["ads"]
    set_seed(args.seed)

    # The teacher's ad vectors: a store on disk (built once by all processes when missing); each step reads
    # only the rows it needs from the memory-mapped shards. The teacher is known by its files: its weights
    # load only if the store must be built, and leave memory at once.
    teacher = EncoderSpec.read(
        args.teacher_model, trust_remote_code=args.trust_remote_code, allow_pickle=args.allow_pickle_weights
    )
    student_files = EncoderSpec.read(
        args.student_model, trust_remote_code=args.trust_remote_code, allow_pickle=args.allow_pickle_weights
    )
    check_student_of(student_files, teacher, args.student_model)  # phase 3 refines in phase 2's teacher's space
    ad_store = open_or_build_store(
        accelerator,
        teacher,
        rows_of_corpus(args.corpus_file, args.id_column, args.text_column),
        "ad",
        data_fp=corpus_fingerprint(args.corpus_file, args.id_column, args.text_column),
        path=args.ad_store,
        store_dir=default_store_dir(args),
        model_path=args.teacher_model,
        batch_size=args.encode_batch_size,
    )
    teacher.release()
    if args.pseudo_queries:
        words = (args.pseudo_query_words or PSEUDO_QUERY_WORDS) if args.pseudo_queries == "first_words" else None
        clicks = pseudo_clicks(iter_corpus(args.corpus_file, args.id_column, args.text_column), words=words)
    else:
        clicks = read_clicks(args, ad_store)
    graphs, columns = [], (args.graph_node_column, args.graph_neighbor_column, args.graph_weight_column)
    if args.ad_graph_file:  # ad ids -> store rows through the store's own index
        graph = read_graph(
            args.ad_graph_file, ad_store.find_rows, len(ad_store), columns=columns, what="an ad of the ad store"
        )
        log_graph(logger, graph, np.array([click["positive"] for click in clicks]), "clicked ad")
        graphs.append((graph, "positive"))
    if args.query_graph_file:  # query ids -> the ads their neighbours clicked (store rows)
        graphs.append(read_query_graph_of_rows(args.query_graph_file, clicks, "positive", columns=columns,
                                               what=f"a query id of {args.train_file}", logger=logger))  # fmt: skip

    # fp32 master weights whatever dtype the checkpoint was saved in; bf16 comes from mixed precision.
    layers = evenly_spaced_layers(student_files.depth, args.student_num_layers) if args.student_num_layers else None
    student = student_files.load(dtype="float32", layers=layers)  # a cut reads only the blocks it keeps
    if args.student_num_layers:  # an unaligned cut, e.g. of the teacher: phase 3 alone, the paper's baseline
        total = student_files.depth
        student.config.extra["teacher_layers"] = layers
        student.config.base_model = f"{args.student_model} (layers)"
        logger.info(f"Student: layers {layers} of {total} of {args.student_model}, not aligned (phase 3 only)")
    student.config.extra["teacher"] = str(args.teacher_model)
    student.config.extra["teacher_fingerprint"] = teacher.fingerprint  # the space of the ad vectors it learns
    ad_store = store_for_student(ad_store, student)  # truncated for a student aligned with --teacher_dim
    log_truncation(student, [click["query"] for click in clicks], "query", args.train_file or args.corpus_file)
    if args.gradient_checkpointing:
        student.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    # The collator holds the encoder itself (prepare() wraps the model in DDP below) for tokenising.
    collate = ClickCollator(
        student,
        ad_store,
        args.num_hard_negatives,
        args.seed,
        graphs,
        args.graph_neighbours,
        weighted=args.graph_sampling == "weighted",
    )
    dataloader = DataLoader(
        clicks,
        batch_size=args.per_device_train_batch_size,
        shuffle=True,
        drop_last=True,
        collate_fn=collate,
        num_workers=args.dataloader_num_workers,
    )
    if len(dataloader) < accelerator.num_processes:
        raise UserError(f"{len(clicks)} clicks are fewer than one global batch; lower --per_device_train_batch_size.")

    # Optimiser and schedule. Each process sees 1/num_processes of the batches; one optimiser step per
    # --gradient_accumulation_steps of them.
    optimizer = torch.optim.AdamW(
        optimizer_param_groups(student, args.weight_decay, accelerator), lr=args.learning_rate
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
    model, optimizer, dataloader, scheduler = accelerator.prepare(student, optimizer, dataloader, scheduler)
    accelerator.init_trackers(
        "refine_contrastive",
        config=tracker_config(args),
        init_kwargs=tracker_init_kwargs(accelerator, "refine_contrastive"),
    )
    progress = resume_from_checkpoint(accelerator, args, SCRIPT)
    loop = TrainLoop(accelerator, args, dataloader, progress, SCRIPT)
    log_banner(args, accelerator, len(clicks))

    model.train()
    for batch in loop:
        with accelerator.accumulate(model):
            random_rows = random_negative_rows(
                args, len(ad_store), progress.epoch, progress.batch_in_epoch, accelerator
            )
            random_vectors = torch.from_numpy(ad_store.read(random_rows))  # host memory: moved in the loss
            loss, logs = refinement_loss(model, batch, random_vectors, ad_keys(ad_store, random_rows), args)
            check_finite_loss(loss, loop.step)
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                clip_and_check_gradients(accelerator, model, args, loop.step)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        loop.end_of_batch(loss=loss, **logs, lr=scheduler.get_last_lr()[0])

    results = {f"train_{key}": value for key, value in loop.last_logs.items() if key != "step"}
    results.update(loop.speed())
    results |= {"steps": loop.step, "ad_store": ad_store.folder}
    save_final_model(accelerator, args, model, SCRIPT, "student", results, progress.log_history)
    accelerator.end_training()
    return results


if __name__ == "__main__":
    run_cli(main)
