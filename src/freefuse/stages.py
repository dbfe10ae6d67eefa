"""How far a command got, for the programs that start it: one line per stage in a file.

With `FREEFUSE_PROGRESS_FILE=PATH` set, the command line appends a line to PATH at each stage:
`started` (signal handling is in place), `loading`, `step I/N` after each denoising step,
`writing`, `done`. A wrapper (a job queue, a test) can follow a run from there without parsing the
terminal's progress bars, and can tell a run that has not started yet from one that is running.
"""

from __future__ import annotations

import os

VARIABLE = "FREEFUSE_PROGRESS_FILE"


def report(stage: str) -> None:
    """Append `stage` as one line to the progress file, when one is asked for (else nothing)."""
    path = os.environ.get(VARIABLE)
    if not path:
        return
    try:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(stage + "\n")
    except OSError:
        pass  # a progress file that cannot be written must not stop the run
