"""Phase 2: label-free alignment of a small student query encoder to the frozen teacher.

L = mean_i ||f_S(q_i) - f_T(q_i)||^2 over query text only, so logged queries need no labels. Given the
teacher's ads (--corpus_file or --ad_store) the default objective adds the KL divergence between the
teacher's and the student's softmax scores over 1024 of the teacher's ad vectors drawn per step: the
student then learns where it puts a query in the teacher's space and how the teacher ranks real ads
(benchmarks/distill_study.py: the largest gain on the real collections). Other objectives and weighted
sums with --alignment_loss (cosine, kernel; common/alignment.py); --token_loss_weight adds token-level
hidden-state matching for students cut from the teacher. The teacher's query vectors are computed once
into an embedding store (or read from one) and the teacher is then freed; only the student trains.
When the student's width differs from the teacher's, a linear head is added and saved with the student
(sentence-transformers `2_Dense`), so the student's vectors live in the teacher's coordinates and are
scored against the teacher's ad index as they are (--teacher_dim: against its first N coordinates).

The student is any HF model (--student_model) or K layers of the teacher (--student_num_layers). A student
cut from the teacher is pruned by default to the K blocks that turn the hidden state most (1 - cos(input, output)
on calibration queries): from the whole teacher when it has at most 3K layers (one stage, then aligned with the
whole budget), otherwise from 2K evenly spaced layers aligned first and re-aligned after pruning, the two stages
together at the compute of one alignment of the K-block student (--progressive_from none: the one-shot cut of K
evenly spaced layers; --progressive_from P: another start; the comparison on real collections is in
benchmarks/README.md).

With --prune_schedule 14,7,4 any student is pruned step by step instead: at each step the most important
blocks (--layer_importance norm_ratio for the paper's ||output||/||input||, first_last to keep the ends) are
kept (and, with --ffn_keep_ratio, the FFN units with the largest activations), and the student is re-aligned.

Single machine (the embedded default: a 2-layer student cut from the demo teacher, CPU):
    python distill_student.py
Multi-GPU (plain DDP: students are < 600M parameters):
    accelerate launch --config_file accelerate_configs/multi_gpu.yaml distill_student.py \
        --teacher_model teacher --student_model Qwen/Qwen3-0.6B --query_file queries.parquet \
        --corpus_file ads.parquet --learning_rate 1e-4 --output_dir student
Progressive pruning of the 28-layer Qwen3-0.6B student to 4 blocks, re-aligning after each step:
    accelerate launch --config_file accelerate_configs/multi_gpu.yaml distill_student.py \
        --teacher_model teacher --student_model Qwen/Qwen3-0.6B --query_file queries.parquet \
        --corpus_file ads.parquet --learning_rate 1e-4 --prune_schedule 14,7,4 --ffn_keep_ratio 0.75 \
        --output_dir student-4l
"""

import argparse
import gc
import json
import math
import os
from dataclasses import dataclass

import numpy as np
import torch
from accelerate.utils import set_seed

from common.alignment import alignment_loss, parse_objectives, token_state_loss
from common.args import (
    add_common_training_args,
    add_context_args,
    add_stream_filter_args,
    boolean,
    check_run_args,
    check_stream_filters_need_streaming,
    fraction,
    layer_list,
    non_negative_float,
    non_negative_int,
    parse_with_config,
    positive_float,
    positive_int,
    shrinking_schedule,
)
from common.data import (
    corpus_fingerprint,
    data_fingerprint,
    read_contexts,
    read_texts,
    with_context,
)
from common.demo_data import DEMO_ROOT, demo_paths
from common.encoder import Encoder, EncoderSpec
from common.errors import UserError, run_cli
from common.loop import (
    TrainLoop,
    check_finite_loss,
    clip_and_check_gradients,
    get_scheduler,
    optimizer_param_groups,
    resume_from_checkpoint,
    save_final_model,
)
from common.model_files import model_depth
from common.pruning import importance, prune_ffn, prune_layers
from common.run_folder import tracker_config, tracker_init_kwargs
from common.runtime import log_banner, log_truncation, logger, make_accelerator
from common.store import (
    EmbeddingStore,
    check_store_matches,
    default_store_dir,
    matryoshka_cut,
    open_or_build_store,
    rows_of_corpus,
    rows_of_lists,
)
from common.streaming import TextStream, open_or_build_stream_store
from common.surgery import evenly_spaced_layers, freeze_input_embeddings, truncate_output
from common.targets import InMemoryTargets, StreamTargets

