"""Phase 2: L2 alignment of a small student query encoder to the frozen teacher (label-free).

L = mean_i ||f_S(q_i) - f_T(q_i)||^2 over query text only, so logged queries need no labels. The
teacher's query vectors are computed once into an embedding store (or read from one) and the teacher
is then freed; only the student trains. When the student's width differs from the teacher's, a linear
head is added and saved with the student (sentence-transformers `2_Dense`), so the student's vectors
live in the teacher's coordinates and are scored against the teacher's ad index as they are.

The student is any HF model (--student_model) or K layers of the teacher (--student_num_layers).
With --prune_schedule 14,7,4 the aligned student is then pruned progressively: at each step the
blocks that turn the hidden state most (1 - cos(input, output); --layer_importance norm_ratio for the
paper's ||output||/||input||) on calibration queries are kept (and, with
--ffn_keep_ratio, the FFN units with the largest activations), and the student is re-aligned.

Single machine (the embedded default: a 2-layer student cut from the demo teacher, CPU):
    python distill_student.py
Multi-GPU (plain DDP: students are < 600M parameters):
    accelerate launch --config_file accelerate_configs/multi_gpu.yaml distill_student.py \
        --teacher_model teacher --student_model Qwen/Qwen3-0.6B --query_file queries.parquet --output_dir student
Progressive pruning of the 28-layer Qwen3-0.6B student to 4 blocks, re-aligning after each step:
    accelerate launch --config_file accelerate_configs/multi_gpu.yaml distill_student.py \
        --teacher_model teacher --student_model Qwen/Qwen3-0.6B --query_file queries.parquet \
        --prune_schedule 14,7,4 --ffn_keep_ratio 0.75 --output_dir student-4l
"""

import argparse
import copy
import gc
import os

import numpy as np
import torch
from accelerate.utils import set_seed
from torch.utils.data import DataLoader

