"""Reading the files users hand us (tuned tables, sweep files) with bounded cost.

A table or sweep file is small; anything else is a mistake or an attack, and must be refused
in bounded time and memory: only regular files (a FIFO would block forever), a size cap,
a nesting cap, a cap on integer digits (Python's int parser is quadratic in them), and a cap
on the size of the data after YAML aliases are expanded (a few hundred bytes of aliases can
stand for billions of nodes).
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

MAX_FILE_BYTES = 4 << 20
MAX_DEPTH = 32
MAX_INT_DIGITS = 24
MAX_EXPANDED_NODES = 200_000


class FileLimitError(ValueError):
    """A file refused before or while parsing it; the message says why, not where."""


def read_text(path: str | Path, max_bytes: int = MAX_FILE_BYTES) -> str:
    """The text of a regular file of at most `max_bytes`, as UTF-8."""
    try:
        # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer.
        handle = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as error:
        raise FileLimitError(f"cannot be read ({error.strerror})") from None
    try:
        info = os.fstat(handle)
        if not stat.S_ISREG(info.st_mode):
            kind = "a folder" if stat.S_ISDIR(info.st_mode) else "not a regular file"
            raise FileLimitError(f"is {kind}")
        if info.st_size > max_bytes:
            raise FileLimitError(f"is {info.st_size} bytes, more than the {max_bytes} allowed")
        data = os.read(handle, max_bytes + 1)
    except OSError as error:
        raise FileLimitError(f"cannot be read ({error.strerror})") from None
    finally:
        os.close(handle)
    if len(data) > max_bytes:
        raise FileLimitError(f"is more than the {max_bytes} bytes allowed")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise FileLimitError("is not UTF-8 text (a binary file?)") from None


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise FileLimitError(f"holds an integer of {len(text.lstrip('-'))} digits "
                             f"(at most {MAX_INT_DIGITS})")
    return int(text)


def parse_json(text: str) -> Any:
    """JSON with the caps above; FileLimitError (or json.JSONDecodeError) otherwise."""
    try:
        data = json.loads(text, parse_int=_parse_int)
    except RecursionError:
        raise FileLimitError(f"is nested more than {MAX_DEPTH} levels deep") from None
    check_shape(data)
    return data


def check_shape(data: Any, max_depth: int = MAX_DEPTH,
                max_nodes: int = MAX_EXPANDED_NODES) -> None:
    """Refuses data nested deeper than `max_depth` or with more than `max_nodes` nodes once
    shared parts (YAML aliases) are counted every time they appear. Bounded time: each
    distinct container is visited once."""
    sizes: dict[int, int] = {}  # id(container) -> expanded node count
    depth_of: dict[int, int] = {}

    def children(node):
        return list(node.keys()) + list(node.values()) if isinstance(node, dict) else node

    # Iterative post-order over distinct containers (recursion could itself overflow).
    stack: list[tuple[Any, int, bool]] = [(data, 1, False)]
    while stack:
        node, depth, expanded = stack.pop()
        if not isinstance(node, (dict, list)):
            continue
        if depth > max_depth:
            raise FileLimitError(f"is nested more than {max_depth} levels deep")
        if id(node) in sizes:
            continue
        if not expanded:
            if depth_of.get(id(node), 0) >= depth:
                continue
            depth_of[id(node)] = depth
            stack.append((node, depth, True))
            stack.extend((child, depth + 1, False) for child in children(node))
            continue
        total = 1 + sum(sizes.get(id(child), 1) for child in children(node))
        if total > max_nodes:
            raise FileLimitError(f"expands to more than {max_nodes} values (YAML aliases?)")
        sizes[id(node)] = total