SCRIPT = "distill_student.py"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # Models
    group = parser.add_argument_group("Models")
    group.add_argument("--teacher_model", default=os.path.join(DEMO_ROOT, "teacher"))
    group.add_argument("--student_model", default=None, help="Hub id or folder; default: layers of the teacher.")
    group.add_argument("--student_num_layers", type=positive_int, default=2, help="Teacher layers kept, evenly spaced.")
    group.add_argument(
        "--student_layers", type=layer_list, default=None, help="Exact teacher layers to keep, e.g. '0,3,5'."
    )
    group.add_argument("--pooling", choices=["mean", "cls", "last"], default=None, help="Student pooling override.")
    group.add_argument("--max_length", type=positive_int, default=None)
    group.add_argument(
        "--freeze_embeddings",
        type=boolean,
        nargs="?",
        const=True,
        default=False,
        help="Keep the student's input embeddings (tokens, positions) fixed; only the blocks and head train.",
    )
    group.add_argument(
        "--teacher_dim",
        type=positive_int,
        default=None,
        help="Align to the teacher's vectors truncated to their first N coordinates and re-normalised "
        "(Matryoshka); the student outputs N-d vectors, scored against the truncated ad index.",
    )
    # Objective
    group = parser.add_argument_group("Alignment objective")
    group.add_argument(
        "--alignment_loss",
        type=parse_objectives,
        default=None,
        help="l2, cosine, kl, kernel, or a weighted sum such as 'l2+0.5*kl' (see common/alignment.py). Default: "
        "'l2+kl' with ads (--corpus_file or --ad_store; kl then ranks the teacher's ad vectors), else 'l2'.",
    )
    group.add_argument(
        "--token_loss_weight",
        type=non_negative_float,
        default=0.0,
        help="Add this weight x the mean squared difference of the student's and the teacher's last hidden "
        "states at every token (students cut from the teacher; the teacher then runs in the loop, no store).",
    )
    group.add_argument(
        "--kl_ranks",
        choices=("auto", "ads", "texts", "batch"),
        default="auto",
        help="What the kl objective ranks: ads, the teacher's ad vectors (--corpus_file / --ad_store); texts, the "
        "teacher's vectors of the label-free texts (its query stores); batch, the teacher's vectors of the "
        "step's batch, gathered across processes. auto (default): ads when given, else batch.",
    )
    group.add_argument(
        "--num_ranked_ads",
        type=positive_int,
        default=1024,
        help="With --kl_ranks ads or texts: the teacher's vectors drawn per optimiser step (the same for every "
        "process) whose ranking the kl objective teaches.",
    )
    group.add_argument(
        "--alignment_temperature", type=positive_float, default=0.05, help="Softmax temperature of the kl objective."
    )
    # Pruning
    group = parser.add_argument_group("Progressive pruning")
    group.add_argument(
        "--prune_schedule", type=shrinking_schedule, default=None, help="Block counts after each step, e.g. '14,7,4'."
    )
    group.add_argument("--ffn_keep_ratio", type=fraction, default=1.0, help="FFN units kept at each step (<= 1).")
    group.add_argument(
        "--layer_importance",
        choices=["block_influence", "norm_ratio", "first_last"],
        default="block_influence",
        help="Block ranking: 1 - cos(in, out) (default); ||out||/||in|| as in the paper's summaries; or first_last: "
        "the first and last blocks always, the others by 1 - cos(in, out).",
    )
    group.add_argument(
        "--calibration_queries", type=positive_int, default=512, help="Queries that rank blocks and units."
    )
    group.add_argument(
        "--progressive_from",
        type=progressive_start,
        default="auto",
        help="A student cut from the teacher (--student_num_layers K) starts as this many evenly spaced teacher "
        "layers, is aligned, pruned to K blocks and re-aligned, both stages together at the compute of one "
        "--num_train_epochs run of the K-block student. auto (default): the whole teacher when it has at most 3K "
        "layers (one stage, the whole budget: the study's best recipe for 2 and 3 blocks of 6), else 2K; none: "
        "the one-shot cut of K evenly spaced layers.",
    )
    # Data
    group = parser.add_argument_group("Data")
    group.add_argument("--query_file", default=None, help="Label-free queries; default: the built-in data.")
    group.add_argument(
        "--general_text_file",
        default=None,
        help="General text mixed into the label-free queries (same column), so the student keeps general semantics.",
    )
    group.add_argument("--query_split", default="train")
    group.add_argument("--query_column", default="query")
    group.add_argument(
        "--id_column",
        default="id",
        help="Query ids; files without this column are numbered by row (as encode.py does).",
    )
    group.add_argument(
        "--teacher_query_store",
        default=None,
        help="Store of the teacher's vectors of --query_file (e.g. from encode.py --kind query); built when missing.",
    )
    group.add_argument("--teacher_general_store", default=None, help="Same, for --general_text_file.")
    add_context_args(group, where="--query_file")
    group.add_argument(
        "--corpus_file",
        default=None,
        help="The ads (id, text) the student will be scored against; their teacher vectors are built into a store "
        "once when missing. Default: the built-in ads when the queries are the built-in ones.",
    )
    group.add_argument("--ad_id_column", default="id")
    group.add_argument("--ad_text_column", default="text")
    group.add_argument(
        "--ad_store", default=None, help="The teacher's ad store (e.g. from encode.py --kind ad); built when missing."
    )
    group.add_argument("--store_dir", default=None, help="Where default stores go; default: <output_dir>/../stores.")
    group.add_argument("--encode_batch_size", type=positive_int, default=128)
    group = parser.add_argument_group("Streaming (label-free text at the scale of logged traffic)")
    group.add_argument(
        "--streaming",
        action="store_true",
        help="Read --query_file (a file, a folder or glob of shards, or a hub id) and --general_text_file as streams: "
        "no text is held whole. The teacher's targets come from a chunked store (--teacher_query_store, e.g. from "
        "encode.py --streaming; built resumably when missing) or, with --teacher_in_loop, from the teacher itself.",
    )
    group.add_argument(
        "--teacher_in_loop",
        action="store_true",
        help="Streaming: the frozen teacher encodes each batch inside the training loop (bf16 on GPUs): no store.",
    )
    group.add_argument(
        "--general_text_ratio",
        type=fraction,
        default=None,
        help="Streaming: share of the rows drawn from --general_text_file (e.g. 0.1).",
    )
    group.add_argument(
        "--shuffle_buffer",
        type=non_negative_int,
        default=10_000,
        help="Streaming with --teacher_in_loop: rows of the seeded shuffle buffer (0: stream order). A chunked store "
        "is shuffled by chunk and within each chunk instead.",
    )
    add_stream_filter_args(group)
    group = parser.add_argument_group("Batches")
    group.add_argument(
        "--group_by_length",
        type=boolean,
        nargs="?",
        const=True,
        default=True,
        help="Batches of texts of similar length (shuffled batch order), so little compute goes to padding "
        "(default true; 'false' for plain shuffled batches).",
    )
    # Output
    group = parser.add_argument_group("Output")
    group.add_argument("--output_dir", default=os.path.join(DEMO_ROOT, "student-aligned"))
    group.add_argument("--overwrite_output_dir", action="store_true")
    add_common_training_args(parser)
    # lr 1e-3: the best of the learning rates benchmarks/distill_study.py tried for the 2-layer MiniLM cut; a
    # student of hundreds of millions of parameters (Qwen3-0.6B) wants a smaller one (e.g. 1e-4).
    parser.set_defaults(learning_rate=1e-3, per_device_train_batch_size=64, num_train_epochs=4.0)
    return parse_with_config(parser, argv)


