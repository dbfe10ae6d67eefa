"""JSON from files FreeFuse does not trust (job files, manifests, mask indexes, model configs, LoRA
metadata), read without Python's recursion limit turning deep nesting into a crash.

`json.loads` recurses once per level: a few kB of `[[[[…` raise `RecursionError` (not a
`ValueError`), and a structure just under the limit makes later recursive code (validation,
copies, printing) fail instead. `loads` turns both into a `NestingError` (a `ValueError`, as
`json.JSONDecodeError` is), so that every caller's `except ValueError` reports it with the file's
name. Standard library only.
"""

from __future__ import annotations

import json

#: Deeper than any file FreeFuse reads or writes (a manifest nests 5 levels), far below the
#: interpreter's recursion limit.
MAX_DEPTH = 64


class NestingError(ValueError):
    """JSON (or YAML) nested deeper than `MAX_DEPTH` levels."""


class DuplicateKeyError(ValueError):
    """A JSON object that gives one key twice (`loads(..., unique_keys=True)`); `key` is the key."""

    def __init__(self, key: str) -> None:
        super().__init__(f"the key {key[:80]!r} is given twice")
        self.key = key


def _unique(pairs: list[tuple[str, object]]) -> dict:
    result: dict = {}
    for key, value in pairs:
        if key in result:
            raise DuplicateKeyError(key)
        result[key] = value
    return result


def check_depth(value, max_depth: int = MAX_DEPTH) -> None:
    """Raise `NestingError` when lists and mappings in `value` nest deeper than `max_depth` (no recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list | tuple):
            children = item
        else:
            continue
        if depth > max_depth:
            raise NestingError(f"nested more than {max_depth} levels deep")
        stack.extend((child, depth + 1) for child in children)


def loads(text: str | bytes, max_depth: int = MAX_DEPTH, unique_keys: bool = False):
    """`json.loads(text)` that raises `ValueError`s only: `JSONDecodeError`, `UnicodeDecodeError`,
    `NestingError` past `max_depth` levels, and with `unique_keys` a `DuplicateKeyError` for an
    object that gives a key twice (plain JSON keeps the last one silently)."""
    try:
        value = json.loads(text, object_pairs_hook=_unique if unique_keys else None)
    except RecursionError:
        raise NestingError(f"nested more than {max_depth} levels deep") from None
    check_depth(value, max_depth)
    return value
