"""Files written whole or not at all, and file hashes.

Every output FreeFuse writes goes through `atomic_write`: the bytes land in a temporary file in the
same folder, are flushed to disk, and only then renamed over the target, so a crash, Ctrl-C or
kill leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import io
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from .core import jsontext, storage
from .errors import InputFileError, OutputExistsError, OutputFolderError


def check_free(paths: list[Path], overwrite: bool) -> None:
    """Raise OutputExistsError, before any work, when an output is already there (unless `overwrite`)."""
    if overwrite:
        return
    taken = [str(path) for path in paths if Path(path).exists()]
    if taken:
        more = f" (and {len(taken) - 1} more)" if len(taken) > 1 else ""
        raise OutputExistsError(
            f"{taken[0]} already exists{more}; pass --overwrite (overwrite=True) to replace it."
        )


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "wb", overwrite: bool = True) -> Iterator[IO]:
    """Open a temporary file next to `path`; on success it replaces `path`, on error it is removed."""
    path = Path(path)
    if not overwrite and path.exists():
        raise OutputExistsError(f"{path} already exists; pass --overwrite (overwrite=True) to replace it.")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, storage.FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_all(files: dict[Path, bytes], overwrite: bool = False) -> list[Path]:
    """Write several files as one unit (`core.storage.write_all`): on any error nothing new is left.
    Existing files are replaced only with `overwrite`; otherwise `OutputExistsError` before any write."""
    if not overwrite:
        check_free([Path(path) for path in files], overwrite=False)
    return storage.write_all(files)


def remove_stale_parts(folder: Path, stem: str) -> None:
    """Temporary files a killed run left for the outputs named `<stem>.*` (`.<name>.<random>.part`)."""
    for stale in Path(folder).glob(f".{glob.escape(stem)}.*.part"):
        with contextlib.suppress(OSError):
            stale.unlink()


def check_output_folder(folder: Path) -> None:
    """The output folder can be written (made if missing), checked before any model loads."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"--out {folder} is a file, not a folder; give a folder for the outputs.")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise OutputFolderError(
            f"--out {folder} cannot be written ({error.strerror or error}); pick a folder you can write to."
        ) from None


def atomic_write(path: str | Path, data: bytes | str, overwrite: bool = True) -> Path:
    """Write `data` to `path` atomically; return the path."""
    mode = "w" if isinstance(data, str) else "wb"
    with atomic_open(path, mode, overwrite=overwrite) as handle:
        handle.write(data)
    return Path(path)


def atomic_save(path: str | Path, save: Callable[[IO[bytes]], None], overwrite: bool = True) -> Path:
    """Run `save(buffer)` into memory, then write the bytes atomically (for PIL, safetensors...)."""
    buffer = io.BytesIO()
    save(buffer)
    return atomic_write(path, buffer.getvalue(), overwrite=overwrite)


def write_json(path: str | Path, value, overwrite: bool = True) -> Path:
    return atomic_write(
        path, json.dumps(value, indent=2, sort_keys=False, default=str) + "\n", overwrite=overwrite
    )


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """SHA-256 of what the file holds now. (A Hugging Face cache names its blobs by their hash, but
    a blob can be changed after download: the name is not trusted.) Big model files are hashed
    once per size and mtime by `manifest.cached_sha256`."""
    target = Path(path).resolve()
    digest = hashlib.sha256()
    with open(target, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_input(path: str | Path, what: str) -> bytes:
    """The bytes of a file the user named (`what`: "Job file", "Manifest", ...). A file that exists
    but that the system cannot read (an I/O error, /proc/self/mem) is an `InputFileError` naming it."""
    try:
        return Path(path).read_bytes()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise
    except OSError as error:
        raise InputFileError(
            f"{what} {path} cannot be read ({error.strerror or error}); check the file (and the disk it is on)."
        ) from None


def _cache_path() -> Path:
    root = os.environ.get("FREEFUSE_CACHE") or Path.home() / ".cache" / "freefuse"
    return Path(root) / "hashes.json"


def cached_sha256(path: Path) -> str:
    """SHA-256 of a file, remembered by (size, mtime) so that big model files are read once."""
    path = path.resolve()
    stat = path.stat()
    cache_file = _cache_path()
    try:
        cache = jsontext.loads(cache_file.read_text()) if cache_file.is_file() else {}
    except (OSError, ValueError):
        cache = {}
    cache = cache if isinstance(cache, dict) else {}
    entry = cache.get(str(path))
    if (
        isinstance(entry, dict)
        and entry.get("size") == stat.st_size
        and entry.get("mtime_ns") == stat.st_mtime_ns
    ):
        return str(entry["sha256"])
    digest = sha256_file(path)
    cache[str(path)] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest}
    with contextlib.suppress(OSError):  # a read-only home only costs re-hashing next time
        write_json(cache_file, cache)
    return digest


def relative_to(path: str | Path, folder: Path) -> str:
    """`path` as seen from `folder` (what a manifest in `folder` records, so a folder moved whole replays)."""
    return os.path.relpath(Path(path).expanduser().resolve(), folder.resolve())


# -- model sources ---------------------------------------------------------------------------------------

_HUB_ID = re.compile(r"^[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+$")
#: Suffixes that make a name a file, never a hub id (weights, configs).
MODEL_FILE_SUFFIXES = (".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin", ".gguf", ".json", ".yaml", ".yml")


def is_hub_id(model: str) -> bool:
    """`owner/name` that is not a local path, nor clearly meant as one: not `./x` or `../x`, not a
    file name (`models/flux.safetensors`), and not in a local folder that exists (`here/flux` when
    `here/` is a folder). A local path that does not exist is then said to be missing, not looked
    up on the Hub."""
    if not _HUB_ID.match(model) or model.split("/")[0] in (".", ".."):
        return False
    if model.lower().endswith(MODEL_FILE_SUFFIXES):
        return False
    path = Path(model).expanduser()
    try:
        return not path.exists() and not path.parent.is_dir()
    except OSError:  # a name the file system refuses is no local path
        return True