def progressive_start(text):
    """--progressive_from: 'auto', 'none' or a layer count >= 1."""
    if str(text).lower() in ("auto", "none"):
        return str(text).lower()
    try:
        return positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"{text!r} must be auto, none or an integer >= 1") from None


@dataclass
class Stage:
    """One alignment run of the distillation, as plain values: the student (pruned to `prune_to` blocks first,
    unless None) is aligned for this budget and saved to `output_dir`."""

    number: int
    prune_to: int | None
    output_dir: str
    num_train_epochs: float
    max_train_steps: int | None
    final: bool


def auto_progressive_start(blocks, teacher_depth):
    """--progressive_from auto: the whole teacher when it is at most 3x the student's depth (it is aligned
    already, so pruning it to K blocks is one stage with the whole budget: the study's best recipe for 2 and 3
    blocks of a 6-layer teacher); a deeper teacher: 2K evenly spaced layers aligned, then pruned to K (one-shot
    pruning by a large factor loses: the paper's 28 -> 4 in one shot gave 50.2 P@100 against 60.4
    progressively). None for a cut as deep as the teacher (refused elsewhere)."""
    if teacher_depth <= blocks:
        return None
    return teacher_depth if teacher_depth <= 3 * blocks else 2 * blocks


def plan_stages(args, teacher_depth):
    """(teacher layers the student is cut to, the stages). One stage without pruning; with --prune_schedule one
    more stage per step, each with the whole budget. A plain cut of K layers (--student_num_layers K alone) is
    progressive by default: --progressive_from P (auto: `auto_progressive_start`) cuts P layers, aligns them, prunes to
    K blocks and re-aligns, each stage given K / (P + K) of the epochs (and of --max_train_steps), so that
    P x share + K x share = K passes-of-a-block: the compute of aligning the K-block student once. A P-layer cut
    that is the whole teacher is already aligned: its one stage (pruning to K) gets the whole budget. Every stage
    but the last goes to <output_dir>/stages/stageN."""
    blocks, schedule, share = args.student_num_layers, args.prune_schedule or [], 1.0
    cut = len(args.student_layers) if args.student_layers else blocks
    plain_cut = not (args.student_model or args.student_layers or args.prune_schedule)
    start = None  # the layers a progressive run starts from; None: not progressive
    if args.progressive_from == "auto":
        start = auto_progressive_start(blocks, teacher_depth) if plain_cut else None
    elif args.progressive_from != "none":
        start = args.progressive_from
        if not plain_cut:
            raise UserError(
                "--progressive_from cuts the teacher and prunes the cut to --student_num_layers; drop "
                "--student_model, --student_layers and --prune_schedule, or drop --progressive_from."
            )
        if not blocks < start <= teacher_depth:
            raise UserError(
                f"--progressive_from {start} must be more than --student_num_layers {blocks} and at most the "
                f"teacher's {teacher_depth} layers."
            )
    if start is not None:
        cut, schedule = start, [blocks]
        share = blocks / (start + blocks) if start < teacher_depth else 1.0
        logger.info(
            f"Progressive: {start} teacher layers pruned to {blocks} blocks, "
            + (f"each stage {share:.3f} of the budget" if share < 1 else "one stage with the whole budget")
            + " (--progressive_from none: the one-shot cut)"
        )
    epochs = args.num_train_epochs * share
    steps = max(1, round(args.max_train_steps * share)) if args.max_train_steps else None
    stages = []
    for number, prune_to in enumerate([None, *schedule]):
        final = number == len(schedule)
        folder = args.output_dir if final else os.path.join(args.output_dir, "stages", f"stage{number}")
        stages.append(Stage(number, prune_to, folder, epochs, steps, final))
    return cut, stages


