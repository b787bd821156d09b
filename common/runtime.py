"""The runtime of a script: the Accelerator (gloo on CPU-only machines), the DeepSpeed checks, logging and the
banner a training run prints."""

import logging
import os

import torch

from common.errors import UserError

logger = logging.getLogger("harness")


# ---------------------------------------------------------------------------- accelerator
def make_accelerator(args, log_with=None):
    """An Accelerator with gloo on CPU-only machines (DeepSpeed's gathers fail on CPU otherwise)."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, InitProcessGroupKwargs

    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1 or os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true"
    handlers = [InitProcessGroupKwargs(backend="gloo")] if launched and not torch.cuda.is_available() else []
    report_to = None if args.report_to in (None, "none") else args.report_to
    accelerator = Accelerator(
        gradient_accumulation_steps=getattr(args, "gradient_accumulation_steps", 1),
        mixed_precision=args.mixed_precision,
        log_with=log_with or report_to,
        project_dir=args.output_dir,
        kwargs_handlers=handlers,
        # Seedable sampler: the shuffle order is a function of (seed, epoch) only, the same for any number of
        # processes, so N processes see the batches one process sees, and resume can replay the order.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    check_deepspeed_skips_bad_steps(accelerator)
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


def check_deepspeed_skips_bad_steps(accelerator):
    """Under DeepSpeed the engine clips and steps inside `accelerator.backward`, so the scripts can only read the
    gradient norm after the step. What keeps a NaN/inf gradient out of the weights there is DeepSpeed's own
    check: it computes the norm first and skips the step (weights and optimiser state unchanged) when it is not
    finite; the script then stops on that norm. In bf16 the check can be switched off: refuse that."""
    plugin = accelerator.state.deepspeed_plugin
    config = getattr(plugin, "deepspeed_config", None) or {}
    bf16 = config.get("bf16") or config.get("bfloat16") or {}
    if isinstance(bf16, dict) and bf16.get("check_grad_overflow") is False:
        raise UserError(
            'The DeepSpeed config sets "bf16": {"check_grad_overflow": false}, so a NaN/inf gradient would be '
            "applied to the weights before the run can stop; remove that setting."
        )


def log_banner(args, accelerator, num_examples):
    total = args.per_device_train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info("***** Running training *****")
    logger.info(f"  Num examples = {num_examples}")
    logger.info(f"  Instantaneous batch size per device = {args.per_device_train_batch_size}")
    logger.info(f"  Total train batch size (w. parallel, distributed & accumulation) = {total}")
    logger.info(f"  Gradient accumulation steps = {args.gradient_accumulation_steps}")
    logger.info(f"  Total optimization steps = {args.max_train_steps} (warmup {args.num_warmup_steps})")


def log_truncation(encoder, texts, kind, source):
    """Long texts are truncated, not refused; say how many so that a too-small --max_length shows."""
    count, checked = encoder.count_truncated(texts, kind)
    if count:
        logger.info(
            f"{count} of {checked} {'queries' if kind == 'query' else 'ads'} in {source} exceed max_length "
            f"{encoder.config.max_length} tokens and are truncated (raise --max_length to keep them whole)."
        )
    return count
