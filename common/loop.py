"""Checkpoints and the training loop's bookkeeping: what every phase shares and is easy to get wrong.

A script keeps its own loop (forward, loss, backward, optimiser and scheduler steps) and calls:
- `optimizer_param_groups`: AdamW groups without decay on biases and norms (one group under DeepSpeed);
- `resume_from_checkpoint`: loads model, optimiser, scheduler and RNG, and says where the run stood;
- `TrainLoop`: epochs, the seeded shuffle per epoch, skipping what a checkpoint consumed, counting optimiser
  steps only when gradients synchronised, logging, checkpoints every --checkpointing_steps;
- `check_finite_loss` / `clip_and_check_gradients`: a NaN/inf stops the run before the optimiser applies it;
- `save_final_model`: gathers (ZeRO-3) and writes the complete encoder folder, card and run files.
"""

import contextlib
import functools
import hashlib
import itertools
import json
import math
import os
import re
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field

import torch

from common.errors import Interrupted, UserError
from common.run_folder import STAGING, TRAINER_STATE, move_into_place, public_config, save_run_files
from common.runtime import logger, uses_deepspeed

_CHECKPOINT = re.compile(r"^step_(\d+)$")


# ---------------------------------------------------------------------------- optimiser
def optimizer_param_groups(model, weight_decay, accelerator):
    """AdamW parameter groups: no weight decay on biases and norms; one group under DeepSpeed ZeRO-3, which
    flattens parameters into its own groups (a scheduler built on two groups then fails)."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (no_decay if parameter.ndim < 2 or "norm" in name.lower() else decay).append(parameter)
    if uses_deepspeed(accelerator):
        return [{"params": decay + no_decay, "weight_decay": weight_decay}]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# ---------------------------------------------------------------------------- checkpoints
class LogHistory:
    """The logs of every optimiser step, appended to <output_dir>/.log_history.jsonl by the main process as
    they come. Only the last entry and the count stay in memory, and a checkpoint records the count,
    not the entries: a run of a million steps neither grows in memory nor rewrites its whole history into every
    checkpoint. A resumed run cuts the file back to its checkpoint's count (later lines were logged after it)."""

    FILE = ".log_history.jsonl"  # hidden: a run's own file, like .lock (common/run_folder.py)

    def __init__(self, output_dir=None, is_main=True, count=0, initial=None):
        self.path = os.path.join(output_dir, self.FILE) if output_dir and is_main else None
        self.count, self.last = 0, {}
        if self.path is None:
            self.count = count
            return
        kept = []
        if count and os.path.exists(self.path):
            with open(self.path, encoding="utf-8") as handle:
                for line in itertools.islice(handle, count):
                    kept.append(line if line.endswith("\n") else line + "\n")
        elif initial:  # a checkpoint of an earlier version held its entries itself
            kept = [json.dumps(entry) + "\n" for entry in initial[:count]]
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with open(self.path, "w", encoding="utf-8") as handle:
            handle.writelines(kept)
        self.count = len(kept) if kept else count
        self.last = json.loads(kept[-1]) if kept else {}

    def append(self, entry):
        self.count += 1
        self.last = entry
        if self.path is not None:
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(entry) + "\n")

    def __len__(self):
        return self.count

    def __iter__(self):
        """Every entry, read back from the file (main process)."""
        if self.path is None or not os.path.exists(self.path):
            return
        with open(self.path, encoding="utf-8") as handle:
            for line in handle:
                if line.strip():
                    yield json.loads(line)