def check_depths(args):
    """Layer counts against the models' real depths, read from their configs before any weights load."""
    teacher_depth = model_depth(args.teacher_model, args.trust_remote_code)
    if args.student_model:
        if args.student_layers:
            raise UserError("--student_layers cuts the teacher; it cannot be combined with --student_model.")
        depth = model_depth(args.student_model, args.trust_remote_code)
    elif args.student_layers:
        if args.student_layers[-1] >= teacher_depth:
            raise UserError(
                f"--student_layers {','.join(map(str, args.student_layers))} names a layer the "
                f"{teacher_depth}-layer teacher does not have; use indices 0 to {teacher_depth - 1}."
            )
        depth = len(args.student_layers)
    else:
        if args.student_num_layers > teacher_depth:
            raise UserError(
                f"--student_num_layers {args.student_num_layers} is deeper than the {teacher_depth}-layer teacher; "
                "use fewer layers."
            )
        depth = args.student_num_layers
    if not args.student_model and depth == teacher_depth and not args.prune_schedule:
        raise UserError(
            f"A student with all {teacher_depth} layers of the teacher is the teacher: aligning it changes nothing; "
            "keep fewer layers (--student_num_layers) or add --prune_schedule."
        )
    if args.prune_schedule and args.prune_schedule[0] >= depth:
        raise UserError(
            f"--prune_schedule {','.join(map(str, args.prune_schedule))} must start below the student's {depth} "
            "blocks; each step keeps fewer blocks than the one before."
        )


def check_token_targets(student, teacher):
    """Token states can be matched only between models that split text the same way and are as wide."""
    if student.hidden_size != teacher.hidden_size or student.tokenizer.get_vocab() != teacher.tokenizer.get_vocab():
        raise UserError(
            "--token_loss_weight matches hidden states token by token, so the student needs the teacher's tokenizer "
            f"and width ({teacher.hidden_size}); cut the student from the teacher (--student_num_layers), or drop "
            "--token_loss_weight."
        )


def read_label_free_texts(args):
    """[(ids, texts, what the teacher reads, store flag value)] for the query file, then the general text file
    if any. With --query_context_column the teacher reads each query with its teacher-only context (the store
    holds the teacher's vectors of those); the student reads the queries alone."""
    sources = [(args.query_file, args.teacher_query_store), (args.general_text_file, args.teacher_general_store)]
    read = []
    for source, store_path in sources:
        if source is None:
            continue
        ids, texts = read_texts(source, args.id_column, args.query_column, args.query_split, ids_optional=True)
        if not texts:
            raise UserError(f"{source} has no rows; point it at label-free text.")
        teacher_texts = texts
        if args.query_context_column and source == args.query_file:
            contexts = read_contexts(source, args.query_context_column, args.query_split)
            teacher_texts = [with_context(t, c, args.context_template) for t, c in zip(texts, contexts)]
        read.append((ids, texts, teacher_texts, store_path))
    return read


def check_streaming_args(args):
    """Streaming flags that contradict each other or need a companion, refused before any model loads."""
    check_stream_filters_need_streaming(args)
    if not args.streaming:
        if args.teacher_in_loop or args.general_text_ratio is not None:
            raise UserError("--teacher_in_loop and --general_text_ratio are streaming options; add --streaming.")
        return
    if args.teacher_in_loop and (args.teacher_query_store or args.teacher_general_store):
        raise UserError("--teacher_in_loop needs no store; drop --teacher_query_store/--teacher_general_store.")
    if args.general_text_file and args.general_text_ratio is None:
        raise UserError("--general_text_file in streaming mode needs --general_text_ratio (e.g. 0.1).")
    if args.general_text_ratio is not None and not args.general_text_file:
        raise UserError("--general_text_ratio needs --general_text_file.")
    if args.general_text_ratio is not None and args.general_text_ratio >= 1:
        raise UserError("--general_text_ratio must be below 1 (the queries must be drawn too).")
    if args.teacher_in_loop and not args.max_train_steps:
        raise UserError(
            "A stream's length is unknown before it is read: pass --max_train_steps with --teacher_in_loop (or train "
            "from a chunked store, whose length is known)."
        )


def stream_of(args, source, context):
    """A TextStream of a label-free file with the run's filters (the teacher reads query + context if asked)."""
    return TextStream(
        source,
        args.query_column,
        args.query_split,
        context_column=args.query_context_column if context else None,
        context_template=args.context_template,
        min_chars=args.min_query_chars,
        max_chars=args.max_query_chars,
        dedupe_capacity=args.dedupe_capacity,
        shuffle_buffer=args.shuffle_buffer if args.teacher_in_loop else 0,
        seed=args.seed,
    )


