"""One exception for mistakes a user can fix; scripts print it as one sentence and exit non-zero."""

import sys


class UserError(Exception):
    """An error caused by input, arguments or environment, with a message that names the fix."""

    exit_code = 2


class Interrupted(UserError):
    """The run was stopped by SIGTERM or Ctrl-C after saving a checkpoint; exits 128 + the signal number."""

    def __init__(self, message, signal_number):
        super().__init__(message)
        self.exit_code = 128 + signal_number


def run_cli(main):
    """Run a script's main(); a UserError ends it with its one-sentence message and exit code 2 (130 or 143
    for a run stopped by Ctrl-C or SIGTERM)."""
    code = 0
    try:
        main()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        code = error.exit_code
    _exit(code)


def _exit(code):
    """End the process. A process of a multi-process launch tears its process group down and then ends without
    the interpreter's shutdown: there, C++ objects of torch.distributed (gloo, DeepSpeed's groups) are destroyed
    with threads still running and the process can abort after its work is done ("terminate called without an
    active exception" with no Python frame, after the model was saved; seen in DeepSpeed ZeRO-3 CPU launches
    under load, see docs/testing.md), which fails the whole launch. Everything the run writes is written and
    closed by then: files, checkpoints, trackers (accelerator.end_training), logs (flushed here)."""
    import logging
    import os

    import torch.distributed as dist

    launched = dist.is_available() and dist.is_initialized()
    if launched:
        dist.destroy_process_group()
    launched = launched or int(os.environ.get("WORLD_SIZE", "1")) > 1
    if not launched:
        sys.exit(code)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
