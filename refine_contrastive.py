"""Phase 3: contrastive refinement of the student's queries against the teacher's frozen ad vectors.

Only the student query encoder trains. Ads are never re-encoded: positives, hard negatives and
random negatives are rows of the teacher's ad store, so the teacher's ad index is reused as it is.
Because ad vectors are free here, every batch also gets --num_random_negatives ads from the store.

Single machine (the embedded default: refines the aligned demo student, CPU):
    python refine_contrastive.py
Multi-GPU (DDP):
    accelerate launch --config_file accelerate_configs/multi_gpu.yaml refine_contrastive.py \
        --student_model student-aligned --teacher_model teacher --corpus_file ads.parquet \
        --train_file clicks.jsonl --output_dir student
"""

import argparse
import os

import numpy as np
import torch
from accelerate.utils import set_seed
from torch.utils.data import DataLoader

from common.data import check_text, data_fingerprint, load_table, read_texts, require_columns, text_key
from common.demo_data import DEMO_ROOT, demo_paths
from common.encoder import Encoder
from common.errors import UserError, run_cli
from common.loss import contrastive_loss
from common.store import default_store_path, store_for
from common.training import (
    add_common_training_args,
    check_finite_loss,
    check_run_args,
    clip_and_check_gradients,
    log_truncation,
    make_accelerator,
    parse_with_config,
    prepare_training,
    save_final_model,
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # Models
    group = parser.add_argument_group("Models")
    group.add_argument("--student_model", default=os.path.join(DEMO_ROOT, "student-aligned"))
    group.add_argument(
        "--teacher_model",
        default=os.path.join(DEMO_ROOT, "teacher"),
        help="Encodes the ad store if it does not exist yet, and proves an existing one current.",
    )
    # Data
    group = parser.add_argument_group("Data")
    group.add_argument("--train_file", default=None, help="Clicks; default: the built-in data.")
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
    group.add_argument("--encode_batch_size", type=int, default=128)
    # Loss
    group = parser.add_argument_group("Loss")
    group.add_argument("--num_hard_negatives", type=int, default=1)
    group.add_argument("--num_random_negatives", type=int, default=256, help="Ads from the store per batch.")
    group.add_argument("--temperature", type=float, default=0.05)
    group.add_argument("--false_negative_margin", type=float, default=0.1, help="Negative value: no margin mask.")
    # Output
    group = parser.add_argument_group("Output")
    group.add_argument("--output_dir", default=os.path.join(DEMO_ROOT, "student"))
    group.add_argument("--overwrite_output_dir", action="store_true")
    add_common_training_args(parser)
    parser.set_defaults(learning_rate=5e-5, per_device_train_batch_size=64, num_train_epochs=1.0)
    return parse_with_config(parser, argv)


def read_clicks(args, store, ad_texts):
    """(query text, positive row, hard-negative rows, group key) per click, rows into the ad store."""
    table = load_table(args.train_file, split=args.train_split)
    columns = table.column_names
    use_ids = args.positive_id_column in columns
    require_columns(
        table, [args.query_column, args.positive_id_column if use_ids else args.positive_column], args.train_file
    )
    if use_ids:
        positive_ids = [str(value) for value in table[args.positive_id_column]]
        negative_ids = table[args.negative_ids_column] if args.negative_ids_column in columns else [[]] * len(table)
    else:  # texts only: find each ad by its text in the corpus
        row_of_text = {}
        for item_id, text in zip(store.ids, ad_texts):
            row_of_text.setdefault(text, item_id)

        def ids_of(texts, row, column):
            missing = [text for text in texts if text not in row_of_text]
            if missing:
                raise UserError(
                    f"{args.train_file} row {row}, column '{column}': ad text {missing[0][:60]!r} is not in the "
                    "corpus; add the ad to --corpus_file or give ad ids."
                )
            return [row_of_text[text] for text in texts]

        positive_ids = [
            ids_of([text], row, args.positive_column)[0] for row, text in enumerate(table[args.positive_column])
        ]
        negatives = table[args.negatives_column] if args.negatives_column in columns else [[]] * len(table)
        negative_ids = [ids_of(texts or [], row, args.negatives_column) for row, texts in enumerate(negatives)]
    groups = table[args.group_column] if args.group_column in columns else positive_ids
    clicks = []
    for row, query in enumerate(table[args.query_column]):
        clicks.append(
            {
                "query": check_text(query, args.train_file, row, args.query_column),
                "positive": int(store.rows([positive_ids[row]])[0]),
                "negatives": [int(r) for r in store.rows([str(i) for i in (negative_ids[row] or [])])],
                "group": text_key(str(groups[row])),
            }
        )
    if not clicks:
        raise UserError(f"{args.train_file} has no rows; point --train_file at the clicks.")
    return clicks


def main(argv=None):
    args = parse_args(argv)
    check_run_args(args, "refine_contrastive.py")
    accelerator = make_accelerator(args)
    if args.train_file is None or args.corpus_file is None:
        with accelerator.main_process_first():
            paths = demo_paths()
        args.train_file = args.train_file or paths["train"]
        args.corpus_file = args.corpus_file or paths["ads"]
    set_seed(args.seed)

    # The teacher's ad vectors: read from the store (built once if missing), then the teacher is freed.
    ad_ids, ad_texts = read_texts(args.corpus_file, args.id_column, args.text_column)
    teacher = Encoder.from_pretrained(
        args.teacher_model, trust_remote_code=args.trust_remote_code, allow_pickle=args.allow_pickle_weights
    )
    store_dir = args.store_dir or os.path.join(os.path.dirname(os.path.abspath(args.output_dir)), "stores")
    ads_fp = data_fingerprint(ad_ids, ad_texts)
    store_path = args.ad_store or default_store_path(store_dir, args.teacher_model, "ad", teacher, ads_fp)
    teacher.to(accelerator.device)
    store = store_for(accelerator, teacher, ad_ids, ad_texts, "ad", store_path, args.encode_batch_size, ads_fp)
    del teacher
    ad_vectors = torch.from_numpy(np.array(store.vectors, dtype=np.float32))  # in memory: rows are gathered per step
    clicks = read_clicks(args, store, ad_texts)

    student = Encoder.from_pretrained(
        args.student_model, trust_remote_code=args.trust_remote_code, allow_pickle=args.allow_pickle_weights
    )
    if student.embedding_dim != store.dim:
        raise UserError(
            f"The student outputs {student.embedding_dim}-d vectors but the ad store holds {store.dim}-d; "
            "align the student to this teacher first (distill_student.py adds the projection head)."
        )
    log_truncation(student, [click["query"] for click in clicks], "query", args.train_file)
    if args.gradient_checkpointing:
        student.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def collate(rows):
        hard = []
        for row in rows:  # missing hard negatives: random ads drawn from the row, the same in a resumed run
            chosen = row["negatives"][: args.num_hard_negatives]
            rng = np.random.default_rng(text_key(row["query"]) ^ args.seed)
            hard += chosen + rng.integers(len(ad_vectors), size=args.num_hard_negatives - len(chosen)).tolist()
        batch = student.tokenize([row["query"] for row in rows], "query")
        batch["positive_rows"] = torch.tensor([row["positive"] for row in rows])
        batch["hard_negative_rows"] = torch.tensor(hard, dtype=torch.long)
        batch["positive_groups"] = torch.tensor([row["group"] for row in rows])
        return batch

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
    student, optimizer, scheduler, loop = prepare_training(
        accelerator, args, student, dataloader, len(clicks), "refine_contrastive"
    )
    margin = args.false_negative_margin if args.false_negative_margin >= 0 else None
    student.train()
    for batch in loop:
        with accelerator.accumulate(student):
            # Random negatives come from the torch RNG, which checkpoints save and restore.
            random_rows = torch.randint(len(ad_vectors), (args.num_random_negatives,))
            positive_rows = batch.pop("positive_rows").cpu()
            negative_rows = torch.cat([batch.pop("hard_negative_rows").cpu(), random_rows])
            positive_groups = batch.pop("positive_groups")
            query_vectors = student(**batch)
            loss, accuracy = contrastive_loss(
                query_vectors,
                ad_vectors[positive_rows].to(query_vectors),
                ad_vectors[negative_rows].to(query_vectors),
                temperature=args.temperature,
                # Store rows are unique per ad, so they serve as keys: the positive is never its own negative.
                positive_keys=positive_rows.to(query_vectors.device),
                negative_keys=negative_rows.to(query_vectors.device),
                positive_groups=positive_groups,
                false_negative_margin=margin,
            )
            check_finite_loss(loss, loop.step)
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                clip_and_check_gradients(accelerator, student, args, loop.step)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        loop.end_of_batch(loss=loss.item(), accuracy=accuracy.item(), lr=scheduler.get_last_lr()[0])

    results = {f"train_{key}": value for key, value in loop.last_logs.items()}
    results |= {"steps": loop.step, "ad_store": store_path}
    save_final_model(accelerator, args, student, "refine_contrastive.py", "student", results)
    accelerator.end_training()
    return results


if __name__ == "__main__":
    run_cli(main)