def open_stream_sources(accelerator, args, teacher):
    """(query source, general-text source or None) for --streaming: the text streams themselves with
    --teacher_in_loop, else chunked stores of the teacher's vectors of them (opened, or built resumably)."""
    sources = []
    for source, store_path, context in (
        (args.query_file, args.teacher_query_store, True),
        (args.general_text_file, args.teacher_general_store, False),
    ):
        if source is None:
            sources.append(None)
            continue
        stream = stream_of(args, source, context)
        if not args.teacher_in_loop:
            stream = open_or_build_stream_store(
                accelerator, teacher, stream, store_path, default_store_dir(args), args.teacher_model,
                args.chunk_rows, args.encode_batch_size, seed=args.seed, dim=args.teacher_dim,
            )  # fmt: skip
        sources.append(stream)
    return sources


def open_training_rows(accelerator, args, teacher):
    """The rows phase 2 trains on (common/targets.py) and the folder of the teacher's query store (None with the
    teacher in the loop). Without --streaming the label-free texts are read whole and the teacher's vectors of
    them come from stores (opened, or built once); with --streaming nothing is read whole: the rows come from
    chunked stores of the streams (opened, or built resumably) or, with --teacher_in_loop, from the streams."""
    if not args.streaming:
        sources = read_label_free_texts(args)
        stores = []
        for ids, texts, teacher_texts, store_path in sources:
            store = open_or_build_store(
                accelerator, teacher, rows_of_lists(ids, texts, teacher_texts), "query",
                data_fp=data_fingerprint(ids, teacher_texts), path=store_path, store_dir=default_store_dir(args),
                model_path=args.teacher_model, batch_size=args.encode_batch_size,
            )  # fmt: skip
            stores.append(store)
        store = EmbeddingStore.stack(stores)
        if args.teacher_dim:
            store = store.truncated(args.teacher_dim)
        texts = [text for _, source_texts, _, _ in sources for text in source_texts]  # what the student reads
        rows = InMemoryTargets(texts, store, args.seed, args.group_by_length, args.dataloader_num_workers)
        return rows, stores[0].folder
    queries, general = open_stream_sources(accelerator, args, teacher)
    rows = StreamTargets(queries, general, args.general_text_ratio or 0.0, args.seed)
    return rows, None if args.teacher_in_loop else queries.folder


def open_ad_store(accelerator, args, teacher):
    """The teacher's ad vectors whose ranking the kl objective teaches, or None: --ad_store opened (checked
    against the teacher), or with --corpus_file opened or built once (the ads are streamed: a fingerprint pass,
    then the build if the store is missing; no text is held)."""
    if args.corpus_file:
        ad_store = open_or_build_store(
            accelerator, teacher, rows_of_corpus(args.corpus_file, args.ad_id_column, args.ad_text_column), "ad",
            data_fp=corpus_fingerprint(args.corpus_file, args.ad_id_column, args.ad_text_column),
            path=args.ad_store, store_dir=default_store_dir(args), model_path=args.teacher_model,
            batch_size=args.encode_batch_size,
        )  # fmt: skip
    elif args.ad_store:
        ad_store = EmbeddingStore.open(args.ad_store, model_fingerprint=teacher.fingerprint, kind="ad")
        check_store_matches(ad_store, teacher, "ad")
    else:
        return None
    return ad_store.truncated(args.teacher_dim) if args.teacher_dim else ad_store


def kl_ranks(args, with_ads):
    """What the kl objective ranks ('ads', 'texts', 'batch'; None without kl), checked before any work:
    --kl_ranks auto means the ads when given, else the batch."""
    if "kl" not in [name for _, name in args.alignment_loss]:
        if args.kl_ranks != "auto":
            raise UserError(
                f"--kl_ranks {args.kl_ranks} says what the kl objective ranks; add kl to --alignment_loss "
                "(e.g. 'l2+kl') or drop --kl_ranks."
            )
        return None
    ranks = args.kl_ranks if args.kl_ranks != "auto" else ("ads" if with_ads else "batch")
    if ranks == "ads" and not with_ads:
        raise UserError(
            "--kl_ranks ads ranks the teacher's ad vectors; give them with --corpus_file or --ad_store, or use "
            "--kl_ranks texts (the label-free texts' vectors) or batch."
        )
    if ranks != "ads" and with_ads:
        raise UserError(
            f"--kl_ranks {ranks} leaves the ads of --corpus_file/--ad_store unused; drop them or use --kl_ranks ads."
        )
    if ranks == "texts" and args.teacher_in_loop:
        raise UserError(
            "--kl_ranks texts ranks the teacher's stored vectors of the label-free texts, which --teacher_in_loop "
            "does not keep; drop --teacher_in_loop or use --kl_ranks batch."
        )
    return ranks


def open_ranked_store(ranks, rows, ad_store):
    """The store whose teacher vectors the kl objective ranks (--num_ranked_ads of them drawn per optimiser
    step), or None (no kl, or kl over the step's batch); `ranks` from kl_ranks()."""
    if ranks == "ads":
        return ad_store
    if ranks != "texts":
        return None
    if isinstance(rows, InMemoryTargets):
        return rows.store  # the teacher's vectors of the query file and the general text, memory-mapped
    return EmbeddingStore.stack([source.store for source in (rows.queries, rows.general) if source is not None])


