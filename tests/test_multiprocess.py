"""N processes = 1 process: the contract every training script keeps, checked on 2 gloo processes.

For each script, with dropout off and the same seed and steps:
- 2 processes with per-device batch B/2 end with the weights of 1 process with batch B (float tolerance),
  and log the same learning rate and loss at every optimiser step;
- the learning-rate schedule is the one asked for (warm-up over 4 steps, 0 at the last step), not N times
  faster (accelerate steps a prepared scheduler once per process);
- a 2-process run SIGKILLed after a checkpoint and resumed with `--resume_from_checkpoint latest` ends
  with the weights of the uninterrupted 2-process run;
- distill_student.py (its default objective: L2 plus the KL of the teacher's ranking of ads drawn once per
  optimiser step): accumulating 2 x B/2 on one process equals one batch of B (a loss per query).
  The contrastive scripts differ there by design (a micro-batch's queries only see its own candidates):
  docs/design.md says so.
"""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from conftest import make_tiny_bert
from safetensors.torch import load_file
from transformers import get_scheduler

import distill_student
import refine_contrastive
import train_teacher

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow
STEPS, WARMUP, GLOBAL_BATCH = 10, 4, 16  # 96 rows: 6 global batches per epoch, so 10 steps cross an epoch


@pytest.fixture(scope="module")
def tiny_bert_no_dropout(tmp_path_factory):
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert-no-dropout"), dropout=0.0)


def script_args(name, data, model, stores):
    if name.endswith("+graph"):  # the graph regulariser over the demo's ad graph and query graph, combined
        graph = [
            "--ad_graph_file",
            data["ad_graph"],
            "--query_graph_file",
            data["query_graph"],
            "--graph_weight",
            "0.5",
        ]
        graph += ["--corpus_file", data["ads"]] if name == "train_teacher+graph" else []
        return script_args(name.removesuffix("+graph"), data, model, stores) + graph
    common = [
        "--max_train_steps", str(STEPS), "--num_warmup_steps", str(WARMUP), "--learning_rate", "1e-3",
        "--logging_steps", "1", "--checkpointing_steps", "4",
    ]  # fmt: skip
    if name == "train_teacher":
        return ["--model_name_or_path", model, "--train_file", data["train"], *common]
    common += ["--store_dir", stores]
    if name == "distill_student":
        return [
            "--teacher_model",
            model,
            "--query_file",
            data["queries"],
            "--corpus_file",
            data["ads"],
            "--num_ranked_ads",
            "64",
            "--student_num_layers",
            "1",
            *common,
        ]  # fmt: skip (l2 + kl over the ads)
    return ["--student_model", model, "--teacher_model", model, "--train_file", data["train"],
            "--corpus_file", data["ads"], "--num_random_negatives", "16", *common]  # fmt: skip


MAINS = {
    "train_teacher": train_teacher.main,
    "distill_student": distill_student.main,
    "refine_contrastive": refine_contrastive.main,
}
CASES = [*MAINS, "train_teacher+graph", "refine_contrastive+graph"]


DDP = ["--multi_gpu", "--num_processes", "2"]
ZERO3 = ["--config_file", "accelerate_configs/deepspeed_zero3_cpu.yaml"]  # 2 CPU processes


