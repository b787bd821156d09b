"""Trackers: --report_to tensorboard writes, for every training script, the loss and learning rate of every
optimiser step that trainer_state.json records, read back here from the event files (the progressive
distillation's two stages as one run, steps numbered on). The logs live under <output_dir>/runs and stay out of
the model's fingerprint."""

import glob
import json
import os

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