def make_student(args, teacher, cut_layers):
    """A student in the teacher's output space: --student_model, or `cut_layers` evenly spaced teacher layers
    (--student_layers: those). Same prompts as the teacher; a linear head when the widths differ."""
    # fp32 master weights whatever dtype the checkpoint was saved in; bf16 comes from mixed precision.
    if args.student_model:
        student = Encoder.from_pretrained(
            args.student_model,
            dtype="float32",
            pooling=args.pooling,
            query_prompt=teacher.config.query_prompt,
            ad_prompt=teacher.config.ad_prompt,
            max_length=args.max_length or teacher.config.max_length,
            normalize=teacher.config.normalize,
            trust_remote_code=args.trust_remote_code,
            allow_pickle=args.allow_pickle_weights,
        )
    else:
        # Only the kept blocks (and the embeddings) are read from the teacher's weight files.
        total = teacher.depth
        layers = args.student_layers or evenly_spaced_layers(total, cut_layers)
        student = teacher.load(dtype="float32", layers=layers)
        student.config.extra["teacher_layers"] = layers
        student.config.max_length = args.max_length or student.config.max_length  # default: the teacher's
        logger.info(f"Student: teacher layers {layers} of {total}")
    target_dim = args.teacher_dim or teacher.embedding_dim
    if args.teacher_dim and not args.student_model:
        # A cut of the teacher starts exactly at the truncated teacher: a head keeping the first coordinates.
        logger.info(f"Matryoshka: the student outputs the first {target_dim} of {teacher.embedding_dim} coordinates")
        truncate_output(student, target_dim)
    elif student.embedding_dim != target_dim:
        logger.info(f"Adding a projection head {student.hidden_size} -> {target_dim}")
        student.add_projection(target_dim)
    if args.teacher_dim:
        student.config.extra["teacher_dim"] = args.teacher_dim  # the ad index is truncated the same way
    student.config.extra["teacher"] = str(args.teacher_model)
    student.config.extra["teacher_fingerprint"] = teacher.fingerprint  # evaluate.py and phase 3 check it
    student.config.base_model = args.student_model or f"{args.teacher_model} (layers)"
    return student


def load_stage(args, folder):
    """A finished stage of this run, loaded as the run loads its student (fp32, the run's remote-code and
    weight-format permissions, gradient checkpointing when asked)."""
    student = Encoder.from_pretrained(
        folder, dtype="float32", trust_remote_code=args.trust_remote_code, allow_pickle=args.allow_pickle_weights
    )
    if args.gradient_checkpointing:
        student.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return student


def stage_steps(folder):
    """The optimiser steps a finished stage took (its all_results.json)."""
    with open(os.path.join(folder, "all_results.json"), encoding="utf-8") as handle:
        return int(json.load(handle)["steps"])


