"""Crash and resume: SIGKILL each training script mid-run, resume from 'latest', get the same weights.

The uninterrupted run and the killed-then-resumed run use the same flags and seed; the resumed one
must restore data order (mid-epoch), optimiser, scheduler and RNG state. Killing also lands at random
moments inside a checkpoint save, which must never leave a folder that is taken as 'latest'.
"""

import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import distill_student
import refine_contrastive
import train_teacher
from common.encoder import Encoder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUERIES = ["rent a boat", "fix my broken laptop", "cheap used tractor for sale", "sell my old camera"]


def script_args(name, data, tiny_bert, streams=None):
    common = [
        "--per_device_train_batch_size",
        "8",
        "--max_train_steps",
        "20",
        "--learning_rate",
        "1e-3",
        "--checkpointing_steps",
        "2",
        "--checkpoints_total_limit",
        "2",
        "--logging_steps",
        "1",
    ]
    if name == "train_teacher":
        return ["--model_name_or_path", tiny_bert, "--train_file", data["train"], *common]
    if name == "distill_student":
        return ["--teacher_model", tiny_bert, "--query_file", data["queries"], "--student_num_layers", "1", *common]
    if name == "distill_student_chunked":  # local shards -> a chunked store of 5 chunks, read in a seeded order
        return ["--teacher_model", tiny_bert, "--query_file", streams["queries"], "--streaming", "--chunk_rows", "20",
                "--dedupe_capacity", "1000", "--student_num_layers", "1", *common]  # fmt: skip
    if name == "distill_student_in_loop":  # the teacher in the loop, a shuffle buffer, general text mixed in
        return ["--teacher_model", tiny_bert, "--query_file", streams["queries"], "--streaming", "--teacher_in_loop",
                "--shuffle_buffer", "16", "--dedupe_capacity", "1000", "--general_text_file", streams["general"],
                "--general_text_ratio", "0.25", "--student_num_layers", "1", *common]  # fmt: skip
    return [
        "--student_model",
        tiny_bert,
        "--teacher_model",
        tiny_bert,
        "--train_file",
        data["train"],
        "--corpus_file",
        data["ads"],
        "--num_random_negatives",
        "16",
        *common,
    ]


MAINS = {
    "train_teacher": train_teacher.main,
    "distill_student": distill_student.main,
    "refine_contrastive": refine_contrastive.main,
    # --streaming: the position in the stream is part of the checkpoint (20 steps of 8 rows cross epochs)
    "distill_student_chunked": distill_student.main,
    "distill_student_in_loop": distill_student.main,
}
SCRIPTS = {name: name.removesuffix("_chunked").removesuffix("_in_loop") for name in MAINS}


