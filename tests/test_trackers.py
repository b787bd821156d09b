"""Trackers: --report_to tensorboard writes, for every training script, the loss and learning rate of every
optimiser step that trainer_state.json records, read back here from the event files (the progressive
distillation's two stages as one run, steps numbered on). The logs live under <output_dir>/runs and stay out of
the model's fingerprint."""

import glob
import json
import os
from pathlib import Path

import pytest

import distill_student
import refine_contrastive
import train_teacher
from common.model_files import model_fingerprint
from tests.conftest import make_tiny_bert

pytest.importorskip("tensorboard")


def scalars(folder):
    """{tag: [(step, value)]} of every scalar in the event files under `folder`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found = {}
    for path in sorted(glob.glob(os.path.join(folder, "**", "events.out.tfevents.*"), recursive=True)):
        events = EventAccumulator(path, size_guidance={"scalars": 0})
        events.Reload()
        for tag in events.Tags()["scalars"]:
            found.setdefault(tag, []).extend((event.step, event.value) for event in events.Scalars(tag))
    return found


def logged(output_dir, key):
    with open(os.path.join(output_dir, "trainer_state.json"), encoding="utf-8") as handle:
        return [entry[key] for entry in json.load(handle)["log_history"]]


def test_every_training_script_reports_loss_and_lr_per_step_to_tensorboard(small_data, tiny_bert, tmp_path):
    common = ["--report_to", "tensorboard", "--logging_steps", "1", "--per_device_train_batch_size", "8"]
    teacher, student, refined = (str(tmp_path / name) for name in ("teacher", "student", "refined"))
    base = make_tiny_bert(tmp_path / "bert4", layers=4)  # 4 layers: the default distillation has 2 stages
    train_teacher.main(["--model_name_or_path", base, "--train_file", small_data["train"], "--output_dir",
                        teacher, "--max_train_steps", "3", *common])  # fmt: skip
    distill_student.main(["--teacher_model", teacher, "--query_file", small_data["queries"], "--output_dir", student,
                          "--student_num_layers", "1", "--max_train_steps", "6", "--store_dir",
                          str(tmp_path / "stores"), *common])  # fmt: skip
    refine_contrastive.main(["--teacher_model", teacher, "--student_model", student, "--train_file",
                             small_data["train"], "--corpus_file", small_data["ads"], "--output_dir", refined,
                             "--max_train_steps", "3", "--store_dir", str(tmp_path / "stores"), *common])  # fmt: skip
    # (folder, tracker run, loss key, the folders whose trainer_state.json hold the run's steps in order)
    runs = [(teacher, "train_teacher", "loss", [teacher]),
            (student, "distill_student", "alignment_loss", [os.path.join(student, "stages", "stage0"), student]),
            (refined, "refine_contrastive", "loss", [refined])]  # fmt: skip
    for output_dir, script, loss_key, states in runs:
        written = scalars(os.path.join(output_dir, "runs", script))
        for key in (loss_key, "lr"):
            expected = [value for state in states for value in logged(state, key)]
            assert [step for step, _ in written[key]] == list(range(1, len(expected) + 1)), (script, key)
            assert [value for _, value in written[key]] == pytest.approx(expected, rel=1e-6), (script, key)
    assert len(logged(student, "lr")) == 2  # the distillation's two stages: 2 + 2 steps, numbered 1 to 4
    # The event files are not part of the model: the teacher's fingerprint is that of its folder without them.
    before = model_fingerprint(teacher)
    os.rename(os.path.join(teacher, "runs"), str(tmp_path / "teacher-runs"))
    assert model_fingerprint(teacher) == before


def wandb_records(path, block=32768):
    """The records of a .wandb run log: wandb's header (':W&B', magic, version: 7 bytes), then LevelDB's log
    format: 32 KiB blocks of records, each with a 7-byte header (checksum, little-endian length, type: 1 whole,
    2 first, 3 middle, 4 last piece), a block's tail shorter than a header zero-padded."""
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", path
    position, pieces = 7, b""
    while position + 7 <= len(data):
        left = block - position % block
        length, kind = int.from_bytes(data[position + 4 : position + 6], "little"), data[position + 6]
        if left < 7 or (length == 0 and kind == 0):
            position += left  # the block's padding
            continue
        chunk = data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind == 1:
            yield chunk
        elif kind == 4:
            yield pieces + chunk
        else:
            pieces = chunk if kind == 2 else pieces + chunk


def wandb_history(folder):
    """{key: [(step, value)]} of the history records of the offline wandb run(s) under `folder` (protobuf
    Records of wandb's own schema)."""
    from wandb.proto import wandb_internal_pb2

    found = {}
    for path in sorted(glob.glob(os.path.join(folder, "wandb", "offline-run-*", "run-*.wandb"))):
        for data in wandb_records(path):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(data)
            if record.WhichOneof("record_type") != "history":
                continue
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                if not key.startswith("_"):
                    found.setdefault(key, []).append((record.history.step.num, json.loads(item.value_json)))
    return found


def test_wandb_offline_receives_loss_and_lr_per_step_under_the_run_folder(small_data, tiny_bert, tmp_path, monkeypatch):
    """wandb in offline mode (no account, no network) as a user of a cluster without internet runs it: the run
    folder is under <output_dir>/runs/train_teacher (not ./wandb), and its history holds the loss and learning
    rate of every optimiser step as trainer_state.json records them."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.chdir(tmp_path)  # nothing may land in the working directory
    teacher = str(tmp_path / "teacher")
    train_teacher.main(["--model_name_or_path", tiny_bert, "--train_file", small_data["train"], "--output_dir",
                        teacher, "--max_train_steps", "3", "--report_to", "wandb", "--logging_steps", "1",
                        "--per_device_train_batch_size", "8"])  # fmt: skip
    assert not (tmp_path / "wandb").exists()
    history = wandb_history(os.path.join(teacher, "runs", "train_teacher"))
    for key in ("loss", "lr"):
        expected = logged(teacher, key)
        assert [step for step, _ in history[key]] == list(range(1, len(expected) + 1)), key
        assert [value for _, value in history[key]] == pytest.approx(expected, rel=1e-6), key