def align(accelerator, args, student, rows, teacher, ranked_store, stage, step_offset=0):
    """One stage: the training loop over `rows` (common/targets.py), then the student saved to the stage's
    folder. `teacher` (frozen, on the device) is given with --token_loss_weight (its hidden states are the targets
    of every token) and with --teacher_in_loop (its vectors are the targets); `ranked_store`: the teacher's
    vectors (of ads, or of the label-free texts) that the kl objective ranks, or None. `step_offset`: the
    optimiser steps of earlier stages (the trackers count on)."""
    # This stage's run, which common/loop.py reads: the script's flags with the stage's folder and budget.
    run = argparse.Namespace(**vars(args))
    run.output_dir, run.push_to_hub = stage.output_dir, args.push_to_hub and stage.final  # stages are never pushed
    run.num_train_epochs = stage.num_train_epochs

    dataloader = rows.dataloader(
        accelerator, student.tokenize, args.per_device_train_batch_size, args.gradient_accumulation_steps
    )  # student.tokenize: the encoder's own method (prepare() wraps the model in DDP below)
    if args.freeze_embeddings:
        logger.info(f"Input embeddings frozen: {freeze_input_embeddings(student) / 1e6:.1f}M parameters")

    # Optimiser and schedule. Each process sees 1/num_processes of the batches; one optimiser step per
    # --gradient_accumulation_steps of them.
    optimizer = torch.optim.AdamW(
        optimizer_param_groups(student, args.weight_decay, accelerator), lr=args.learning_rate
    )
    steps_per_epoch = rows.steps_per_epoch(dataloader, accelerator.num_processes, args.gradient_accumulation_steps)
    run.max_train_steps = stage.max_train_steps or max(math.ceil(stage.num_train_epochs * steps_per_epoch), 1)
    if run.num_warmup_steps is None:
        run.num_warmup_steps = int(0.05 * run.max_train_steps)
    # accelerate steps a prepared scheduler once per process at every optimiser step, so the schedule counts
    # num_processes x the optimiser steps (as in the HF *_no_trainer examples); the learning rate at each
    # optimiser step is then the same for any number of processes.
    scheduler = get_scheduler(
        args.lr_scheduler_type,
        optimizer,
        num_warmup_steps=run.num_warmup_steps * accelerator.num_processes,
        num_training_steps=run.max_train_steps * accelerator.num_processes,
    )
    if rows.prepared_by_accelerate:
        model, optimizer, dataloader, scheduler = accelerator.prepare(student, optimizer, dataloader, scheduler)
    else:
        model, optimizer, scheduler = accelerator.prepare(student, optimizer, scheduler)
    if not accelerator.trackers:  # once per script, also when later stages align again
        accelerator.init_trackers(
            "distill_student",
            config=tracker_config(run),
            init_kwargs=tracker_init_kwargs(accelerator, "distill_student"),
        )
    progress = resume_from_checkpoint(accelerator, run, SCRIPT)
    loop = TrainLoop(accelerator, run, dataloader, progress, SCRIPT, tracker_step_offset=step_offset)
    log_banner(run, accelerator, rows.num_examples)

    model.train()
    for batch in loop:
        with accelerator.accumulate(model):
            ranked_vectors = None
            if ranked_store is not None:
                # One draw per optimiser step, a function of (seed, epoch, step in epoch) only: every process and
                # micro-batch of the step ranks the same vectors, and a resumed run draws them again.
                step_in_epoch = (loop.progress.batch_in_epoch - 1) // args.gradient_accumulation_steps
                rng = np.random.default_rng([args.seed, loop.progress.epoch, step_in_epoch])
                ranked_rows = rng.integers(len(ranked_store), size=min(args.num_ranked_ads, len(ranked_store)))
                ranked_vectors = torch.from_numpy(ranked_store.read(ranked_rows))  # host memory: moved in the loss
            loss, logs = distillation_loss(accelerator, model, batch, args, teacher, ranked_vectors)
            check_finite_loss(loss, loop.step)
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                clip_and_check_gradients(accelerator, model, args, loop.step)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        loop.end_of_batch(**logs, lr=scheduler.get_last_lr()[0])

    results = {f"train_{key}": value for key, value in loop.last_logs.items() if key != "step"}
    results.update(loop.speed())
    results["steps"] = loop.step
    save_final_model(accelerator, run, model, SCRIPT, "student", results, progress.log_history)
    student = accelerator.unwrap_model(model)
    accelerator.free_memory()  # the next stage prepares a new model and optimiser
    return student, results


def distillation_loss(accelerator, model, batch, args, teacher=None, ranked_vectors=None):
    """(loss, logs) of one batch: the alignment objective of the student's vectors to the teacher's (from the
    batch, or from the frozen teacher in the loop), plus the token-state loss when asked.

    `batch` holds the student's inputs on the model's device; the teacher's vectors and the ranked ads come
    from stores in host memory, so they are moved here (tests/test_device.py runs this function with the
    batch on a non-CPU device). L2 by default: sum over dimensions, mean over the batch; with DDP's gradient
    averaging, N processes with B/N queries each give exactly the gradient of one batch of B (and so does
    accumulation)."""
    device = batch["input_ids"].device
    if "teacher_texts" in batch:  # --teacher_in_loop: the frozen teacher's vectors of this batch
        teacher_inputs = teacher.tokenize(batch.pop("teacher_texts"), "query").to(device)
        with torch.no_grad(), accelerator.autocast():
            teacher_targets = teacher(**teacher_inputs).float()
        teacher_targets = matryoshka_cut(teacher_targets, args.teacher_dim, teacher.config.normalize)
    else:
        teacher_targets = batch.pop("teacher_vectors").to(device)
    student_vectors, student_states = model(**batch, return_token_states=True)
    items = ranked_vectors.to(device) if ranked_vectors is not None else None
    loss = alignment_loss(student_vectors, teacher_targets, args.alignment_loss, args.alignment_temperature, items)
    logs = {"alignment_loss": loss.detach()}
    if args.token_loss_weight > 0:
        with torch.no_grad(), accelerator.autocast():
            _, teacher_states = teacher(**batch, return_token_states=True)
        token_loss = token_state_loss(student_states, teacher_states, batch["attention_mask"])
        loss = loss + args.token_loss_weight * token_loss
        logs["token_loss"] = token_loss.detach()
    return loss, logs


def prune(student, keep_layers_count, args, calibration):
    """One pruning step: keep the most important blocks (and FFN units); returns a description."""
    intermediate = student.backbone.config.intermediate_size
    layer_scores, unit_scores = importance(student, calibration, criterion=args.layer_importance)
    kept = prune_layers(student, layer_scores, keep_layers_count)
    if "teacher_layers" in student.config.extra:  # a student cut from the teacher: which teacher blocks remain
        student.config.extra["teacher_layers"] = [student.config.extra["teacher_layers"][i] for i in kept]
    description = f"kept blocks {kept} of {len(layer_scores)} (importance {[round(s, 3) for s in layer_scores]})"
    if args.ffn_keep_ratio < 1:
        keep_units = max(int(intermediate * args.ffn_keep_ratio), 1)
        prune_ffn(student, [unit_scores[i] for i in kept], keep_units)
        description += f", FFN units {intermediate} -> {keep_units}"
    student.config.extra.setdefault("pruning", []).append(description)
    return description


