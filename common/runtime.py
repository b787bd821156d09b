"""The runtime of a script: the Accelerator (gloo on CPU-only machines), the DeepSpeed checks, logging and the
banner a training run prints."""

import logging
import os
import time

import torch

from common.errors import UserError

logger = logging.getLogger("harness")
TRACKER_FOLDER = "runs"  # common/model_files.py and common/run_folder.py know it


# ---------------------------------------------------------------------------- accelerator
def make_accelerator(args, log_with=None):
    """An Accelerator with gloo on CPU-only machines (DeepSpeed's gathers fail on CPU otherwise)."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, InitProcessGroupKwargs, ProjectConfiguration

    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1 or os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true"
    handlers = [InitProcessGroupKwargs(backend="gloo")] if launched and not torch.cuda.is_available() else []
    report_to = None if args.report_to in (None, "none") else args.report_to
    accelerator = Accelerator(
        gradient_accumulation_steps=getattr(args, "gradient_accumulation_steps", 1),
        mixed_precision=args.mixed_precision,
        log_with=log_with or report_to,
        # Trackers write under <output_dir>/runs/<script> (`tensorboard --logdir <output_dir>/runs`), beside the
        # model and outside its fingerprint.
        project_config=ProjectConfiguration(
            project_dir=args.output_dir,
            logging_dir=os.path.join(args.output_dir, TRACKER_FOLDER) if args.output_dir else None,
        ),
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


def available_memory_bytes():
    """Memory this process can still take: MemAvailable, within a cgroup (v2 or v1) limit when one is set;
    None where neither can be read (the checks that use it are then skipped)."""
    available = None
    try:
        with open("/proc/meminfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except OSError:
        pass
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        try:
            with open(limit_file, encoding="utf-8") as handle:
                limit = handle.read().strip()
            with open(usage_file, encoding="utf-8") as handle:
                usage = int(handle.read().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 1 << 60:  # "max" or a huge number: no limit
            left = max(int(limit) - usage, 0)
            available = left if available is None else min(available, left)
        break
    return available


def check_fits_in_memory(needed_bytes, what, fix):
    """Refuse before any work an option sized beyond the memory the machine has left."""
    available = available_memory_bytes()
    if available is not None and needed_bytes > available:
        raise UserError(
            f"{what} needs {_size(needed_bytes)} of memory and this machine has {_size(available)} available; {fix}."
        )


def _size(count):
    return f"{count / 2**30:.1f} GiB" if count >= 2**30 else f"{count / 2**20:.1f} MiB"


def _machine_busy_seconds():
    """CPU seconds all processes of the machine have spent busy since boot (/proc/stat), or None."""
    try:
        with open("/proc/stat", encoding="utf-8") as handle:
            fields = handle.readline().split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(value) for value in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class LoadProbe:
    """How busy the machine was with other work while a measurement ran: the machine's busy CPU time minus this
    process's own, over the wall time, in cores. Latency measured while other work holds the cores is not the
    model's latency; reports flag it.

        with LoadProbe() as probe:
            ...time something...
        probe.other_cores  # e.g. 1.8: other processes kept 1.8 cores busy on average
    """

    FLAG_CORES = 0.5  # above this, a timing is reported as measured under load

    def __enter__(self):
        self.wall, self.own, self.machine = time.perf_counter(), _own_cpu_seconds(), _machine_busy_seconds()
        return self

    def __exit__(self, *exc):
        wall = max(time.perf_counter() - self.wall, 1e-9)
        machine = _machine_busy_seconds()
        own = _own_cpu_seconds() - self.own
        self.other_cores = (
            None if machine is None or self.machine is None else max((machine - self.machine - own) / wall, 0.0)
        )
        return False


def _own_cpu_seconds():
    times = os.times()
    return times.user + times.system


def cpu_features():
    """The CPU's model and the instruction sets int8 and bf16 kernels use, from /proc/cpuinfo: e.g.
    'Intel Xeon ... (AVX2; no AVX-512, no VNNI, no AMX)'. Speed figures of int8 are meaningless without it."""
    model, flags = "unknown CPU", set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model == "unknown CPU":
                    model = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        return model
    sets = {"AVX2": {"avx2"}, "AVX-512": {"avx512f"}, "VNNI": {"avx512_vnni", "avx_vnni"},
            "AMX": {"amx_int8", "amx_tile"}}  # fmt: skip
    have = [name for name, names in sets.items() if flags & names]
    missing = [name for name, names in sets.items() if not flags & names]
    return f"{model} ({', '.join(have) or 'none of AVX2/AVX-512/VNNI/AMX'}" + (
        f"; no {', no '.join(missing)})" if missing else ")"
    )
