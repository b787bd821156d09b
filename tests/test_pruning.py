"""Structured pruning: what is removed, that dead units go without changing the vectors, and the
progressive prune-and-re-align run of distill_student.py."""

import os

import numpy as np
import pytest
import torch
from sentence_transformers import SentenceTransformer

import distill_student
from common.encoder import Encoder
from common.pruning import importance, prune_ffn, prune_layers

QUERIES = ["rent a boat", "fix my broken laptop", "cheap used tractor for sale", "sell my old camera"]


@pytest.mark.parametrize("fixture", ["tiny_bert", "tiny_qwen"])
def test_units_that_never_fire_are_pruned_without_changing_vectors(fixture, request):
    encoder = Encoder.from_pretrained(request.getfixturevalue(fixture))
    dead = torch.arange(0, 64, 2)  # half of the 64 FFN units
    with torch.no_grad():
        for layer in encoder.backbone.encoder.layer if fixture == "tiny_bert" else encoder.backbone.layers:
            ups = [layer.intermediate.dense] if fixture == "tiny_bert" else [layer.mlp.gate_proj, layer.mlp.up_proj]
            for projection in ups:  # zero input weights (and bias): activation exactly 0 for these units
                projection.weight[dead] = 0
                if projection.bias is not None:
                    projection.bias[dead] = 0
    before = encoder.encode(QUERIES, "query")
    layer_scores, unit_scores = importance(encoder, QUERIES)
    assert len(layer_scores) == 2 and all(np.isfinite(layer_scores)) and all(0 < s <= 2 for s in layer_scores)
    ratios, _ = importance(encoder, QUERIES, criterion="norm_ratio")
    assert all(np.isfinite(ratios)) and all(r > 0 for r in ratios) and ratios != layer_scores
    assert all(float(scores[dead].max()) == 0.0 for scores in unit_scores)
    prune_ffn(encoder, unit_scores, 32)
    assert encoder.backbone.config.intermediate_size == 32
    np.testing.assert_allclose(encoder.encode(QUERIES, "query"), before, atol=1e-5)


def test_prune_layers_keeps_the_most_important_in_order(tiny_qwen):
    encoder = Encoder.from_pretrained(tiny_qwen)
    assert prune_layers(encoder, [0.5, 2.0], 1) == [1]
    assert encoder.backbone.config.num_hidden_layers == 1


def test_progressive_pruning_with_realignment(small_data, tiny_bert, tiny_qwen, tmp_path):
    """A 2-block Qwen3 student of a BERT teacher, aligned, pruned to 1 block and half its FFN, re-aligned."""
    output = tmp_path / "student"
    args = [
        "--teacher_model",
        tiny_bert,
        "--student_model",
        tiny_qwen,
        "--query_file",
        small_data["queries"],
        "--output_dir",
        str(output),
        "--prune_schedule",
        "1",
        "--ffn_keep_ratio",
        "0.5",
        "--max_train_steps",
        "3",
        "--per_device_train_batch_size",
        "8",
        "--calibration_queries",
        "32",
    ]
    results = distill_student.main(args)
    assert results["steps"] == 3
    student = Encoder.from_pretrained(str(output))
    assert student.backbone.config.num_hidden_layers == 1 and student.backbone.config.intermediate_size == 32
    assert student.embedding_dim == 32  # the projection head to the teacher's width survives pruning
    assert "kept blocks" in student.config.extra["pruning"][0]
    assert os.path.exists(output / "stages" / "stage0" / "model.safetensors")  # the aligned, unpruned stage
    assert Encoder.from_pretrained(str(output / "stages" / "stage0")).backbone.config.num_hidden_layers == 2
    st = SentenceTransformer(str(output), device="cpu")
    np.testing.assert_allclose(st.encode(QUERIES, prompt_name="query"), student.encode(QUERIES, "query"), atol=1e-5)
    # Resuming skips the finished stage (its files are not written again: a retrained stage of the same seed
    # would give the same weights, so the weights alone cannot tell) and reproduces the pruned student.
    stage0 = sorted((output / "stages" / "stage0").rglob("*"))
    written = {path: (path.stat().st_ino, path.stat().st_mtime_ns) for path in stage0 if path.is_file()}
    distill_student.main([*args, "--resume_from_checkpoint", "latest", "--overwrite_output_dir"])
    assert sorted((output / "stages" / "stage0").rglob("*")) == stage0
    assert {path: (path.stat().st_ino, path.stat().st_mtime_ns) for path in written} == written
    again = Encoder.from_pretrained(str(output)).encode(QUERIES, "query")
    np.testing.assert_allclose(again, student.encode(QUERIES, "query"), atol=1e-5)


