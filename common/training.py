"""Training plumbing every phase shares: arguments, Accelerator set-up, checkpoints and resume, logging."""

import json
import logging
import math
import os
import re
import shutil

import torch
import yaml

from common.errors import UserError

logger = logging.getLogger("harness")


# ---------------------------------------------------------------------------- arguments
def add_common_training_args(parser):
    """The Hub's flag names for the parts of a training run every phase has."""
    group = parser.add_argument_group("Optimisation")
    group.add_argument("--per_device_train_batch_size", type=int, default=32)
    group.add_argument("--gradient_accumulation_steps", type=int, default=1)
    group.add_argument("--learning_rate", type=float, default=5e-5)
    group.add_argument("--weight_decay", type=float, default=0.01)
    group.add_argument("--num_train_epochs", type=float, default=1.0)
    group.add_argument("--max_train_steps", type=int, default=None, help="Overrides --num_train_epochs.")
    group.add_argument("--lr_scheduler_type", default="linear", choices=["linear", "cosine", "constant_with_warmup"])
    group.add_argument("--num_warmup_steps", type=int, default=None, help="Default: 5%% of the optimiser steps.")
    group.add_argument("--max_grad_norm", type=float, default=1.0)
    group.add_argument("--gradient_checkpointing", action="store_true")
    group = parser.add_argument_group("Runtime")
    group.add_argument("--seed", type=int, default=42)
    group.add_argument(
        "--mixed_precision",
        default=None,
        choices=["no", "fp16", "bf16"],
        help="Default: what `accelerate config` says (bf16 in the shipped GPU configs).",
    )
    group.add_argument("--dataloader_num_workers", type=int, default=0)
    add_model_safety_args(group)
    group = parser.add_argument_group("Checkpointing")
    group.add_argument("--checkpointing_steps", type=int, default=None, help="Save the training state every N steps.")
    group.add_argument("--checkpoints_total_limit", type=int, default=2, help="Keep the last N checkpoints.")
    group.add_argument("--resume_from_checkpoint", default=None, help="A checkpoint folder, or 'latest'.")
    group = parser.add_argument_group("Logging and Hub")
    group.add_argument("--report_to", default="none", help="tensorboard, wandb, all or none.")
    group.add_argument("--logging_steps", type=int, default=10)
    group.add_argument("--push_to_hub", action="store_true")
    group.add_argument("--hub_model_id", default=None)
    group.add_argument("--hub_token", default=None, help="Default: the HF_TOKEN environment or the cached login.")
    group.add_argument("--hub_private_repo", action="store_true")


def add_model_safety_args(group):
    """The two opt-ins every script that loads a model shares; both are off by default."""
    group.add_argument("--trust_remote_code", action="store_true", help="Run model code from the Hub (off: unsafe).")
    group.add_argument("--allow_pickle_weights", action="store_true", help="Load .bin weights (off: unsafe).")