def main(argv=None):
    args = parse_args(argv)
    check_streaming_args(args)
    if args.query_context_column and args.token_loss_weight > 0:
        raise UserError(
            "--token_loss_weight matches the teacher's hidden states token by token on the student's own text, "
            "which --query_context_column changes for the teacher; use one or the other."
        )
    check_depths(args)  # the models' depths, read from their configs
    teacher_depth = model_depth(args.teacher_model, args.trust_remote_code)
    cut_layers, stages = plan_stages(args, teacher_depth)
    with_ads = bool(args.corpus_file or args.ad_store or args.query_file is None)  # None: the built-in data
    if args.alignment_loss is None:  # the study in benchmarks/distill_study.py: ranking real ads adds most
        args.alignment_loss = parse_objectives("l2+kl" if with_ads else "l2")
    if (args.corpus_file or args.ad_store) and "kl" not in [name for _, name in args.alignment_loss]:
        raise UserError(
            "--corpus_file/--ad_store give the ads that the kl objective ranks; add kl to --alignment_loss "
            "(e.g. 'l2+kl') or drop them."
        )
    ranks = kl_ranks(args, with_ads)
    check_run_args(
        args,
        SCRIPT,
        inputs=[
            args.teacher_model,
            args.student_model,
            args.query_file,
            args.general_text_file,
            args.teacher_query_store,
            args.teacher_general_store,
            args.corpus_file,
            args.ad_store,
        ],
    )
    accelerator = make_accelerator(args)
    if args.query_file is None:
        with accelerator.main_process_first():
            args.query_file = demo_paths()["queries"]
            args.corpus_file = args.corpus_file or (None if args.ad_store else demo_paths()["ads"])
    set_seed(args.seed)

    # The teacher as its files declare it (prompts, width, depth, fingerprint): enough to check its stores and
    # to cut the student. Its weights load once, in their own dtype, only where it encodes: to build a missing
    # store, or in the loop. Each step reads only its batch's rows from the memory-mapped store chunks.
    teacher = EncoderSpec.read(
        args.teacher_model, trust_remote_code=args.trust_remote_code, allow_pickle=args.allow_pickle_weights
    )
    if args.teacher_dim and args.teacher_dim > teacher.embedding_dim:
        raise UserError(
            f"--teacher_dim {args.teacher_dim} is wider than the teacher's {teacher.embedding_dim}-d vectors; "
            f"use at most {teacher.embedding_dim}."
        )
    student = make_student(args, teacher, cut_layers)
    if args.token_loss_weight > 0:
        check_token_targets(student, teacher.load_once())
    rows, query_store_folder = open_training_rows(accelerator, args, teacher)
    ranked_store = open_ranked_store(ranks, rows, open_ad_store(accelerator, args, teacher))
    if args.token_loss_weight > 0 or args.teacher_in_loop:  # the teacher stays, frozen, in the loop
        teacher = teacher.load_once().eval().requires_grad_(False).to(accelerator.device)
        if accelerator.device.type == "cuda" and torch.cuda.is_bf16_supported() and args.teacher_in_loop:
            teacher = teacher.to(torch.bfloat16)  # frozen: bf16 weights halve its memory and time
    else:
        teacher.release()  # a teacher loaded to build a store leaves memory before the student trains
        teacher = None
        gc.collect()
    calibration = rows.sample_texts(args.calibration_queries)
    log_truncation(student, rows.sample_texts(100_000), "query", args.query_file)
    if args.gradient_checkpointing:
        student.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    # The stages: align, then (prune, re-align) for each step of the schedule. A finished stage of a resumed
    # run is loaded, not trained again. Only the final student is pushed, and the trackers' steps run on across
    # stages, so a tracker shows one run.
    steps_before = 0
    for stage in stages:
        finished = os.path.exists(os.path.join(stage.output_dir, "training_args.json"))
        if not stage.final and args.resume_from_checkpoint and finished:
            logger.info(f"Stage {stage.number} is finished; loading {stage.output_dir}")
            student = load_stage(args, stage.output_dir).to(accelerator.device)
            steps_before += stage_steps(stage.output_dir)
            continue
        if (
            stage.number == 0
            and not stage.final
            and student.config.extra.get("teacher_layers") == list(range(teacher_depth))
        ):
            logger.info("Stage 0: the student is the whole teacher, already aligned; pruning starts at once.")
            student = student.to(accelerator.device)
            continue
        set_seed(args.seed + stage.number)  # each stage's randomness is its own, whether earlier stages ran or loaded
        if stage.prune_to is not None:
            student = student.to(accelerator.device)
            logger.info(f"Stage {stage.number}: " + prune(student, stage.prune_to, args, calibration))
        student, results = align(accelerator, args, student, rows, teacher, ranked_store, stage, steps_before)
        steps_before += results["steps"]
    results["teacher_query_store"] = query_store_folder
    accelerator.end_training()
    return results


if __name__ == "__main__":
    run_cli(main)