def test_pruning_a_whole_teacher_copy_skips_the_useless_first_alignment(small_data, tiny_bert, tmp_path):
    output = tmp_path / "student"
    distill_student.main([
        "--teacher_model", tiny_bert, "--student_num_layers", "2", "--prune_schedule", "1", "--query_file",
        small_data["queries"], "--output_dir", str(output), "--max_train_steps", "2", "--per_device_train_batch_size",
        "8", "--calibration_queries", "16",
    ])  # fmt: skip
    assert not (output / "stages" / "stage0").exists()
    student = Encoder.from_pretrained(str(output))
    assert student.backbone.config.num_hidden_layers == 1 and "kept blocks" in student.config.extra["pruning"][0]
    assert len(student.config.extra["teacher_layers"]) == 1


def test_first_last_keeps_the_ends_then_ranks_by_block_influence(tmp_path):
    from tests.conftest import make_tiny_bert

    encoder = Encoder.from_pretrained(make_tiny_bert(tmp_path / "bert4", layers=4, dropout=0.0))
    influence, _ = importance(encoder, QUERIES)
    scores, _ = importance(encoder, QUERIES, criterion="first_last")
    assert scores[0] == scores[3] == float("inf") and scores[1:3] == influence[1:3]
    middle = 1 if influence[1] >= influence[2] else 2
    assert prune_layers(encoder, scores, 3) == sorted([0, middle, 3])


def test_auto_starts_from_the_whole_teacher_up_to_3x_the_student_and_from_2k_layers_beyond():
    cases = ((2, 6), (3, 6), (2, 4), (4, 12), (4, 13), (4, 36), (6, 6), (7, 6))
    starts = [distill_student.auto_progressive_start(blocks, depth) for blocks, depth in cases]
    assert starts == [6, 6, 4, 12, 8, 8, None, None]


def test_progressive_from_is_the_explicit_schedule_at_the_compute_of_one_small_run(small_data, tmp_path):
    """--student_num_layers 2 --progressive_from 4 = a 4-layer cut pruned to 2, each stage 2/(4+2) of the budget:
    the same student as the explicit schedule given that share by hand. The default for a cut of 2 (or 3) layers
    from 6 (auto: the whole teacher, at most 3K layers) prunes the teacher at once: one stage, the whole budget,
    the same student as --progressive_from 6; none is the one-shot cut of evenly spaced layers."""
    from conftest import make_tiny_bert

    from common.errors import UserError

    teacher = make_tiny_bert(tmp_path / "teacher6", layers=6)
    common = ["--teacher_model", teacher, "--query_file", small_data["queries"], "--per_device_train_batch_size", "8",
              "--calibration_queries", "16"]  # fmt: skip
    planned = distill_student.main([*common, "--student_num_layers", "2", "--progressive_from", "4",
                                    "--max_train_steps", "6", "--output_dir", str(tmp_path / "planned")])  # fmt: skip
    by_hand = distill_student.main([*common, "--student_num_layers", "4", "--prune_schedule", "2",
                                    "--max_train_steps", "2", "--output_dir", str(tmp_path / "by-hand")])  # fmt: skip
    assert planned["steps"] == by_hand["steps"] == 2  # 6 x 2 / (4 + 2) per stage
    stage0 = Encoder.from_pretrained(str(tmp_path / "planned" / "stages" / "stage0"))
    assert stage0.config.extra["teacher_layers"] == [0, 2, 3, 5]
    student = Encoder.from_pretrained(str(tmp_path / "planned"))
    assert student.backbone.config.num_hidden_layers == 2
    assert set(student.config.extra["teacher_layers"]) < {0, 2, 3, 5}
    np.testing.assert_allclose(
        student.encode(QUERIES, "query"), Encoder.from_pretrained(str(tmp_path / "by-hand")).encode(QUERIES, "query")
    )

    by_default = distill_student.main([*common, "--student_num_layers", "2", "--max_train_steps", "6",
                                       "--output_dir", str(tmp_path / "default")])  # fmt: skip
    from_six = distill_student.main([*common, "--student_num_layers", "2", "--progressive_from", "6",
                                     "--max_train_steps", "6", "--output_dir", str(tmp_path / "from-six")])  # fmt: skip
    assert by_default["steps"] == from_six["steps"] == 6 and not (tmp_path / "default" / "stages").exists()
    default_student = Encoder.from_pretrained(str(tmp_path / "default"))
    assert len(default_student.config.extra["teacher_layers"]) == 2
    np.testing.assert_allclose(
        default_student.encode(QUERIES, "query"),
        Encoder.from_pretrained(str(tmp_path / "from-six")).encode(QUERIES, "query"),
    )

    whole = distill_student.main([*common, "--student_num_layers", "3", "--max_train_steps", "4",
                                  "--output_dir", str(tmp_path / "three")])  # fmt: skip
    assert whole["steps"] == 4 and not (tmp_path / "three" / "stages").exists()
    assert len(Encoder.from_pretrained(str(tmp_path / "three")).config.extra["teacher_layers"]) == 3
    one_shot = distill_student.main([*common, "--student_num_layers", "2", "--progressive_from", "none",
                                     "--max_train_steps", "6", "--output_dir", str(tmp_path / "one-shot")])  # fmt: skip
    assert one_shot["steps"] == 6 and not (tmp_path / "one-shot" / "stages").exists()
    assert Encoder.from_pretrained(str(tmp_path / "one-shot")).config.extra["teacher_layers"] == [0, 5]
    for extra, message in ((["--progressive_from", "2"], "must be more than"),
                           (["--progressive_from", "7"], "at most the teacher's 6"),
                           (["--progressive_from", "4", "--prune_schedule", "1"], "drop --student_model")):  # fmt: skip
        with pytest.raises(UserError, match=message):
            distill_student.main([*common, "--student_num_layers", "2", *extra, "--output_dir", str(tmp_path / "x")])


