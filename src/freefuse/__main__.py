"""`freefuse` / `python -m freefuse`: Ctrl-C and SIGTERM handled from the first moment, then the CLI.

The command line imports torch and diffusers, which takes seconds; a signal in that time must end
the program as cleanly as one during a run (exit 130, one line, no traceback, nothing written).
"""

from __future__ import annotations

import signal
import sys

from . import stages
from .errors import INTERRUPTED as MESSAGE
from .errors import is_interrupt

EXIT_INTERRUPTED = 130


def _terminate(signum, frame):
    raise KeyboardInterrupt


def interrupted() -> None:
    """Say so and exit 130, once: further signals are ignored from here on, so that a second
    Ctrl-C cannot cut the message or the clean-up short."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    print(MESSAGE, file=sys.stderr, flush=True)
    sys.exit(EXIT_INTERRUPTED)


def main() -> None:
    # Also when started with SIGINT ignored (a background job of a non-interactive shell).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _terminate)
    stages.report("started")
    try:
        from .cli import main as cli_main  # torch and diffusers: seconds, during which a signal may come
    except BaseException as error:
        if is_interrupt(error):
            interrupted()
        raise
    cli_main()


if __name__ == "__main__":
    main()
