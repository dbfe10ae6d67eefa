"""The errors FreeFuse raises for what a user can fix, and how every front end tells them apart.

A user's mistake (a missing file, a word not in the prompt, a LoRA for another model) is a
`FreeFuseError` whose message says what was wrong and how to fix it; the command line exits 2 with
that message and the web page shows it. Anything else is a bug (exit 1, "internal error"). Every
front end classifies a failure with `describe_failure`, so the CLI, the batch runner and the page
say the same thing about the same error.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from typing import Literal

#: What every front end says when Ctrl-C or SIGTERM stops it (exit 130).
INTERRUPTED = "Interrupted; no partial output was written."


class FreeFuseError(ValueError):
    """A mistake in what was asked for; the message says what was wrong and how to fix it."""


class SettingsError(FreeFuseError):
    """Settings that cannot run; the message names each setting and what to pass instead."""


class LoraFileError(FreeFuseError):
    """A LoRA file cannot be used: missing, not safetensors, corrupt, or for another model."""


class LoraFitError(LoraFileError):
    """A LoRA file made for another model: layers this model lacks, or of other sizes."""


class ModelLoadError(FreeFuseError):
    """The base model cannot be found or loaded (the message says what is missing)."""


class WordNotFoundError(FreeFuseError):
    """An activation word is not in the prompt (or only inside another word, or cut off)."""


class EmbeddingError(FreeFuseError):
    """A bundled embedding that cannot be used with this model."""


class MaskingError(FreeFuseError):
    """A subject LoRA that cannot be masked per token (fused into the weights, DoRA, ...)."""


class JobFileError(FreeFuseError):
    """A job or grid file is malformed; the message names the line or key."""


class InputFileError(FreeFuseError):
    """A file the run names cannot be read (an I/O error, a special file); the message names it."""


class OutputFolderError(FreeFuseError):
    """The output folder cannot be made or written to."""


class NumericalError(FreeFuseError):
    """The model produced NaN or inf values; the image would be black, so none is returned."""


class OutputExistsError(FileExistsError):
    """An output file exists and overwriting was not asked for."""


class RunCancelled(Exception):
    """A run was cancelled between two steps (the page's Cancel button, a caller's event)."""


#: What counts as the user's to fix. Plain `ValueError`s are the library's argument errors
#: ("Unknown device 'cuda:9'"), which name the argument too.
USER_ERRORS: tuple[type[BaseException], ...] = (
    FreeFuseError,
    ValueError,
    FileNotFoundError,
    NotADirectoryError,
    IsADirectoryError,
    OutputExistsError,
)
# Storage problems are the user's to fix (space, permissions, a read-only disk), not bugs.
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG})
# A path the system refuses: the name, not the disk, is wrong.
PATH_ERRNOS = frozenset({errno.ENAMETOOLONG, errno.ELOOP, errno.ENOTDIR, errno.EISDIR, errno.ENOENT})

FailureKind = Literal["user", "storage", "memory", "cancelled", "internal"]


@dataclass(frozen=True)
class Failure:
    """What went wrong, for a person: `kind` decides the exit code and the styling."""

    kind: FailureKind
    message: str

    @property
    def is_users(self) -> bool:
        return self.kind != "internal"


def is_interrupt(error: BaseException) -> bool:
    """Ctrl-C or SIGTERM, also when a library wrapped it (diffusers' lazy imports turn a
    KeyboardInterrupt raised inside them into "RuntimeError: Failed to import ...")."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, KeyboardInterrupt):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


def _is_out_of_memory(error: BaseException) -> bool:
    # torch.OutOfMemoryError (CUDA, MPS) without importing torch here.
    return type(error).__name__ == "OutOfMemoryError" or "out of memory" in str(error).lower()


def describe_failure(error: BaseException) -> Failure:
    """Classify an exception raised by a run or a check (never KeyboardInterrupt: that is the caller's)."""
    if isinstance(error, RunCancelled):
        return Failure("cancelled", "Cancelled: the run stopped between two steps; nothing of it was kept.")
    if isinstance(error, USER_ERRORS):
        return Failure("user", str(error))
    if isinstance(error, OSError) and error.errno in PATH_ERRNOS:
        where = f" {str(error.filename)[:200]!r}" if error.filename else ""
        return Failure("user", f"path{where} cannot be used: {error.strerror or error}; check the path.")
    if isinstance(error, OSError) and error.errno == errno.EIO:
        where = f" {str(error.filename)[:200]!r}" if error.filename else " a file"
        return Failure(
            "user",
            f"the system could not read or write{where} (input/output error): a failing disk, a network share that "
            "went away, or a special file such as /proc/…; check the paths given.",
        )
    if isinstance(error, OSError) and error.errno in STORAGE_ERRNOS:
        where = f" {error.filename}" if error.filename else ""
        reason = error.strerror or str(error)
        return Failure(
            "storage",
            f"could not write{where}: {reason}. Nothing of this run was kept; free some space or pick another "
            "output folder.",
        )
    if _is_out_of_memory(error):
        return Failure(
            "memory",
            "the device ran out of memory. Lower memory use with --offload model (or group), --quantize int8|nf4|fp8 "
            "(or a GGUF --model), --dtype bfloat16, a smaller --size, fewer images per prompt, or --preview latent; "
            "README \"On a small GPU\" has the flags for 12, 16 and 24 GB.",
        )
    return Failure("internal", f"{type(error).__name__}: {error}")
