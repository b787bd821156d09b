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
    try:
        main()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(error.exit_code)
    _destroy_process_group()


def _destroy_process_group():
    """Tear the process group down before the interpreter exits: left to interpreter shutdown, gloo's threads
    can be destroyed while running (a DeepSpeed CPU run once aborted that way after saving its model)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
