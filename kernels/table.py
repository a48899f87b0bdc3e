"""Tuned tables: the JSON file format, its keys, and its schema (pydantic).

A table is ``{"schema_version": 1, "meta": {...}, "entries": [...]}``. Each entry says: for
this key (device kind, op, dtype, head counts, head dim, the op's own fields such as page
size, features and bucketed sizes), use this variant with this config; it measured this
time in that sweep run.

Keys are bucketed so that one tuned shape serves its neighbours: the op's size axes (batch
or token count, longest context) are rounded up to a power of two, and lookup picks the
nearest bucket by log2 distance.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from . import limited_files
from .inputs import FEATURES, SUPPORTED_DTYPES
from .schema import located_problems
from .tunables import next_power_of_two

SCHEMA_VERSION = 1

# Fields of a key that must match exactly; each op's size axes are matched by nearest bucket.
DISCRETE_FIELDS = ("device_kind", "op", "dtype", "q_heads", "kv_heads", "head_dim",
                   "page_size", "features")


def _operator(name: str):
    from .registry import get_operator  # the registry imports every operator package

    return get_operator(name)


def bucket(size: int) -> int:
    """The power of two at or above `size` (1 for sizes below 1)."""
    return next_power_of_two(size)


def make_key(shape: Any, device_kind: str) -> dict[str, Any]:
    """The table key of a call: discrete fields plus the op's bucketed size axes."""
    operator = _operator(shape.op)
    key: dict[str, Any] = {
        "device_kind": device_kind,
        "op": shape.op,
        "dtype": shape.dtype,
        "q_heads": shape.q_heads,
        "kv_heads": shape.kv_heads,
        "head_dim": shape.head_dim,
        **operator.key_fields(shape),
        "features": sorted(shape.features),
    }
    key.update({axis: bucket(size) for axis, size in operator.key_sizes(shape).items()})
    return key


def key_text(key: dict[str, Any]) -> str:
    """A short human-readable form of a key, for warnings and reports."""
    features = "+".join(key["features"]) or "none"
    sizes = " ".join(f"{axis}={key[axis]}" for axis in _operator(key["op"]).size_axes)
    page = f" page_size={key['page_size']}" if key.get("page_size") is not None else ""
    shared = set(DISCRETE_FIELDS) | set(_operator(key["op"]).size_axes)
    own = "".join(f" {field}={value}" for field, value in key.items() if field not in shared)
    return (f"{key['device_kind']}/{key['op']} {key['dtype']} Hq={key['q_heads']} "
            f"Hkv={key['kv_heads']} D={key['head_dim']}{page}{own} features={features} {sizes}")


def key_distance(wanted: dict[str, Any], candidate: dict[str, Any]) -> float | None:
    """log2 distance over the size axes, or None if a discrete field differs."""
    size_axes = _operator(wanted["op"]).size_axes
    # The shared discrete fields and every field an op adds (key_fields) match exactly.
    for field in set(DISCRETE_FIELDS) | (set(wanted) | set(candidate)) - set(size_axes):
        if wanted.get(field) != candidate.get(field):
            return None
    return sum(abs(math.log2(wanted[axis]) - math.log2(candidate[axis]))
               for axis in size_axes)


# Fields a nearest entry may differ in: the heads. Everything else that shapes the kernel's
# work must match: dtype, head dim, features, an op's own fields, and the page size (paged
# configs count their blocks in pages, so another page size is another block size).
NEAREST_FIELDS = ("q_heads", "kv_heads")


def group_size(key: dict[str, Any]) -> float:
    """Query heads per KV head of a key."""
    return key["q_heads"] / key["kv_heads"]


def _log2_distance(a: float, b: float) -> float:
    return abs(math.log2(a) - math.log2(b))


def nearest_distance(wanted: dict[str, Any],
                     candidate: dict[str, Any]) -> tuple[float, float, float] | None:
    """How far an entry tuned for other heads is from a call, as (group size, KV heads, size
    buckets), each a log2 distance, compared in that order; None when any other discrete
    field differs.

    The group size decides how a kernel lays out its query heads per KV row, so it ranks
    first; the KV head count scales the work items a kernel spreads over the cores.
    """
    size_axes = _operator(wanted["op"]).size_axes
    for field in set(DISCRETE_FIELDS) | (set(wanted) | set(candidate)) - set(size_axes):
        if field not in NEAREST_FIELDS and wanted.get(field) != candidate.get(field):
            return None
    sizes = sum(_log2_distance(wanted[axis], candidate[axis]) for axis in size_axes)
    return (_log2_distance(group_size(wanted), group_size(candidate)),
            _log2_distance(wanted["kv_heads"], candidate["kv_heads"]), sizes)


# ---- The schema ---------------------------------------------------------------------------


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


class KeySchema(BaseModel):
    """A table key; the op's own fields and size axes are checked by its operator object."""

    model_config = ConfigDict(extra="allow")

    device_kind: str
    op: str
    dtype: str
    q_heads: Any
    kv_heads: Any
    head_dim: Any
    page_size: Any = None
    features: Any

    @field_validator("device_kind")
    @classmethod
    def _device_kind(cls, value: str) -> str:
        if not value:
            raise ValueError("must be a non-empty string")
        return value

    @field_validator("op")
    @classmethod
    def _op(cls, value: str) -> str:
        from .registry import OPERATOR_NAMES

        if value not in OPERATOR_NAMES:
            raise ValueError(f"must be one of {list(OPERATOR_NAMES)}, got {value!r}")
        return value

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, value: str) -> str:
        if value not in SUPPORTED_DTYPES:
            raise ValueError(f"must be one of {list(SUPPORTED_DTYPES)}, got {value!r}")
        return value

    @field_validator("q_heads", "kv_heads", "head_dim")
    @classmethod
    def _positive(cls, value: Any) -> int:
        if not _positive_int(value):
            raise ValueError(f"must be a positive int, got {value!r}")
        return value

    @field_validator("features")
    @classmethod
    def _features(cls, value: Any) -> list[str]:
        if (not isinstance(value, list) or not all(isinstance(f, str) for f in value)
                or not set(value) <= set(FEATURES) or value != sorted(value)):
            raise ValueError(f"must be a sorted list drawn from {list(FEATURES)}, got {value!r}")
        return value