def parse_with_config(parser, argv=None):
    """Parse argv; `--config file.yaml` supplies defaults that flags on the command line override."""
    parser.add_argument("--config", default=None, help="YAML file of flag values; command-line flags win.")
    known, _ = parser.parse_known_args(argv)
    if known.config:
        if not os.path.exists(known.config):
            raise UserError(f"Config file {known.config} does not exist; check the path.")
        with open(known.config, encoding="utf-8") as handle:
            values = yaml.safe_load(handle) or {}
        if not isinstance(values, dict):
            raise UserError(f"{known.config} must be a YAML mapping of flag names to values.")
        valid = {action.dest for action in parser._actions}
        unknown = sorted(set(values) - valid)
        if unknown:
            raise UserError(f"{known.config} sets unknown flags {', '.join(unknown)}; remove or rename them.")
        parser.set_defaults(**values)
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------- accelerator
def make_accelerator(args, log_with=None):
    """An Accelerator with gloo on CPU-only machines (DeepSpeed's gathers fail on CPU otherwise)."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, InitProcessGroupKwargs

    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1 or os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true"
    handlers = [InitProcessGroupKwargs(backend="gloo")] if launched and not torch.cuda.is_available() else []
    report_to = None if args.report_to in (None, "none") else args.report_to
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=log_with or report_to,
        project_dir=args.output_dir,
        kwargs_handlers=handlers,
        # Seedable sampler: the shuffle order is a function of (seed, epoch), so resume can replay it.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if not accelerator.is_local_main_process:
        logger.setLevel(logging.WARNING)
    _quiet_libraries()
    return accelerator


def _quiet_libraries():
    import datasets
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()


def uses_deepspeed(accelerator):
    return accelerator.state.deepspeed_plugin is not None


def check_run_args(args, script):
    """Checks that must fail before any work: the output folder, Hub push settings, DeepSpeed."""
    marker = os.path.join(args.output_dir, "training_args.json")
    if os.path.exists(marker) and not args.overwrite_output_dir:
        try:
            with open(marker, encoding="utf-8") as handle:
                previous = json.load(handle).get("script", "another run")
        except (OSError, ValueError):
            previous = "another run"
        raise UserError(
            f"{args.output_dir} already holds a finished run of {previous}; pass --overwrite_output_dir to replace "
            "it or choose another --output_dir."
        )
    if args.push_to_hub and not args.hub_model_id:
        raise UserError("--push_to_hub needs --hub_model_id (e.g. your-name/harness-student).")
    if os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true":
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            raise UserError(
                "The accelerate config asks for DeepSpeed but it is not installed; `pip install deepspeed` or "
                "launch with accelerate_configs/multi_gpu.yaml."
            ) from None


# ---------------------------------------------------------------------------- steps and schedule
def plan_steps(args, batches_per_epoch, accelerator):
    """Optimiser steps per epoch and in total (one step per `gradient_accumulation_steps` batches)."""
    steps_per_epoch = max(math.ceil(batches_per_epoch / args.gradient_accumulation_steps), 1)
    if args.max_train_steps is None:
        args.max_train_steps = max(int(args.num_train_epochs * steps_per_epoch), 1)
    epochs = math.ceil(args.max_train_steps / steps_per_epoch)
    if args.num_warmup_steps is None:
        args.num_warmup_steps = int(0.05 * args.max_train_steps)
    return steps_per_epoch, epochs


def make_optimizer_and_scheduler(args, model, accelerator):
    """AdamW without weight decay on biases and norms, and the LR schedule."""
    from transformers import get_scheduler

    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (no_decay if parameter.ndim < 2 or "norm" in name.lower() else decay).append(parameter)
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if uses_deepspeed(accelerator):
        # ZeRO-3 flattens parameters into its own groups; a scheduler built on two groups then fails.
        groups = [{"params": decay + no_decay, "weight_decay": args.weight_decay}]
    optimizer = torch.optim.AdamW(groups, lr=args.learning_rate)
    scheduler = get_scheduler(
        args.lr_scheduler_type,
        optimizer,
        num_warmup_steps=args.num_warmup_steps,
        num_training_steps=args.max_train_steps,
    )
    return optimizer, scheduler


def log_banner(args, accelerator, num_examples, epochs):
    total = args.per_device_train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info("***** Running training *****")
    logger.info(f"  Num examples = {num_examples}")
    logger.info(f"  Num epochs = {epochs}")
    logger.info(f"  Instantaneous batch size per device = {args.per_device_train_batch_size}")
    logger.info(f"  Total train batch size (w. parallel, distributed & accumulation) = {total}")
    logger.info(f"  Gradient accumulation steps = {args.gradient_accumulation_steps}")
    logger.info(f"  Total optimization steps = {args.max_train_steps}")


def progress_bar(total, accelerator, initial=0):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not accelerator.is_local_main_process, desc="steps")


# ---------------------------------------------------------------------------- checkpoints
_CHECKPOINT = re.compile(r"^step_(\d+)$")


def checkpoint_root(output_dir):
    return os.path.join(output_dir, "checkpoints")


def save_checkpoint(accelerator, args, step, epoch, batch_in_epoch):
    """accelerator.save_state into a temporary folder, renamed into place once complete; keep the last N."""
    root = checkpoint_root(args.output_dir)
    final = os.path.join(root, f"step_{step}")
    partial = final + ".partial"
    if accelerator.is_main_process and os.path.exists(partial):
        shutil.rmtree(partial)
    accelerator.wait_for_everyone()
    if not uses_deepspeed(accelerator):  # ZeRO shards are checked at the final save instead
        _check_finite_state(accelerator.unwrap_model(accelerator._models[-1]).state_dict(), final)
    accelerator.save_state(partial)
    if accelerator.is_main_process:
        state = {"step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch, "args": public_config(args)}
        with open(os.path.join(partial, "trainer_state.json"), "w", encoding="utf-8") as handle:
            json.dump(state, handle, indent=2, default=str)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(partial, final)
        existing = sorted(_complete_checkpoints(root), key=lambda item: item[0])
        for _, stale in existing[: max(len(existing) - args.checkpoints_total_limit, 0)]:
            shutil.rmtree(stale)
    accelerator.wait_for_everyone()
    return final


def _complete_checkpoints(root):
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        match = _CHECKPOINT.match(name)
        path = os.path.join(root, name)
        if match and os.path.exists(os.path.join(path, "trainer_state.json")):
            found.append((int(match.group(1)), path))
    return found


def resume_state(accelerator, args):
    """Load the checkpoint named by --resume_from_checkpoint; returns (step, epoch, batch_in_epoch)."""
    if not args.resume_from_checkpoint:
        return 0, 0, 0
    if args.resume_from_checkpoint == "latest":
        found = _complete_checkpoints(checkpoint_root(args.output_dir))
        if not found:
            logger.info(f"No checkpoint under {checkpoint_root(args.output_dir)}; starting from scratch.")
            return 0, 0, 0
        path = max(found)[1]
    else:
        path = args.resume_from_checkpoint
        if not os.path.exists(os.path.join(path, "trainer_state.json")):
            raise UserError(f"{path} is not a complete checkpoint (no trainer_state.json); pass another or 'latest'.")
    logger.info(f"Resuming from {path}")
    accelerator.load_state(path)
    with open(os.path.join(path, "trainer_state.json"), encoding="utf-8") as handle:
        state = json.load(handle)
    return state["step"], state["epoch"], state["batch_in_epoch"]


# ---------------------------------------------------------------------------- outputs
SECRET_ARGS = {"hub_token"}


def public_config(args):
    """The whole config, less secrets: what checkpoints, run files and trackers record."""
    return {key: value for key, value in vars(args).items() if key not in SECRET_ARGS}


def save_run_files(output_dir, args, script, results=None):
    """training_args.json (the whole config, less secrets) and all_results.json next to the saved model."""
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "training_args.json"), "w", encoding="utf-8") as handle:
        json.dump({"script": script, **public_config(args)}, handle, indent=2, default=str)
    if results is not None:
        with open(os.path.join(output_dir, "all_results.json"), "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=2)


def tracker_config(args):
    """Config for trackers: scalars only, never the token."""
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in public_config(args).items()}


def log_truncation(encoder, texts, kind, source):
    """Long texts are truncated, not refused; say how many so that a too-small --max_length shows."""
    count, checked = encoder.count_truncated(texts, kind)
    if count:
        logger.info(
            f"{count} of {checked} {'queries' if kind == 'query' else 'ads'} in {source} exceed max_length "
            f"{encoder.config.max_length} tokens and are truncated (raise --max_length to keep them whole)."
        )
    return count


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
    """Clip the gradients; a non-finite norm stops the run before the optimiser step."""
    norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
    check_finite(norm, "gradient norm", step)


def _check_finite_state(state_dict, where):
    for name, tensor in state_dict.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise UserError(f"Parameter {name} holds NaN/inf; nothing was written to {where}. Lower --learning_rate.")


class TrainLoop:
    """Epochs, resume and bookkeeping around a script's own forward/backward.

        loop = TrainLoop(accelerator, args, dataloader, epochs)
        for batch in loop:
            with accelerator.accumulate(model):
                ...forward, loss, backward, optimizer step...
            loop.end_of_batch(loss=loss.item())

    Iterating sets the sampler epoch (a seeded shuffle per epoch) and, after --resume_from_checkpoint,
    skips the batches the checkpoint had already consumed. `end_of_batch` counts an optimiser step only
    when accelerate synchronised gradients, updates the progress bar, logs every --logging_steps and
    saves a checkpoint every --checkpointing_steps; iteration stops at --max_train_steps.
    """

    def __init__(self, accelerator, args, dataloader, epochs):
        self.accelerator, self.args, self.dataloader, self.epochs = accelerator, args, dataloader, epochs
        self.step, self.epoch, self.skip = resume_state(accelerator, args)
        self.batch_in_epoch = 0
        self.last_logs = {}
        self.bar = None

    def __iter__(self):
        self.bar = progress_bar(self.args.max_train_steps, self.accelerator, initial=self.step)
        for epoch in range(self.epoch, self.epochs):
            self.epoch = epoch
            self.dataloader.set_epoch(epoch)
            batches = self.dataloader
            if self.skip:
                batches = _rng_neutral(self.accelerator.skip_first_batches(self.dataloader, self.skip))
            self.batch_in_epoch, self.skip = self.skip, 0
            for batch in batches:
                if self.step >= self.args.max_train_steps:
                    break
                self.batch_in_epoch += 1
                yield batch
            if self.step >= self.args.max_train_steps:
                break
        self.bar.close()

    def end_of_batch(self, **logs):
        if not self.accelerator.sync_gradients:
            return
        self.step += 1
        self.bar.update(1)
        self.last_logs = logs
        if self.step % self.args.logging_steps == 0 or self.step == self.args.max_train_steps:
            self.bar.set_postfix({key: f"{value:.4g}" for key, value in logs.items()})
            self.accelerator.log(logs, step=self.step)
        if self.args.checkpointing_steps and self.step % self.args.checkpointing_steps == 0:
            save_checkpoint(self.accelerator, self.args, self.step, self.epoch, self.batch_in_epoch)


def prepare_training(accelerator, args, model, dataloader, num_examples, project):
    """Plan the steps, build optimiser and schedule, accelerate.prepare, start trackers, load a checkpoint
    if resuming, and print the banner. Returns (model, optimizer, scheduler, loop)."""
    _, epochs = plan_steps(args, len(dataloader) // accelerator.num_processes, accelerator)
    optimizer, scheduler = make_optimizer_and_scheduler(args, model, accelerator)
    model, optimizer, dataloader, scheduler = accelerator.prepare(model, optimizer, dataloader, scheduler)
    if not accelerator.trackers:  # once per script, also when pruning stages call this again
        accelerator.init_trackers(project, config=tracker_config(args))
    loop = TrainLoop(accelerator, args, dataloader, epochs)
    log_banner(args, accelerator, num_examples, epochs)
    return model, optimizer, scheduler, loop


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


def save_final_model(accelerator, args, model, script, role, results):
    """Gather the weights (sharded under ZeRO-3), save the encoder folder, card and run files; push."""
    from common.hub import push_to_hub, write_model_card

    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        _check_finite_state(state_dict, args.output_dir)
        encoder = accelerator.unwrap_model(model)
        encoder.save_pretrained(args.output_dir, state_dict=state_dict)
        write_model_card(args.output_dir, encoder, role, script, results)
        save_run_files(args.output_dir, args, script, results)
        logger.info(f"Saved the {role} to {args.output_dir}")
        if args.push_to_hub:
            push_to_hub(args.output_dir, args.hub_model_id, args.hub_token, args.hub_private_repo)
    accelerator.wait_for_everyone()