@pytest.mark.parametrize("name", list(MAINS))
def test_sigkill_then_resume_matches_uninterrupted(name, small_data, tiny_bert, streams, tmp_path):
    args = script_args(name, small_data, tiny_bert, streams)
    store_dir = [] if name == "train_teacher" else ["--store_dir", str(tmp_path / "stores")]
    MAINS[name]([*args, *store_dir, "--output_dir", str(tmp_path / "straight")])

    crashed = tmp_path / "crashed"
    env = {**os.environ, "OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(
        [sys.executable, f"{SCRIPTS[name]}.py", *args, *store_dir, "--output_dir", str(crashed)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while not (crashed / "checkpoints" / "step_6").exists():  # killed at the next poll: often mid-save
        assert process.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not (crashed / "model.safetensors").exists()  # nothing final was written by the killed run

    MAINS[name]([*args, *store_dir, "--output_dir", str(crashed), "--resume_from_checkpoint", "latest"])
    straight = Encoder.from_pretrained(str(tmp_path / "straight")).encode(QUERIES, "query")
    resumed = Encoder.from_pretrained(str(crashed)).encode(QUERIES, "query")
    np.testing.assert_allclose(resumed, straight, atol=1e-5)
    kept = sorted(os.listdir(crashed / "checkpoints"))
    assert kept == ["step_18", "step_20"], kept  # rotation kept the last 2, partial folders were cleared


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_ctrl_c_stop_with_a_checkpoint_and_one_line(stop, small_data, tiny_bert, tmp_path):
    """A preempted job (SIGTERM) or Ctrl-C finishes its step, writes that step's checkpoint, says so in one
    line, exits 128 + the signal; resuming from it reaches the uninterrupted run's weights."""
    args = [*script_args("train_teacher", small_data, tiny_bert)]
    args[args.index("--checkpointing_steps") + 1] = "100"  # no periodic checkpoint: the stop must write one
    train_teacher.main([*args, "--output_dir", str(tmp_path / "straight")])
    stopped = tmp_path / "stopped"
    env = {**os.environ, "OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen([sys.executable, "train_teacher.py", *args, "--output_dir", str(stopped)], cwd=ROOT,
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    output = []  # stderr, read by a thread: the progress bar writes "\r" and no newline
    reader = threading.Thread(target=lambda: output.extend(iter(lambda: process.stderr.read(1), "")))
    reader.start()
    deadline = time.time() + 300
    while "2/20" not in "".join(output):  # training has started
        assert process.poll() is None and time.time() < deadline, "the run ended before it could be stopped"
        time.sleep(0.01)
    process.send_signal(stop)
    process.wait()
    reader.join()
    stderr = "".join(output)
    assert process.returncode == 128 + stop
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "continue with --resume_from_checkpoint latest" in errors[0], stderr[-2000:]
    assert "Traceback" not in stderr
    (checkpoint,) = os.listdir(stopped / "checkpoints")
    assert checkpoint.startswith("step_") and not (stopped / "model.safetensors").exists()

    train_teacher.main([*args, "--output_dir", str(stopped), "--resume_from_checkpoint", "latest"])
    straight = Encoder.from_pretrained(str(tmp_path / "straight")).encode(QUERIES, "query")
    resumed = Encoder.from_pretrained(str(stopped)).encode(QUERIES, "query")
    np.testing.assert_allclose(resumed, straight, atol=1e-5)


SECOND_SIGNAL = """
import os, signal, sys, time
from argparse import Namespace
from accelerate import Accelerator
from common.loop import Progress, TrainLoop

loop = TrainLoop(Accelerator(cpu=True), Namespace(), [0, 1], Progress(), "train_teacher")
with loop._stop_handlers():
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.5)  # the handler runs: the stop is recorded for the end of the step
    print("first signal recorded:", loop.stop_signal == signal.SIGTERM, flush=True)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(5)
print("survived the second signal", flush=True)
"""


def test_a_second_signal_stops_at_once():
    """The first SIGTERM is recorded and acted on at the end of the step; a second one, while the run finishes
    its step and writes the checkpoint, ends the process at once (the default action), as the user asked."""
    started = time.time()
    finished = subprocess.run([sys.executable, "-c", SECOND_SIGNAL], cwd=ROOT, capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": ROOT}, timeout=120)  # fmt: skip
    assert "first signal recorded: True" in finished.stdout, finished.stdout + finished.stderr[-2000:]
    assert finished.returncode == -signal.SIGTERM and "survived" not in finished.stdout
    assert time.time() - started < 60


LAUNCHED_EXIT = """
import atexit, os, signal, socket, sys
import torch.distributed as dist
from common.errors import UserError, run_cli

with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1")
dist.init_process_group("gloo", rank=0, world_size=1)
# What a C++ object destroyed at interpreter shutdown with its thread still running does: abort.
atexit.register(lambda: os.kill(os.getpid(), signal.SIGABRT))


def main():
    print("work done", flush=True)
    if sys.argv[1] == "refused":
        raise UserError("a refusal")


run_cli(main)
"""


@pytest.mark.parametrize("outcome, code", [("done", 0), ("refused", 2)])
def test_a_launched_process_ends_without_the_interpreters_shutdown(outcome, code):
    """A process of a multi-process launch (here one with a gloo process group) ends right after its work and
    the group's teardown, with its exit code, before the interpreter's shutdown, where torch.distributed's C++
    objects can abort the process (and fail the launch) after the model was saved."""
    finished = subprocess.run([sys.executable, "-c", LAUNCHED_EXIT, outcome], cwd=ROOT, capture_output=True,
                              text=True, env={**os.environ, "PYTHONPATH": ROOT}, timeout=120)  # fmt: skip
    assert "work done" in finished.stdout and finished.returncode == code, finished.stderr[-2000:]
    assert ("error: a refusal" in finished.stderr) == (outcome == "refused")