from common.data import check_text, data_fingerprint, load_table, require_columns
from common.demo_data import DEMO_ROOT, demo_paths
from common.encoder import Encoder, evenly_spaced_layers, keep_layers
from common.errors import UserError, run_cli
from common.pruning import importance, prune_ffn, prune_layers
from common.store import default_store_path, store_for
from common.training import (
    add_common_training_args,
    check_finite_loss,
    check_run_args,
    clip_and_check_gradients,
    log_truncation,
    logger,
    make_accelerator,
    parse_with_config,
    prepare_training,
    save_final_model,
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # Models
    group = parser.add_argument_group("Models")
    group.add_argument("--teacher_model", default=os.path.join(DEMO_ROOT, "teacher"))
    group.add_argument("--student_model", default=None, help="Hub id or folder; default: layers of the teacher.")
    group.add_argument("--student_num_layers", type=int, default=2, help="Teacher layers kept, evenly spaced.")
    group.add_argument("--student_layers", default=None, help="Exact teacher layers to keep, e.g. '0,3,5'.")
    group.add_argument("--pooling", choices=["mean", "cls", "last"], default=None, help="Student pooling override.")
    group.add_argument("--max_length", type=int, default=None)
    # Pruning
    group = parser.add_argument_group("Progressive pruning")
    group.add_argument("--prune_schedule", default=None, help="Block counts after each step, e.g. '14,7,4'.")
    group.add_argument("--ffn_keep_ratio", type=float, default=1.0, help="FFN units kept at each step (<= 1).")
    group.add_argument(
        "--layer_importance",
        choices=["block_influence", "norm_ratio"],
        default="block_influence",
        help="Block ranking: 1 - cos(in, out) (default), or ||out||/||in|| as in the paper's summaries.",
    )
    group.add_argument("--calibration_queries", type=int, default=512, help="Queries that rank blocks and units.")
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
    group.add_argument("--teacher_query_store", default=None, help="Store of the teacher's query vectors.")
    group.add_argument("--store_dir", default=None, help="Where default stores go; default: <output_dir>/../stores.")
    group.add_argument("--encode_batch_size", type=int, default=128)
    # Output
    group = parser.add_argument_group("Output")
    group.add_argument("--output_dir", default=os.path.join(DEMO_ROOT, "student-aligned"))
    group.add_argument("--overwrite_output_dir", action="store_true")
    add_common_training_args(parser)
    parser.set_defaults(learning_rate=2e-4, per_device_train_batch_size=64, num_train_epochs=4.0)
    return parse_with_config(parser, argv)


def read_queries(args):
    """Label-free texts: the queries, then any general text; ids are '<file index>:<row>'."""
    ids, texts = [], []
    for index, source in enumerate(filter(None, [args.query_file, args.general_text_file])):
        table = load_table(source, split=args.query_split)
        require_columns(table, [args.query_column], source, "--query_column")
        column = table[args.query_column]
        texts += [check_text(value, source, row, args.query_column) for row, value in enumerate(column)]
        ids += [f"{index}:{row}" for row in range(len(column))]
        if not len(column):
            raise UserError(f"{source} has no rows; point it at label-free text.")
    return ids, texts


def make_student(args, teacher):
    """A student in the teacher's output space: same prompts; a linear head when the widths differ."""
    if args.student_model:
        student = Encoder.from_pretrained(
            args.student_model,
            pooling=args.pooling,
            query_prompt=teacher.config.query_prompt,
            ad_prompt=teacher.config.ad_prompt,
            max_length=args.max_length or teacher.config.max_length,
            normalize=teacher.config.normalize,
            trust_remote_code=args.trust_remote_code,
            allow_pickle=args.allow_pickle_weights,
        )
    else:
        student = Encoder.from_pretrained(
            args.teacher_model, trust_remote_code=args.trust_remote_code, allow_pickle=args.allow_pickle_weights
        )
        total = student.backbone.config.num_hidden_layers
        layers = (
            [int(i) for i in args.student_layers.split(",")]
            if args.student_layers
            else evenly_spaced_layers(total, args.student_num_layers)
        )
        keep_layers(student, layers)
        student.config.extra["teacher_layers"] = layers
        logger.info(f"Student: teacher layers {layers} of {total}")
    if student.embedding_dim != teacher.embedding_dim:
        logger.info(f"Adding a projection head {student.hidden_size} -> {teacher.embedding_dim}")
        student.add_projection(teacher.embedding_dim)
    student.config.extra["teacher"] = str(args.teacher_model)
    student.config.base_model = args.student_model or f"{args.teacher_model} (layers)"
    return student


def align(accelerator, args, student, texts, teacher_vectors):
    """One L2 alignment run: the training loop, then the student saved to args.output_dir."""

    def collate(rows):
        batch = student.tokenize([texts[row] for row in rows], "query")
        batch["teacher_vectors"] = torch.from_numpy(np.asarray(teacher_vectors[np.sort(rows)], dtype=np.float32))
        batch["order"] = torch.as_tensor(np.argsort(np.argsort(rows)))
        return batch

    dataloader = DataLoader(
        list(range(len(texts))),
        batch_size=args.per_device_train_batch_size,
        shuffle=True,
        drop_last=len(texts) >= args.per_device_train_batch_size * accelerator.num_processes,
        collate_fn=collate,
        num_workers=args.dataloader_num_workers,
    )
    model, optimizer, scheduler, loop = prepare_training(
        accelerator, args, student, dataloader, len(texts), "distill_student"
    )
    model.train()
    for batch in loop:
        with accelerator.accumulate(model):
            # Store rows were read in sorted order (fast memmap access); put them back in batch order.
            teacher_targets = batch.pop("teacher_vectors")[batch.pop("order")]
            student_vectors = model(**batch)
            loss = (student_vectors.float() - teacher_targets).pow(2).sum(dim=1).mean()
            check_finite_loss(loss, loop.step)
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                clip_and_check_gradients(accelerator, model, args, loop.step)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        loop.end_of_batch(l2_loss=loss.item(), lr=scheduler.get_last_lr()[0])

    results = {f"train_{key}": value for key, value in loop.last_logs.items()} | {"steps": loop.step}
    save_final_model(accelerator, args, model, "distill_student.py", "student", results)
    student = accelerator.unwrap_model(model)
    accelerator.free_memory()  # the next pruning stage prepares a new model and optimiser
    return student, results


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
    check_run_args(args, "distill_student.py")
    accelerator = make_accelerator(args)
    if args.query_file is None:
        with accelerator.main_process_first():
            args.query_file = demo_paths()["queries"]
    set_seed(args.seed)
    ids, texts = read_queries(args)

    # The teacher's query vectors: encoded once by all processes, then the teacher leaves memory.
    teacher = Encoder.from_pretrained(
        args.teacher_model, trust_remote_code=args.trust_remote_code, allow_pickle=args.allow_pickle_weights
    )
    store_dir = args.store_dir or os.path.join(os.path.dirname(os.path.abspath(args.output_dir)), "stores")
    data_fp = data_fingerprint(ids, texts)
    store_path = args.teacher_query_store or default_store_path(
        store_dir, args.teacher_model, "query", teacher, data_fp
    )
    teacher_depth = teacher.backbone.config.num_hidden_layers
    teacher.to(accelerator.device)
    store = store_for(accelerator, teacher, ids, texts, "query", store_path, args.encode_batch_size, data_fp)
    teacher_vectors = store.vectors
    student = make_student(args, teacher.cpu())
    del teacher
    gc.collect()
    log_truncation(student, texts, "query", args.query_file)
    if args.gradient_checkpointing:
        student.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    # Progressive pruning: align, then (prune to K blocks, re-align) for each K of the schedule. Every
    # stage but the last is saved under <output_dir>/stages/, so a resumed run skips finished stages.
    schedule = [int(k) for k in args.prune_schedule.split(",")] if args.prune_schedule else []
    for stage, keep in enumerate([None, *schedule]):
        stage_args = copy.copy(args)
        if stage < len(schedule):
            stage_args.output_dir = os.path.join(args.output_dir, "stages", f"stage{stage}")
        finished = os.path.exists(os.path.join(stage_args.output_dir, "training_args.json"))
        if stage < len(schedule) and args.resume_from_checkpoint and finished:
            logger.info(f"Stage {stage} is finished; loading {stage_args.output_dir}")
            student = Encoder.from_pretrained(stage_args.output_dir).to(accelerator.device)
            continue
        if stage == 0 and schedule and student.config.extra.get("teacher_layers") == list(range(teacher_depth)):
            logger.info("Stage 0: the student is the whole teacher, already aligned; pruning starts at once.")
            student = student.to(accelerator.device)
            continue
        set_seed(args.seed + stage)  # each stage's randomness is its own, whether earlier stages ran or loaded
        if keep is not None:
            student = student.to(accelerator.device)
            logger.info(f"Stage {stage}: " + prune(student, keep, args, texts[: args.calibration_queries]))
        student, results = align(accelerator, stage_args, student, texts, teacher_vectors)
    results["teacher_query_store"] = store_path
    accelerator.end_training()
    return results


if __name__ == "__main__":
    run_cli(main)
