"""Tuned tables: the JSON file format, its keys, and schema checking.

A table is ``{"schema_version": 1, "meta": {...}, "entries": [...]}``. Each entry says: for
this key (device kind, op, dtype, head counts, head dim, page size, features and bucketed
sizes), use this variant with this config; it measured this time in that sweep run.

Keys are bucketed so that one tuned shape serves its neighbours: the size axes (batch or
token count, longest context) are rounded up to a power of two, and lookup picks the
nearest bucket by log2 distance.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from .inputs import FEATURES, SUPPORTED_DTYPES, DecodeShape, PagedShape
from .tunables import next_power_of_two

SCHEMA_VERSION = 1

# Fields of a key that must match exactly, and the size axes matched by nearest bucket.
DISCRETE_FIELDS = ("device_kind", "op", "dtype", "q_heads", "kv_heads", "head_dim",
                   "page_size", "features")
SIZE_AXES = {"decode": ("batch", "max_len"), "paged": ("tokens", "max_len")}


def bucket(size: int) -> int:
    """The power of two at or above `size` (1 for sizes below 1)."""
    return next_power_of_two(size)


def make_key(shape: DecodeShape | PagedShape, device_kind: str) -> dict[str, Any]:
    """The table key of a call: discrete fields plus bucketed size axes."""
    key: dict[str, Any] = {
        "device_kind": device_kind,
        "op": shape.op,
        "dtype": shape.dtype,
        "q_heads": shape.q_heads,
        "kv_heads": shape.kv_heads,
        "head_dim": shape.head_dim,
        "page_size": getattr(shape, "page_size", None),
        "features": sorted(shape.features),
    }
    if isinstance(shape, DecodeShape):
        key["batch"] = bucket(shape.batch)
    else:
        key["tokens"] = bucket(shape.num_tokens)
    key["max_len"] = bucket(shape.max_len)
    return key


def key_text(key: dict[str, Any]) -> str:
    """A short human-readable form of a key, for warnings and reports."""
    features = "+".join(key["features"]) or "none"
    sizes = " ".join(f"{axis}={key[axis]}" for axis in SIZE_AXES[key["op"]])
    page = f" page_size={key['page_size']}" if key.get("page_size") is not None else ""
    return (f"{key['device_kind']}/{key['op']} {key['dtype']} Hq={key['q_heads']} "
            f"Hkv={key['kv_heads']} D={key['head_dim']}{page} features={features} {sizes}")


def key_distance(wanted: dict[str, Any], candidate: dict[str, Any]) -> float | None:
    """log2 distance over the size axes, or None if a discrete field differs."""
    for field in DISCRETE_FIELDS:
        if wanted.get(field) != candidate.get(field):
            return None
    return sum(abs(math.log2(wanted[axis]) - math.log2(candidate[axis]))
               for axis in SIZE_AXES[wanted["op"]])


@dataclasses.dataclass(frozen=True)
class Entry:
    """One tuned choice. `source` says where it came from (run id, sweep file, hash)."""

    op: str
    variant: str
    key: dict[str, Any]
    config: dict[str, Any]
    time_us: float | None = None
    source: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Table:
    path: str  # where it was read from ("" for one built in memory)
    meta: dict[str, Any]
    entries: tuple[Entry, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "meta": self.meta,
            "entries": [entry.to_json() for entry in self.entries],
        }


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _key_problems(key: Any, where: str) -> list[str]:
    if not isinstance(key, dict):
        return [f"{where}: must be an object"]
    problems = []
    op = key.get("op")
    if op not in SIZE_AXES:
        problems.append(f"{where}.op: must be one of {list(SIZE_AXES)}, got {op!r}")
    if not isinstance(key.get("device_kind"), str) or not key.get("device_kind"):
        problems.append(f"{where}.device_kind: must be a non-empty string")
    if key.get("dtype") not in SUPPORTED_DTYPES:
        problems.append(f"{where}.dtype: must be one of {list(SUPPORTED_DTYPES)}, "
                        f"got {key.get('dtype')!r}")
    for field in ("q_heads", "kv_heads", "head_dim"):
        if not _positive_int(key.get(field)):
            problems.append(f"{where}.{field}: must be a positive int, got {key.get(field)!r}")
    page_size = key.get("page_size")
    if op == "paged" and not _positive_int(page_size):
        problems.append(f"{where}.page_size: must be a positive int for op paged, "
                        f"got {page_size!r}")
    if op == "decode" and page_size is not None:
        problems.append(f"{where}.page_size: must be null for op decode, got {page_size!r}")
    features = key.get("features")
    if not isinstance(features, list) or not set(features) <= set(FEATURES) or (
            features != sorted(features)):
        problems.append(f"{where}.features: must be a sorted list drawn from {list(FEATURES)}, "
                        f"got {features!r}")
    for axis in SIZE_AXES.get(op, ()):
        value = key.get(axis)
        if not _positive_int(value) or value & (value - 1):
            problems.append(f"{where}.{axis}: must be a power of two, got {value!r}")
    return problems


def table_problems(data: Any) -> list[str]:
    """Every schema problem of a parsed table, each prefixed with its location."""
    if not isinstance(data, dict):
        return ["(top level): must be an object with schema_version, meta and entries"]
    problems = []
    if data.get("schema_version") != SCHEMA_VERSION:
        problems.append(f"schema_version: must be {SCHEMA_VERSION}, "
                        f"got {data.get('schema_version')!r}")
    if not isinstance(data.get("meta"), dict):
        problems.append("meta: must be an object")
    entries = data.get("entries")
    if not isinstance(entries, list):
        return problems + ["entries: must be a list"]
    for index, entry in enumerate(entries):
        where = f"entries[{index}]"
        if not isinstance(entry, dict):
            problems.append(f"{where}: must be an object")
            continue
        if entry.get("op") not in SIZE_AXES:
            problems.append(f"{where}.op: must be one of {list(SIZE_AXES)}, got {entry.get('op')!r}")
        if not isinstance(entry.get("variant"), str):
            problems.append(f"{where}.variant: must be a string")
        if not isinstance(entry.get("config"), dict):
            problems.append(f"{where}.config: must be an object")
        problems += _key_problems(entry.get("key"), f"{where}.key")
        if isinstance(entry.get("key"), dict) and entry["key"].get("op") != entry.get("op"):
            problems.append(f"{where}.key.op: must equal {where}.op")
        time_us = entry.get("time_us")
        if time_us is not None and not (isinstance(time_us, (int, float)) and time_us >= 0):
            problems.append(f"{where}.time_us: must be a number >= 0 or null")
        if not isinstance(entry.get("source", {}), dict):
            problems.append(f"{where}.source: must be an object")
    return problems


class TableError(ValueError):
    """A table file that cannot be used; the message names the file and the problem."""


def table_from_json(data: Any, path: str = "") -> Table:
    problems = table_problems(data)
    if problems:
        shown = "; ".join(problems[:5]) + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else "")
        raise TableError(f"{path or 'table'}: {shown}")
    entries = tuple(
        Entry(op=e["op"], variant=e["variant"], key=e["key"], config=e["config"],
              time_us=e.get("time_us"), source=e.get("source", {}))
        for e in data["entries"]
    )
    return Table(path=path, meta=data["meta"], entries=entries)


def read_table(path: str | Path) -> Table:
    """Reads and checks a table file; a TableError names the file and what is wrong."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as error:
        raise TableError(f"{path}: cannot be read ({error})") from error
    except json.JSONDecodeError as error:
        raise TableError(f"{path}: is not valid JSON ({error})") from error
    return table_from_json(data, str(path))