def test_a_progressive_run_stopped_in_its_first_stage_is_an_unfinished_run_to_resume(tmp_path):
    """Killed before the last stage, the output folder holds only stages/stage0/checkpoints: it is this script's
    unfinished run (resumable, or replaced with --overwrite_output_dir), not a stranger's folder."""
    import argparse
    import json

    from common.errors import UserError
    from common.run_folder import check_output_dir

    step = tmp_path / "student" / "stages" / "stage0" / "checkpoints" / "step_2"
    step.mkdir(parents=True)
    (step / "trainer_state.json").write_text(json.dumps({"script": "distill_student.py", "step": 2}))

    def args(**flags):
        return argparse.Namespace(output_dir=str(tmp_path / "student"), **{
            "resume_from_checkpoint": None, "overwrite_output_dir": False, **flags})  # fmt: skip

    with pytest.raises(UserError, match=r"holds an unfinished run of distill_student\.py; continue it"):
        check_output_dir(args(), "distill_student.py")
    check_output_dir(args(resume_from_checkpoint="latest"), "distill_student.py")
    check_output_dir(args(overwrite_output_dir=True), "distill_student.py")
    with pytest.raises(UserError, match=r"holds a run of distill_student\.py, not of refine_contrastive\.py"):
        check_output_dir(args(resume_from_checkpoint="latest"), "refine_contrastive.py")


def test_stages_are_never_pushed_keep_the_runs_flags_and_continue_the_trackers_steps(small_data, tmp_path, monkeypatch):
    """The progressive default's stage 0 is an intermediate model: only the final student is pushed under
    --hub_model_id. A finished stage reloaded on resume trains as the run asked (gradient checkpointing, the run's
    remote-code permission), and the trackers' steps run on across stages instead of restarting at 1."""
    import accelerate
    from conftest import make_tiny_bert

    import common.hub

    teacher = make_tiny_bert(tmp_path / "teacher6", layers=6)  # --progressive_from 4: 4 layers aligned, pruned to 2
    pushed, tracker_steps, checkpointing, loads = [], [], [], []
    monkeypatch.setattr(common.hub, "push_to_hub", lambda folder, *args, **kwargs: pushed.append(folder))
    real_log = accelerate.Accelerator.log
    monkeypatch.setattr(accelerate.Accelerator, "log",
                        lambda self, values, step=None, **kw: (tracker_steps.append(step),
                                                               real_log(self, values, step=step, **kw)))  # fmt: skip
    real_align, real_from_pretrained = distill_student.align, Encoder.from_pretrained

    def align(accelerator, args, student, *rest, **kwargs):
        checkpointing.append(student.backbone.is_gradient_checkpointing)
        return real_align(accelerator, args, student, *rest, **kwargs)

    def from_pretrained(path, **kwargs):
        loads.append((os.path.basename(str(path)), kwargs.get("trust_remote_code")))
        return real_from_pretrained(path, **kwargs)

    monkeypatch.setattr(distill_student, "align", align)
    monkeypatch.setattr(Encoder, "from_pretrained", from_pretrained)
    output = str(tmp_path / "student")
    run = ["--teacher_model", teacher, "--query_file", small_data["queries"], "--student_num_layers", "2",
           "--progressive_from", "4", "--per_device_train_batch_size", "8", "--max_train_steps", "6",
           "--calibration_queries", "16",
           "--logging_steps", "1", "--gradient_checkpointing", "--output_dir", output]  # fmt: skip
    distill_student.main([*run, "--push_to_hub", "--hub_model_id", "you/student"])
    assert pushed == [output]  # not stages/stage0
    assert tracker_steps == [1, 2, 3, 4]  # 2 steps a stage (each 2 / (4 + 2) of the 6), numbered on (not 1, 2, 1, 2)
    assert checkpointing == [True, True]
    # Resumed: the finished stage 0 is loaded from its folder, as the run loads its models.
    checkpointing.clear()
    loads.clear()
    distill_student.main([*run, "--resume_from_checkpoint", "latest", "--overwrite_output_dir"])
    assert ("stage0", False) in loads
    assert checkpointing == [True]  # the final stage trains the reloaded stage with checkpointing on