class EntrySchema(BaseModel):
    model_config = ConfigDict(extra="allow")

    op: str
    variant: str
    key: dict[str, Any]
    config: dict[str, Any]
    time_us: float | None = None
    source: dict[str, Any] = {}

    @field_validator("time_us", mode="before")
    @classmethod
    def _time(cls, value: Any) -> Any:
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not value >= 0):
            raise ValueError("must be a number >= 0 or null")
        return value


class TableSchema(BaseModel):
    schema_version: int
    meta: dict[str, Any]
    entries: list[dict[str, Any]]

    @field_validator("schema_version", mode="before")
    @classmethod
    def _version(cls, value: Any) -> int:
        if value != SCHEMA_VERSION or isinstance(value, bool):
            raise ValueError(f"must be {SCHEMA_VERSION}, got {value!r}")
        return value


def _key_problems(key: dict[str, Any], where: str) -> list[str]:
    from .registry import OPERATOR_NAMES

    problems = []
    try:
        KeySchema.model_validate(key)
    except ValidationError as error:
        problems += located_problems(error, (where,))
    if key.get("op") not in OPERATOR_NAMES:
        return problems
    operator = _operator(key["op"])
    problems += operator.key_field_problems(key, where)
    for axis in operator.size_axes:
        value = key.get(axis)
        if not _positive_int(value) or value & (value - 1):
            problems.append(f"{where}.{axis}: must be a power of two, got {value!r}")
    return problems


def _top_problems(data: Any) -> list[str]:
    """Problems that make the whole table unusable (not those of one entry)."""
    if not isinstance(data, dict):
        return ["(top level): must be an object with schema_version, meta and entries"]
    try:
        TableSchema.model_validate(data)
    except ValidationError as error:
        return located_problems(error)
    return []


def entry_problems(entry: Any, where: str) -> list[str]:
    """Why one entry cannot be used on any shape: its schema, its key, its variant (known,
    of the entry's op) and its config (names and rules of that variant's tunables). What
    is left depends on the call's shape and is checked at lookup."""
    try:
        checked = EntrySchema.model_validate(entry)
    except ValidationError as error:
        return located_problems(error, (where,))
    problems = _key_problems(checked.key, f"{where}.key")
    if problems:
        return problems
    if checked.key["op"] != checked.op:
        return [f"{where}.key.op: must equal {where}.op"]
    from .registry import get_variant

    try:
        variant = get_variant(checked.op, checked.variant)
    except ValueError as error:
        return [f"{where}.{error}"]
    try:
        variant.config_class.from_mapping(checked.config)
    except (ValueError, TypeError) as error:
        return [f"{where}.config: {str(error).removeprefix('config: ')}"]
    return []


def table_problems(data: Any) -> list[str]:
    """Every schema problem of a parsed table, each prefixed with its location."""
    problems = _top_problems(data)
    if problems:
        return problems
    for index, entry in enumerate(data["entries"]):
        problems += entry_problems(entry, f"entries[{index}]")
    return problems


# ---- Tables in memory ---------------------------------------------------------------------


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
    # Where each entry stands in the file (skipped entries leave gaps), for messages.
    file_indices: tuple[int, ...] = ()

    def file_index(self, position: int) -> int:
        return self.file_indices[position] if self.file_indices else position

    def to_json(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "meta": self.meta,
            "entries": [entry.to_json() for entry in self.entries],
        }


class TableError(ValueError):
    """A table file that cannot be used; the message names the file and the problem."""


def table_from_json(data: Any, path: str = "") -> Table:
    """A Table of the usable entries; each unusable one is skipped with a warning naming the
    file and the entry (one bad entry must not cost the others). A TableError if the table
    as a whole is unusable."""
    problems = _top_problems(data)
    if problems:
        shown = "; ".join(problems[:5]) + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else "")
        raise TableError(f"{path or 'table'}: {shown}")
    entries, indices = [], []
    for index, e in enumerate(data["entries"]):
        problems = entry_problems(e, f"entries[{index}]")
        if problems:
            warnings.warn(f"attnbench: {path or 'table'}: skipping {'; '.join(problems[:3])}",
                          stacklevel=2)
            continue
        indices.append(index)
        entries.append(Entry(op=e["op"], variant=e["variant"], key=e["key"], config=e["config"],
                             time_us=e.get("time_us"), source=e.get("source", {})))
    return Table(path=path, meta=data["meta"], entries=tuple(entries),
                 file_indices=tuple(indices))


def read_table(path: str | Path) -> Table:
    """Reads and checks a table file; a TableError names the file and what is wrong."""
    path = Path(path)
    try:
        data = limited_files.parse_json(limited_files.read_text(path))
    except limited_files.FileLimitError as error:
        raise TableError(f"{path}: {error}") from None
    except json.JSONDecodeError as error:
        raise TableError(f"{path}: is not valid JSON ({error})") from None
    return table_from_json(data, str(path))