def launch_two(name, args, log_path, kill_after_checkpoint=None, launcher=DDP):
    """`accelerate launch` 2 CPU processes (gloo DDP, or DeepSpeed ZeRO-3 with launcher=ZERO3); optionally
    SIGKILL them all once a checkpoint exists. An uninterrupted run returns its seconds, launch included."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    if launcher is DDP:
        env["ACCELERATE_USE_CPU"] = "1"
    command = [sys.executable, "-m", "accelerate.commands.launch", *launcher, f"{name}.py", *args]
    started = time.time()
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)  # fmt: skip
        if kill_after_checkpoint is None:
            assert process.wait(timeout=600) == 0, Path(log_path).read_text()[-3000:]
            return time.time() - started
        deadline = time.time() + 300
        while not os.path.exists(kill_after_checkpoint):
            assert process.poll() is None and time.time() < deadline, Path(log_path).read_text()[-3000:]
            time.sleep(0.05)
        # The launcher and both workers (torchrun starts them in sessions of their own), as a preempted job dies.
        workers = psutil.Process(process.pid).children(recursive=True)
        for victim in [process, *workers]:
            with contextlib.suppress(ProcessLookupError, psutil.NoSuchProcess):
                victim.send_signal(signal.SIGKILL)
        process.wait()
        psutil.wait_procs(workers, timeout=30)


def weights(folder):
    return load_file(os.path.join(folder, "model.safetensors"))


def assert_same_weights(left, right, atol):
    left, right = weights(left), weights(right)
    assert left.keys() == right.keys()
    worst = max(float((left[key].float() - right[key].float()).abs().max()) for key in left)
    print(f"largest weight difference {worst:.2e}")
    assert worst <= atol, f"largest weight difference {worst:.2e} > {atol:.0e}"
    return worst


def history(folder, key):
    with open(os.path.join(folder, "trainer_state.json")) as handle:
        return [entry[key] for entry in json.load(handle)["log_history"]]


def expected_learning_rates():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=WARMUP, num_training_steps=STEPS)
    rates = []
    for _ in range(STEPS):
        optimizer.step()
        scheduler.step()
        rates.append(scheduler.get_last_lr()[0])
    return rates  # 2.5e-4, 5e-4, 7.5e-4, 1e-3, 8.3e-4, ..., 0


@pytest.mark.parametrize("case", CASES)
def test_two_processes_equal_one_and_resume_to_the_same_weights(case, small_data, tiny_bert_no_dropout, tmp_path):
    args = script_args(case, small_data, tiny_bert_no_dropout, str(tmp_path / "stores"))
    name = case.removesuffix("+graph")
    one, two, resumed = (str(tmp_path / run) for run in ("one", "two", "resumed"))
    MAINS[name]([*args, "--per_device_train_batch_size", str(GLOBAL_BATCH), "--output_dir", one])
    half = ["--per_device_train_batch_size", str(GLOBAL_BATCH // 2)]
    launch_two(name, [*args, *half, "--output_dir", two], tmp_path / "two.log")

    # The same learning rate at every optimiser step, and the schedule asked for.
    np.testing.assert_allclose(history(two, "lr"), history(one, "lr"), rtol=1e-9)
    np.testing.assert_allclose(history(one, "lr"), expected_learning_rates(), rtol=1e-9, atol=1e-12)
    loss_key = "alignment_loss" if name == "distill_student" else "loss"
    # Losses of the two runs differ by float reduction order: with weights within 2e-5, the vectors differ by
    # ~1e-6 and an L2 loss of ~2e-4 by up to 2 x ||s - t|| x ||ds|| ~ 1e-7 absolute (6.7e-8 seen: 3e-4 relative),
    # so a relative tolerance alone fails at random; the absolute floor is ten times that bound.
    np.testing.assert_allclose(history(two, loss_key), history(one, loss_key), rtol=1e-4, atol=1e-6)
    if case.endswith("+graph"):  # the graph term itself, reduced over both processes as on one
        assert min(history(one, "graph_loss")) > 0
        np.testing.assert_allclose(history(two, "graph_loss"), history(one, "graph_loss"), rtol=1e-4, atol=1e-6)
    # The same weights.
    assert_same_weights(two, one, atol=2e-5)
    # Every rank's files are inside each checkpoint before it is renamed into place; no partial is left.
    assert sorted(os.listdir(os.path.join(two, "checkpoints"))) == ["step_4", "step_8"]
    for step in ("step_4", "step_8"):
        names = os.listdir(os.path.join(two, "checkpoints", step))
        assert {"random_states_0.pkl", "random_states_1.pkl", "trainer_state.json"} <= set(names), names

    # Killed after the checkpoint of step 4 (often in the middle of writing step 8's), then resumed.
    launch_two(name, [*args, *half, "--output_dir", resumed], tmp_path / "killed.log",
               kill_after_checkpoint=os.path.join(resumed, "checkpoints", "step_4"))  # fmt: skip
    assert not os.path.exists(os.path.join(resumed, "model.safetensors"))
    launch_two(name, [*args, *half, "--output_dir", resumed, "--resume_from_checkpoint", "latest"],
               tmp_path / "resumed.log")  # fmt: skip
    assert_same_weights(resumed, two, atol=1e-6)
    assert history(resumed, "lr") == history(two, "lr")


def test_gradient_accumulation_equals_the_whole_batch_in_distillation(small_data, tiny_bert_no_dropout, tmp_path):
    args = script_args("distill_student", small_data, tiny_bert_no_dropout, str(tmp_path / "stores"))
    whole, accumulated = str(tmp_path / "whole"), str(tmp_path / "accumulated")
    distill_student.main([*args, "--per_device_train_batch_size", str(GLOBAL_BATCH), "--output_dir", whole])
    distill_student.main([*args, "--per_device_train_batch_size", str(GLOBAL_BATCH // 2),
                          "--gradient_accumulation_steps", "2", "--output_dir", accumulated])  # fmt: skip
    np.testing.assert_allclose(history(accumulated, "lr"), history(whole, "lr"), rtol=1e-9)
    assert_same_weights(accumulated, whole, atol=2e-5)


def test_sigterm_to_one_process_stops_both_at_the_same_step(small_data, tiny_bert_no_dropout, tmp_path):
    """A scheduler's SIGTERM may reach the processes at different moments: all stop after the same step,
    write its checkpoint together, and the 2-process resume reaches the uninterrupted run's weights."""
    args = script_args("train_teacher", small_data, tiny_bert_no_dropout, str(tmp_path / "stores"))
    args[args.index("--checkpointing_steps") + 1] = "100"  # only the stop writes a checkpoint
    args[args.index("--max_train_steps") + 1] = "40"  # long enough to be stopped on a busy machine
    args += ["--per_device_train_batch_size", str(GLOBAL_BATCH // 2)]
    straight, stopped = str(tmp_path / "straight"), str(tmp_path / "stopped")
    launch_two("train_teacher", [*args, "--output_dir", straight], tmp_path / "straight.log")

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "1"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "train_teacher.py", *args, "--output_dir", stopped]  # fmt: skip
    log_path = tmp_path / "stopped.log"
    with open(log_path, "w") as log:
        launcher = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 300
        while "2/40" not in Path(log_path).read_text():
            assert launcher.poll() is None and time.time() < deadline, Path(log_path).read_text()[-3000:]
            time.sleep(0.01)
        workers = [
            p for p in psutil.Process(launcher.pid).children(recursive=True) if "train_teacher.py" in p.cmdline()
        ]
        rank_one = next(p for p in workers if p.environ().get("RANK") == "1")
        rank_one.send_signal(signal.SIGTERM)
        launcher.wait(timeout=300)
    text = Path(log_path).read_text()
    assert launcher.returncode != 0 and "Stopped by SIGTERM after step" in text, text[-3000:]
    (checkpoint,) = os.listdir(os.path.join(stopped, "checkpoints"))  # one, written by both ranks together
    assert int(checkpoint.removeprefix("step_")) < 40
    launch_two("train_teacher", [*args, "--output_dir", stopped, "--resume_from_checkpoint", "latest"],
               tmp_path / "resumed.log")  # fmt: skip
    assert_same_weights(stopped, straight, atol=1e-6)


def test_a_progressive_distillation_on_two_processes_equals_one_and_resumes(small_data, tmp_path):
    """A two-stage progressive distillation (--progressive_from 4 of a 6-layer teacher; the default for a teacher
    deeper than 3K layers): 4 layers aligned, pruned to 2 blocks, re-aligned. 2 processes end with 1 process's
    weights (every process ranks the blocks on the same queries), and a run SIGKILLed inside the first stage
    resumes through both stages to the uninterrupted run's weights."""
    teacher = make_tiny_bert(tmp_path / "teacher6", layers=6, dropout=0.0)
    args = script_args("distill_student", small_data, teacher, str(tmp_path / "stores"))
    args[args.index("--student_num_layers") + 1] = "2"
    args += ["--progressive_from", "4"]
    args[args.index("--max_train_steps") + 1] = "15"  # 5 optimiser steps per stage (2 / (4 + 2) each)
    args[args.index("--checkpointing_steps") + 1] = "2"
    # Frozen word embeddings: this cut of a random teacher starts nearly aligned (loss ~4e-4), so the rows of
    # tokens seen once get gradients near Adam's eps, where its update amplifies float noise between batch splits.
    args += ["--calibration_queries", "32", "--freeze_embeddings"]
    one, two, resumed = (str(tmp_path / run) for run in ("one", "two", "resumed"))
    distill_student.main([*args, "--per_device_train_batch_size", str(GLOBAL_BATCH), "--output_dir", one])
    half = ["--per_device_train_batch_size", str(GLOBAL_BATCH // 2)]
    launch_two("distill_student", [*args, *half, "--output_dir", two], tmp_path / "two.log")
    for run in (one, two):
        with open(os.path.join(run, "config.json")) as handle:
            extra = json.load(handle)
        assert extra["num_hidden_layers"] == 2, extra
    assert_same_weights(os.path.join(two, "stages", "stage0"), os.path.join(one, "stages", "stage0"), atol=2e-5)
    assert_same_weights(two, one, atol=2e-5)
    # Losses of ~2e-4 are differences of nearly equal unit vectors: compared to 1e-7 absolute as well.
    np.testing.assert_allclose(history(two, "alignment_loss"), history(one, "alignment_loss"), rtol=1e-4, atol=1e-7)

    stage0_checkpoint = os.path.join(resumed, "stages", "stage0", "checkpoints", "step_2")
    launch_two("distill_student", [*args, *half, "--output_dir", resumed], tmp_path / "killed.log",
               kill_after_checkpoint=stage0_checkpoint)  # fmt: skip
    assert not os.path.exists(os.path.join(resumed, "model.safetensors"))
    launch_two("distill_student", [*args, *half, "--output_dir", resumed, "--resume_from_checkpoint", "latest"],
               tmp_path / "resumed.log")  # fmt: skip
    assert_same_weights(resumed, two, atol=1e-6)


def test_zero3_killed_after_a_checkpoint_resumes_to_the_uninterrupted_weights(small_data, tiny_bert_no_dropout,
                                                                               tmp_path):  # fmt: skip
    """The teacher under DeepSpeed ZeRO-3 on 2 CPU processes: SIGKILLed after its step-4 checkpoint (each rank's
    shard of parameters and optimiser states, and its RNG), resumed with --resume_from_checkpoint latest,
    it ends with the uninterrupted ZeRO-3 run's consolidated weights, which load with plain from_pretrained."""
    from transformers import AutoModel

    args = script_args("train_teacher", small_data, tiny_bert_no_dropout, str(tmp_path / "stores"))
    args += ["--per_device_train_batch_size", str(GLOBAL_BATCH // 2)]
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    seconds = launch_two("train_teacher", [*args, "--output_dir", straight], tmp_path / "straight.log", launcher=ZERO3)
    print(f"ZeRO-3, 2 CPU processes, {STEPS} steps: {seconds:.1f} s")
    launch_two("train_teacher", [*args, "--output_dir", resumed], tmp_path / "killed.log",
               kill_after_checkpoint=os.path.join(resumed, "checkpoints", "step_4"), launcher=ZERO3)  # fmt: skip
    assert not os.path.exists(os.path.join(resumed, "model.safetensors"))
    launch_two("train_teacher", [*args, "--output_dir", resumed, "--resume_from_checkpoint", "latest"],
               tmp_path / "resumed.log", launcher=ZERO3)  # fmt: skip
    assert "Resuming from" in (tmp_path / "resumed.log").read_text()
    assert_same_weights(resumed, straight, atol=1e-6)
    assert history(resumed, "lr") == history(straight, "lr")
    model = AutoModel.from_pretrained(straight)
    assert model.config.num_hidden_layers == 2


def test_lora_teacher_on_two_processes_equals_one_under_ddp_and_zero3_and_resumes(small_data, tiny_bert_no_dropout,
                                                                                  tmp_path):  # fmt: skip
    """train_teacher.py --lora_r 4: 2 gloo processes (DDP) and 2 DeepSpeed ZeRO-3 processes with gradient
    checkpointing end with the 1-process weights (adapters merged at the save, gathered from the ZeRO-3 shards);
    the ZeRO-3 run SIGKILLed after its step-4 checkpoint resumes to the same weights."""
    args = script_args("train_teacher", small_data, tiny_bert_no_dropout, str(tmp_path / "stores"))
    args += ["--lora_r", "4", "--lora_dropout", "0"]
    half = ["--per_device_train_batch_size", str(GLOBAL_BATCH // 2)]
    one, ddp, zero3, resumed = (str(tmp_path / run) for run in ("one", "ddp", "zero3", "resumed"))
    train_teacher.main([*args, "--per_device_train_batch_size", str(GLOBAL_BATCH), "--output_dir", one])
    launch_two("train_teacher", [*args, *half, "--output_dir", ddp], tmp_path / "ddp.log")
    assert_same_weights(ddp, one, atol=2e-5)
    zero3_args = [*args, *half, "--gradient_checkpointing"]
    launch_two("train_teacher", [*zero3_args, "--output_dir", zero3], tmp_path / "zero3.log", launcher=ZERO3)
    # DeepSpeed's consolidated BERT save names LayerNorm parameters gamma/beta (from_pretrained maps them back)
    saved = {k.replace(".gamma", ".weight").replace(".beta", ".bias"): v for k, v in weights(zero3).items()}
    reference = weights(one)
    assert saved.keys() == reference.keys()
    worst = max(float((saved[key] - reference[key]).abs().max()) for key in reference)
    assert worst < 2e-5, worst
    launch_two("train_teacher", [*zero3_args, "--output_dir", resumed], tmp_path / "killed.log",
               kill_after_checkpoint=os.path.join(resumed, "checkpoints", "step_4"), launcher=ZERO3)  # fmt: skip
    launch_two("train_teacher", [*zero3_args, "--output_dir", resumed, "--resume_from_checkpoint", "latest"],
               tmp_path / "resumed.log", launcher=ZERO3)  # fmt: skip
    assert "Resuming from" in (tmp_path / "resumed.log").read_text()
    assert_same_weights(resumed, zero3, atol=1e-6)


@contextlib.contextmanager
def one_thread():
    """torch on one thread, as in the launched processes: 2 threads sum in another order, and 10 Adam steps on a
    loss of 1e-3 amplify that into differences of 2e-3 (measured on the in-loop run: thread count alone moves step
    7's loss from 7.891e-4 to 7.869e-4), which would hide whether 2 processes compute what 1 does."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("mode", ["chunked", "in_loop"])
def test_streaming_phase_2_on_two_processes_equals_one_and_resumes(mode, small_data, streams, tiny_bert_no_dropout,
                                                                   tmp_path):  # fmt: skip
    """distill_student.py --streaming over local shards, from the store of the stream (which the 2-process run builds
    itself, each process encoding its chunks) or with the teacher in the loop (shuffle buffer, general text
    mixed in): 2 processes with B/2 end with the 1-process weights, and a 2-process run SIGKILLed after its
    step-4 checkpoint resumes mid-stream to the uninterrupted weights."""
    args = ["--teacher_model", tiny_bert_no_dropout, "--query_file", streams["queries"], "--streaming",
            "--dedupe_capacity", "1000", "--corpus_file", small_data["ads"], "--num_ranked_ads", "64",
            "--student_num_layers", "1", "--max_train_steps", str(STEPS), "--num_warmup_steps", str(WARMUP),
            "--learning_rate", "1e-3", "--logging_steps", "1", "--checkpointing_steps", "4"]  # fmt: skip
    if mode == "chunked":
        args += ["--chunk_rows", "20"]
    else:
        args += ["--teacher_in_loop", "--shuffle_buffer", "16", "--general_text_file", streams["general"],
                 "--general_text_ratio", "0.25"]  # fmt: skip
    one, two, resumed = (str(tmp_path / run) for run in ("one", "two", "resumed"))
    with one_thread():  # the launched ranks run with OMP_NUM_THREADS=1: the same float arithmetic per thread
        results = distill_student.main([*args, "--per_device_train_batch_size", str(GLOBAL_BATCH), "--store_dir",
                                        str(tmp_path / "stores-one"), "--output_dir", one])  # fmt: skip
    half = ["--per_device_train_batch_size", str(GLOBAL_BATCH // 2), "--store_dir", str(tmp_path / "stores-two")]
    launch_two("distill_student", [*args, *half, "--output_dir", two], tmp_path / "two.log")
    np.testing.assert_allclose(history(two, "lr"), history(one, "lr"), rtol=1e-9)
    np.testing.assert_allclose(history(two, "alignment_loss"), history(one, "alignment_loss"), rtol=1e-4, atol=1e-6)
    # In the loop, one process with the batch of 16 and one process with 8 x 2 accumulation steps (no second
    # process at all) already differ by 1.2e-4 in one word-embedding row ('mountain'): its gradient nearly cancels
    # over the batch, and Adam's per-element normalisation turns the summation order into a visible step.
    assert_same_weights(two, one, atol=2e-5 if mode == "chunked" else 2e-4)
    if mode == "chunked":  # the store written by 2 processes holds the 1-process store's vectors
        from common.store import EmbeddingStore

        left = EmbeddingStore.open(results["teacher_query_store"])
        right = EmbeddingStore.open(os.path.join(tmp_path / "stores-two", os.path.basename(left.folder)))
        assert left.metadata["chunks"] == right.metadata["chunks"] and len(left.metadata["chunks"]) == 5
        np.testing.assert_allclose(left.read(range(len(left))), right.read(range(len(left))), atol=1e-6)
        assert (
            left.ids == right.ids
            and left.keys_of(range(len(left))).tolist() == right.keys_of(range(len(left))).tolist()
        )

    launch_two("distill_student", [*args, *half, "--output_dir", resumed], tmp_path / "killed.log",
               kill_after_checkpoint=os.path.join(resumed, "checkpoints", "step_4"))  # fmt: skip
    assert not os.path.exists(os.path.join(resumed, "model.safetensors"))
    launch_two("distill_student", [*args, *half, "--output_dir", resumed, "--resume_from_checkpoint", "latest"],
               tmp_path / "resumed.log")  # fmt: skip
    assert "Resuming from" in (tmp_path / "resumed.log").read_text()
    assert_same_weights(resumed, two, atol=1e-6)


NAN_GRADIENT_RUNNER = """
import sys
sys.path.insert(0, {root!r})
import torch
from safetensors.torch import save_file

import train_teacher
from common.errors import run_cli


class NanGradient(torch.autograd.Function):
    # The loss as it is going forward; a NaN gradient coming back: what an overflow in backward looks like.
    @staticmethod
    def forward(ctx, loss):
        return loss.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


calls, real_loss, real_check = [0], train_teacher.teacher_loss, train_teacher.clip_and_check_gradients


def teacher_loss(vectors, batch, args):
    loss, logs = real_loss(vectors, batch, args)
    calls[0] += 1
    return (NanGradient.apply(loss) if calls[0] == {nan_step} else loss), logs


def clip_and_check_gradients(accelerator, model, args, step):
    # The weights as they are when the check runs (under DeepSpeed: after the engine's step), by step.
    state = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        path = f"{{args.output_dir}}-at-{{step + 1}}.safetensors"
        save_file({{k: v.float().contiguous() for k, v in state.items()}}, path)
    return real_check(accelerator, model, args, step)


train_teacher.teacher_loss, train_teacher.clip_and_check_gradients = teacher_loss, clip_and_check_gradients
run_cli(train_teacher.main)
"""


@pytest.mark.parametrize("launcher", ["ddp", "zero3"])
def test_a_nan_gradient_stops_the_run_without_touching_the_weights(
    launcher, small_data, tiny_bert_no_dropout, tmp_path
):
    """A finite loss whose gradient is NaN at step 3: the run stops there with one sentence, no model is saved,
    and the NaN never reaches the weights. Plain DDP checks the norm before its optimiser step (the weights at
    the check of step 3 are those after step 2, finite). Under DeepSpeed the engine steps inside backward, so
    the check reads the norm after the engine's step: DeepSpeed skipped that step, so the weights at the check
    of step 3 equal those at the check of step 2 (both after step 2)."""
    runner = tmp_path / "runner.py"
    runner.write_text(NAN_GRADIENT_RUNNER.format(root=ROOT, nan_step=3))
    output = str(tmp_path / "run")
    args = script_args("train_teacher", small_data, tiny_bert_no_dropout, None)
    # No warm-up: every step's learning rate is above 0, so every applied step changes the weights.
    args += ["--per_device_train_batch_size", str(GLOBAL_BATCH // 2), "--num_warmup_steps", "0", "--output_dir", output]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    if launcher == "ddp":
        env["ACCELERATE_USE_CPU"] = "1"
    command = [sys.executable, "-m", "accelerate.commands.launch", *(DDP if launcher == "ddp" else ZERO3),
               str(runner), *args]  # fmt: skip
    finished = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    printed = finished.stdout + finished.stderr
    assert finished.returncode != 0 and "gradient norm became" in printed and "at step 3" in printed, printed[-3000:]
    assert not os.path.exists(os.path.join(output, "model.safetensors"))
    at = {step: load_file(f"{output}-at-{step}.safetensors") for step in (1, 2, 3)}
    assert all(torch.isfinite(tensor).all() for tensor in at[3].values())
    changed = {step: any(not torch.equal(at[step][key], at[step - 1][key]) for key in at[1]) for step in (2, 3)}
    if launcher == "ddp":
        assert changed == {2: True, 3: True}  # at the check of step k: the weights after step k - 1
    else:
        assert changed == {2: True, 3: False}  # after step k; the NaN step was skipped