@dataclass
class Progress:
    """Where a run stands: optimiser steps done, the epoch and batches consumed in it, the logs so far."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    log_history: LogHistory = field(default_factory=LogHistory)
    stream: dict | None = None  # a streaming run's position in its stream (common/streaming.StreamBatches)


def checkpoint_root(output_dir):
    return os.path.join(output_dir, "checkpoints")


def save_checkpoint(accelerator, args, script, progress):
    """accelerator.save_state into a temporary folder, renamed into place once complete; keep the last N."""
    root = checkpoint_root(args.output_dir)
    final = os.path.join(root, f"step_{progress.step}")
    partial = final + ".partial"
    if accelerator.is_main_process and os.path.exists(partial):
        shutil.rmtree(partial)
    accelerator.wait_for_everyone()
    if not uses_deepspeed(accelerator):  # ZeRO shards are checked at the final save instead
        _check_finite_state(accelerator.unwrap_model(accelerator._models[-1]).state_dict(), final)
    accelerator.save_state(partial)
    accelerator.wait_for_everyone()  # every rank has written its files (RNG states) before the rename
    if accelerator.is_main_process:
        state = {
            "script": script,
            "run_identity": run_identity(accelerator, args),
            "step": progress.step,
            "epoch": progress.epoch,
            "batch_in_epoch": progress.batch_in_epoch,
            "stream": progress.stream,
            "num_processes": accelerator.num_processes,
            "log_history_entries": len(progress.log_history),  # the first N lines of .log_history.jsonl
            "args": public_config(args),
        }
        with open(os.path.join(partial, TRAINER_STATE), "w", encoding="utf-8") as handle:
            json.dump(state, handle, indent=2, default=str)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(partial, final)
        # Rotation. A checkpoint is first renamed out of the step_N namespace, then deleted, so a kill during
        # the deletion never leaves a half-deleted step_N; leftovers of such kills (and of killed saves) are
        # removed here, as nothing else writes in this folder while the run holds its lock.
        complete = dict(_complete_checkpoints(root))
        for name in os.listdir(root):
            path = os.path.join(root, name)
            if path not in complete.values():
                shutil.rmtree(path, ignore_errors=True)
        existing = sorted(complete.items())
        for _, stale in existing[: max(len(existing) - args.checkpoints_total_limit, 0)]:
            os.replace(stale, stale + ".deleting")
            shutil.rmtree(stale + ".deleting")
    accelerator.wait_for_everyone()
    return final


# What a resumed run must share with the run that wrote the checkpoint: otherwise it would not continue it.
_FIXED_SETTINGS = ("per_device_train_batch_size", "gradient_accumulation_steps", "learning_rate", "lr_scheduler_type",
                   "num_warmup_steps", "seed")  # fmt: skip


def run_identity(accelerator, args):
    """The settings, process count and model shape that a checkpoint belongs to."""
    model = accelerator.unwrap_model(accelerator._models[-1]) if accelerator._models else None
    shapes = ""
    if model is not None:  # ZeRO-3 keeps the full shape of a partitioned parameter in ds_shape
        shapes = ";".join(f"{name}:{tuple(getattr(p, 'ds_shape', p.shape))}" for name, p in model.named_parameters())
    identity = {key: getattr(args, key, None) for key in _FIXED_SETTINGS}
    identity["num_processes"] = accelerator.num_processes
    identity["model_shape"] = hashlib.sha256(shapes.encode()).hexdigest()[:16]
    return identity


def _complete_checkpoints(root):
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        match = _CHECKPOINT.match(name)
        path = os.path.join(root, name)
        if match and os.path.exists(os.path.join(path, TRAINER_STATE)):
            found.append((int(match.group(1)), path))
    return found


def resume_from_checkpoint(accelerator, args, script):
    """Load the checkpoint named by --resume_from_checkpoint ('latest' or a folder) into the prepared
    model, optimiser, scheduler and RNG; returns the Progress it recorded (a fresh one without a checkpoint)."""
    if not args.resume_from_checkpoint:
        # Starting over (--overwrite_output_dir): an earlier run's checkpoints must not outlive it, or rotation
        # and 'latest' would mix the two runs.
        stale = checkpoint_root(args.output_dir)
        if accelerator.is_main_process and os.path.isdir(stale):
            shutil.rmtree(stale)
        accelerator.wait_for_everyone()
        return Progress(log_history=LogHistory(args.output_dir, accelerator.is_main_process))
    if args.resume_from_checkpoint == "latest":
        found = _complete_checkpoints(checkpoint_root(args.output_dir))
        if not found:
            logger.info(f"No checkpoint under {checkpoint_root(args.output_dir)}; starting from scratch.")
            return Progress(log_history=LogHistory(args.output_dir, accelerator.is_main_process))
        path = max(found)[1]
    else:
        path = args.resume_from_checkpoint
        if not os.path.exists(os.path.join(path, TRAINER_STATE)):
            raise UserError(f"{path} is not a complete checkpoint (no {TRAINER_STATE}); pass another or 'latest'.")
    with open(os.path.join(path, TRAINER_STATE), encoding="utf-8") as handle:
        state = json.load(handle)
    if state.get("script", script) != script:
        raise UserError(f"{path} is a checkpoint of {state['script']}, not of {script}; resume with that script.")
    saved, current = state.get("run_identity", {}), run_identity(accelerator, args)
    for key in sorted(saved.keys() & current.keys()):
        if saved[key] != current[key]:
            raise UserError(
                f"{path} was written with {key} = {saved[key]} but this run has {current[key]}; resume with the "
                "same settings and model, or start over with --overwrite_output_dir."
            )
    logger.info(f"Resuming from {path}")
    accelerator.load_state(path)
    old_entries = state.get("log_history")  # checkpoints of earlier versions held the entries themselves
    count = state.get("log_history_entries", len(old_entries or []))
    history = LogHistory(args.output_dir, accelerator.is_main_process, count, old_entries)
    return Progress(state["step"], state["epoch"], state["batch_in_epoch"], history, state.get("stream"))


# ---------------------------------------------------------------------------- schedule
SCHEDULES = ("linear", "cosine", "constant_with_warmup")


def _linear(step, *, num_warmup_steps, num_training_steps):
    if step < num_warmup_steps:
        return float(step) / float(max(1, num_warmup_steps))
    return max(0.0, float(num_training_steps - step) / float(max(1, num_training_steps - num_warmup_steps)))


def _cosine(step, *, num_warmup_steps, num_training_steps):
    if step < num_warmup_steps:
        return float(step) / float(max(1, num_warmup_steps))
    progress = float(step - num_warmup_steps) / float(max(1, num_training_steps - num_warmup_steps))
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * progress)))


def _constant_with_warmup(step, *, num_warmup_steps, num_training_steps):
    if step < num_warmup_steps:
        return float(step) / float(max(1.0, num_warmup_steps))
    return 1.0


def get_scheduler(name, optimizer, num_warmup_steps, num_training_steps):
    """`transformers.get_scheduler` for the three schedules the scripts offer: the same LambdaLR with the same
    factor at every step (tests/test_distributed.py compares them step by step). Written here because importing
    transformers' own pulls in its Trainer utilities and peft: 2.5 s of every process start."""
    if name not in SCHEDULES:
        raise UserError(f"Unknown --lr_scheduler_type {name!r}; use one of {', '.join(SCHEDULES)}.")
    factor = {"linear": _linear, "cosine": _cosine, "constant_with_warmup": _constant_with_warmup}[name]
    schedule = functools.partial(factor, num_warmup_steps=num_warmup_steps, num_training_steps=num_training_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


# ---------------------------------------------------------------------------- the loop
class TrainLoop:
    """Epochs, resume and bookkeeping around a script's own forward/backward.

        loop = TrainLoop(accelerator, args, dataloader, progress, script)
        for batch in loop:
            with accelerator.accumulate(model):
                ...forward, loss, backward, optimizer step, scheduler step...
            loop.end_of_batch(loss=loss, lr=scheduler.get_last_lr()[0])

    Iterating sets the sampler epoch (a seeded shuffle per epoch) and, after a resume, skips the batches
    the checkpoint had already consumed; epochs follow each other until --max_train_steps optimiser steps.
    `end_of_batch` counts an optimiser step only when accelerate synchronised gradients, records the logs
    of every step (`log_history`, written to trainer_state.json), shows them every --logging_steps and saves
    a checkpoint every --checkpointing_steps.
    """

    def __init__(self, accelerator, args, dataloader, progress, script, tracker_step_offset=0):
        # common/streaming.StreamBatches: endless, its position (not a batch count) is saved with checkpoints
        self.streaming = getattr(dataloader, "is_stream", False)
        if not self.streaming and len(dataloader) == 0:
            raise UserError("The data gives no batch on each process; lower --per_device_train_batch_size.")
        self.accelerator, self.args, self.dataloader, self.script = accelerator, args, dataloader, script
        self.progress = progress
        # Steps of earlier runs that the trackers continue (the stages of a progressive distillation).
        self.tracker_step_offset = tracker_step_offset
        self.bar = None
        self.started, self.first_step, self.runtime = None, progress.step, 0.0
        self.stop_signal = None  # set by SIGTERM / Ctrl-C; acted on at the end of the optimiser step

    def _request_stop(self, signal_number, frame):
        self.stop_signal = signal_number
        signal.signal(signal_number, signal.SIG_DFL)  # a second Ctrl-C or SIGTERM stops at once

    @contextlib.contextmanager
    def _stop_handlers(self):
        """SIGTERM (preemption, `scancel`, `kill`) and Ctrl-C finish the current optimiser step, write a
        checkpoint and end the run with one line, instead of dying mid-step or mid-save."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {number: signal.signal(number, self._request_stop) for number in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)

    @property
    def step(self):
        return self.progress.step

    @property
    def last_logs(self):
        return self.progress.log_history.last

    def __iter__(self):
        from tqdm.auto import tqdm

        progress, args = self.progress, self.args
        self.bar = tqdm(
            total=args.max_train_steps,
            initial=progress.step,
            disable=not self.accelerator.is_local_main_process,
            desc="steps",
        )
        self.started, self.first_step = time.perf_counter(), progress.step
        with self._stop_handlers():
            yield from self._batches()
        self.runtime = time.perf_counter() - self.started
        self.bar.close()

    def speed(self):
        """Like the HF Trainer's metrics: wall time of this run's loop, and samples and steps per second in it."""
        steps = self.progress.step - self.first_step
        args = self.args
        samples = steps * args.per_device_train_batch_size * self.accelerator.num_processes
        samples *= args.gradient_accumulation_steps
        runtime = max(self.runtime, 1e-9)
        return {
            "train_runtime": round(self.runtime, 4),
            "train_samples_per_second": round(samples / runtime, 3),
            "train_steps_per_second": round(steps / runtime, 3),
        }

    def _batches(self):
        progress, args = self.progress, self.args
        if self.streaming:  # a stream resumes from the position its checkpoint recorded, without replaying batches
            if progress.stream is not None:
                self.dataloader.load_state_dict(progress.stream)
            for batch in self.dataloader:
                if progress.step >= args.max_train_steps:
                    break
                progress.batch_in_epoch += 1
                yield batch
            return
        skip = progress.batch_in_epoch
        while progress.step < args.max_train_steps:
            self.dataloader.set_epoch(progress.epoch)
            batches = self.dataloader
            if skip:
                batches = _rng_neutral(self.accelerator.skip_first_batches(self.dataloader, skip))
            progress.batch_in_epoch, skip = skip, 0
            for batch in batches:
                if progress.step >= args.max_train_steps:
                    break
                progress.batch_in_epoch += 1
                yield batch
            else:
                progress.epoch, progress.batch_in_epoch = progress.epoch + 1, 0

    def end_of_batch(self, **logs):
        """After each batch; tensors among `logs` (losses, accuracies) are averaged over the processes, so the
        logs of N processes are those of one process with the whole batch."""
        if not self.accelerator.sync_gradients:
            return
        logs = {
            key: self.accelerator.reduce(value.detach().float(), "mean").item() if torch.is_tensor(value) else value
            for key, value in logs.items()
        }
        progress = self.progress
        progress.step += 1
        if self.streaming:
            progress.stream = self.dataloader.state_dict()
        progress.log_history.append({"step": progress.step, **logs})
        self.bar.update(1)
        if progress.step % self.args.logging_steps == 0 or progress.step == self.args.max_train_steps:
            self.bar.set_postfix({key: f"{value:.4g}" for key, value in logs.items()})
            self.accelerator.log(logs, step=self.tracker_step_offset + progress.step)
        saved = self.args.checkpointing_steps and progress.step % self.args.checkpointing_steps == 0
        if saved:
            save_checkpoint(self.accelerator, self.args, self.script, progress)
        if self._stop_requested():
            if not saved and progress.step < self.args.max_train_steps:
                save_checkpoint(self.accelerator, self.args, self.script, progress)
            number = self.stop_signal or signal.SIGTERM
            raise Interrupted(
                f"Stopped by {signal.Signals(number).name} after step {progress.step}; the checkpoint of that step is "
                f"in {checkpoint_root(self.args.output_dir)}: continue with --resume_from_checkpoint latest.",
                number,
            )

    def _stop_requested(self):
        """Whether any process was asked to stop: all stop at the same step, or the next collective would hang."""
        if self.accelerator.num_processes == 1:
            return self.stop_signal is not None
        flag = torch.tensor([0.0 if self.stop_signal is None else 1.0], device=self.accelerator.device)
        return float(self.accelerator.reduce(flag, "sum")) > 0


def _rng_neutral(batches):
    """Iterate without the draw a new DataLoader iterator takes from the global RNG for its base seed.

    The uninterrupted run made that draw at the start of the epoch, before the checkpoint saved the
    RNG state; drawing again after a mid-epoch resume would shift every later dropout mask.
    """
    cpu_state = torch.get_rng_state()
    cuda_state = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    iterator = iter(batches)
    first = next(iterator, None)
    torch.set_rng_state(cpu_state)
    if cuda_state is not None:
        torch.cuda.set_rng_state_all(cuda_state)
    if first is None:
        return
    yield first
    yield from iterator


# ---------------------------------------------------------------------------- finite checks
def check_finite(value, what, step):
    """Stop on a NaN/inf loss or gradient norm, before the optimiser applies it or anything is saved."""
    if value is not None and not torch.isfinite(torch.as_tensor(value)).all():
        raise UserError(
            f"The {what} became {float(torch.as_tensor(value).float().max())} at step {step + 1}; lower "
            "--learning_rate or check the data (the last checkpoint is kept; no weights were saved)."
        )


def check_finite_loss(loss, step):
    check_finite(loss.detach(), "loss", step)


def clip_and_check_gradients(accelerator, model, args, step):
    """Clip the gradients; a non-finite norm stops the run before the optimiser step. Under DeepSpeed the engine
    has already clipped and stepped inside `accelerator.backward` and this reads its norm: on a non-finite norm
    DeepSpeed skipped that step itself (weights and optimiser state unchanged; common/runtime.py refuses a config
    that turns this off), so here too no NaN/inf reaches the weights (tests/test_multiprocess.py)."""
    norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
    check_finite(norm, "gradient norm", step)


def _check_finite_state(state_dict, where):
    for name, tensor in state_dict.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise UserError(f"Parameter {name} holds NaN/inf; nothing was written to {where}. Lower --learning_rate.")


# ---------------------------------------------------------------------------- outputs
def save_final_model(accelerator, args, model, script, role, results, log_history=None, transform_state=None):
    """Gather the weights (sharded under ZeRO-3), save the encoder folder, card and run files; push.
    `transform_state` maps the gathered state dict to the one saved (e.g. LoRA adapters merged)."""
    from common.hub import push_to_hub, write_model_card

    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        if transform_state is not None:
            state_dict = transform_state(state_dict)
        _check_finite_state(state_dict, args.output_dir)
        encoder = accelerator.unwrap_model(model)
        # Written whole into a staging folder, then moved into place with training_args.json (the mark of a
        # finished run) last; a folder caught between the two is refused by the loader until it is re-saved.
        staging = os.path.join(args.output_dir, STAGING)
        if os.path.exists(staging):
            shutil.rmtree(staging)
        encoder.save_pretrained(staging, state_dict=state_dict)
        write_model_card(staging, encoder, role, script, results, args=args)
        save_run_files(staging, args, script, results, log_history)
        move_into_place(staging, args.output_dir, last="training_args.json")
        logger.info(f"Saved the {role} to {args.output_dir}")
        if args.push_to_hub:
            push_to_hub(args.output_dir, args.hub_model_id, args.hub_token, args.hub_private_repo)
    accelerator.wait_for_everyone()
