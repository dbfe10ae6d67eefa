"""Writing several files as one unit, all or nothing (standard library only).

Every file goes to a flushed temporary name beside its target first, then all are renamed in the
order given (put the file that marks completion, a manifest or a mask index, last). On any error
nothing new is left: the temporary files are removed, and so are the files already put in place.
`freefuse.files` builds the run outputs on it; `MaskSet.save` uses it directly.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp makes files readable by their owner only; finished files get the usual permissions.
FILE_MODE = 0o666 & ~_current_umask()


def _temporary(path: Path, data: bytes) -> Path:
    """`data` in a flushed temporary file beside `path` (same file system, so a rename is atomic)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, FILE_MODE)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return Path(tmp)


def write_all(files: dict[Path, bytes]) -> list[Path]:
    """Write `files` (path → bytes) as one unit, replacing what is there; return their paths."""
    paths = [Path(path) for path in files]
    temporaries: list[tuple[Path, Path]] = []
    placed: list[Path] = []
    try:
        for path, data in zip(paths, files.values(), strict=True):
            path.parent.mkdir(parents=True, exist_ok=True)
            temporaries.append((_temporary(path, data), path))
        for tmp, path in temporaries:
            existed = path.exists()
            os.replace(tmp, path)
            if not existed:
                placed.append(path)
    except BaseException:
        for tmp, _ in temporaries:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        for path in placed:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        raise
    return paths
