"""One exception for mistakes a user can fix; scripts print it as one sentence and exit non-zero."""

import sys


class UserError(Exception):
    """An error caused by input, arguments or environment, with a message that names the fix."""


def run_cli(main):
    """Run a script's main(); a UserError ends it with its one-sentence message and exit code 2."""
    try:
        main()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
