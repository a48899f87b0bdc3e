"""Writing tuned tables: a run's own table, and installing winners into the user's table.

Installing merges by key (a new entry replaces the one with the same key, other keys stay),
under a file lock so two sweeps finishing at once cannot lose each other's entries, and
writes atomically so an operator reading the table never sees half of it.
"""

from __future__ import annotations

import datetime
import warnings
from pathlib import Path
from typing import Any

from filelock import FileLock

from attnbench.kernels.lookup import user_tuned_dir
from attnbench.kernels.table import Entry, Table, TableError, read_table

from .records import temporary_files_of, write_json_atomic
from ..canonical_json import canonical

_RUNS_KEPT = 50


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def run_table(entries: list[Entry], meta: dict[str, Any]) -> Table:
    return Table(path="", meta=meta, entries=tuple(entries))


def write_table(path: Path, table: Table) -> None:
    write_json_atomic(path, table.to_json())


def merge_entries(old: tuple[Entry, ...], new: list[Entry]) -> list[Entry]:
    """`old` with every entry whose key appears in `new` replaced; new keys added."""
    replaced = {canonical(e.key) for e in new}
    kept = [e for e in old if canonical(e.key) not in replaced]
    return sorted(kept + list(new), key=lambda e: canonical(e.key))


def install(entries: list[Entry], device_kind: str, provenance: dict[str, Any],
            directory: Path | None = None) -> Path:
    """Merges `entries` into <directory or user_tuned_dir()>/<device_kind>.json; returns it."""
    directory = Path(directory) if directory is not None else user_tuned_dir()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{device_kind}.json"
    with FileLock(str(path) + ".lock", timeout=120):
        # Holding the lock, no other install is writing: temporary files here are leftovers
        # of an install that was killed mid-write.
        for leftover in temporary_files_of(path):
            leftover.unlink(missing_ok=True)
        old_entries: tuple[Entry, ...] = ()
        meta: dict[str, Any] = {"device_kind": device_kind}
        if path.exists():
            try:
                existing = read_table(path)
                old_entries, meta = existing.entries, dict(existing.meta)
            except TableError as error:
                backup = path.with_suffix(".json.broken")
                path.replace(backup)
                warnings.warn(f"attnbench: {error}; moved it to {backup} and started a new table",
                              stacklevel=2)
        runs = list(meta.get("runs", []))
        runs.append({**provenance, "installed": _now(), "entries": len(entries)})
        meta.update(device_kind=device_kind, updated=_now(), runs=runs[-_RUNS_KEPT:])
        table = Table(path=str(path), meta=meta, entries=tuple(merge_entries(old_entries, entries)))
        write_json_atomic(path, table.to_json())
    return path
