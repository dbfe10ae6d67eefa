"""`freefuse` / `python -m freefuse`: Ctrl-C and SIGTERM handled from the first moment, then the CLI.

The command line imports torch and diffusers, which takes seconds; a signal in that time must end
the program as cleanly as one during a run (exit 130, one line, no traceback, nothing written).
"""

from __future__ import annotations

import signal
import sys

EXIT_INTERRUPTED = 130
MESSAGE = "Interrupted; no partial output was written."


def _terminate(signum, frame):
    raise KeyboardInterrupt


def main() -> None:
    # Also when started with SIGINT ignored (a background job of a non-interactive shell).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        from .cli import main as cli_main
    except KeyboardInterrupt:
        print(MESSAGE, file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    cli_main()


if __name__ == "__main__":
    main()
