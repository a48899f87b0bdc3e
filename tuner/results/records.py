"""The run folder: its append-only measurement log, its CSV, and its metadata files.

    RUN_DIR/
      run.json             run id, sweep file name and hash, device kind, shard
      sweep.yaml           the sweep file as it was run (what --resume reads)
      environment.json     device, versions, measured read bandwidth
      measurements.jsonl   one JSON record per finished measurement, appended and fsynced
      measurements.csv     the same records as a table, with derived columns
      table.json           the run's winners, in the tuned-table format

Every record is written as one line and fsynced before the next config starts, so a
``kill -9`` loses at most the measurement in flight; a half-written last line is cut off
when the log is opened again.

A sweep over devices of several kinds (a mixed Ray cluster) makes one such run folder per
kind under one parent, which `--resume` takes as a whole:

    RUN/
      kinds.json           sweep file name and hash, shard; each kind's folder and whether
                           it is finished (its table written, its winners installed)
      <kind>/              a run folder as above, for that kind's devices only
"""

from __future__ import annotations

import csv
import json
import os
import tempfile
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

RUN_FILE = "run.json"
SWEEP_COPY = "sweep.yaml"
ENVIRONMENT_FILE = "environment.json"
LOG_FILE = "measurements.jsonl"
CSV_FILE = "measurements.csv"
TABLE_FILE = "table.json"
KINDS_FILE = "kinds.json"  # in the parent folder of a sweep over several device kinds

STATUSES = ("ok", "wrong", "compile_error", "error", "timeout", "crashed", "skipped",
            "skipped_static")

# CSV columns before the tunables (one column each) and the derived figures.
_LEADING_COLUMNS = (
    "run_id", "device_kind", "op", "problem_id", "problem", "model", "batch", "num_seqs",
    "num_tokens", "max_len", "page_size", "prefill_fraction", "prefill_chunk", "lengths",
    "min_len", "q_heads", "kv_heads", "head_dim", "dtype", "features", "variant", "config",
    "is_default", "round", "repeats", "status", "reason", "max_abs_error", "relative_error",
    "compile_s", "median_us", "p20_us", "p80_us", "samples", "bytes_moved", "floor_us",
    "timer", "cache", "timer_note", "wall_median_us", "peer", "input_conversion",
)
_DERIVED_COLUMNS = ("fraction_of_floor", "speedup_vs_default", "speedup_vs_reference", "id")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def temporary_files_of(path: Path) -> list[Path]:
    """The temporary files :func:`write_json_atomic` makes beside `path` (left behind when a
    writer is killed mid-write)."""
    path = Path(path)
    return sorted(path.parent.glob(f".{path.name}.*.tmp"))


def write_json_atomic(path: Path, data: Any) -> None:
    """Writes JSON so that a reader sees the old file or the new one, never half of one.

    The file gets the mode an ordinary write would (0666 less the umask), not the 0600 of a
    private temporary file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(handle, 0o666 & ~_umask())
        with os.fdopen(handle, "w") as file:
            json.dump(data, file, indent=2, sort_keys=False, default=str)
            file.write("\n")
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


class MeasurementLog:
    """The append-only JSON-lines file of one run folder."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.repaired_bytes = self._repair()
        self._file = open(self.path, "a", encoding="utf-8")

    def _repair(self) -> int:
        """Cuts a half-written last line (the process died mid-write); returns bytes cut."""
        if not self.path.exists():
            return 0
        with open(self.path, "rb+") as file:
            data = file.read()
            if not data or data.endswith(b"\n"):
                return 0
            keep = data.rfind(b"\n") + 1
            file.truncate(keep)
            file.flush()
            os.fsync(file.fileno())
            return len(data) - keep

    def append(self, record: dict[str, Any], sync: bool = True) -> None:
        """Appends one record as one line; durable before returning unless `sync` is False
        (then call :meth:`sync` after a batch)."""
        self._file.write(json.dumps(record, default=str, separators=(",", ":")) + "\n")
        if sync:
            self.sync()

    def sync(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


# What every reader of a record relies on (resume keys on it); a line without it is not a
# measurement. Other fields are read with defaults.
_REQUIRED_FIELDS = {"id": str}


def _record_problem(record: Any) -> str | None:
    if not isinstance(record, dict):
        return f"a JSON {type(record).__name__}, not an object"
    for field, kind in _REQUIRED_FIELDS.items():
        if not isinstance(record.get(field), kind):
            return f"no {kind.__name__} field {field!r}"
    return None


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of a log, each id once (the first written wins).

    A half-written line (only ever the last, after a crash) is skipped quietly; any other
    line that is not a record is skipped with a warning naming it. A second record of an
    id (two processes that measured the same thing) is merged away, never counted twice.
    """
    records: dict[str, dict[str, Any]] = {}
    path = Path(path)
    if not path.exists():
        return []
    with open(path, encoding="utf-8", errors="replace") as file:
        lines = file.readlines()
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line:
            continue
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):  # ValueError: JSON syntax, or huge integers
            if number < len(lines):
                warnings.warn(f"{path}:{number}: not a JSON line; skipped", stacklevel=2)
            continue
        problem = _record_problem(record)
        if problem is not None:
            warnings.warn(f"{path}:{number}: not a measurement record ({problem}); skipped",
                          stacklevel=2)
            continue
        records.setdefault(record["id"], record)
    return list(records.values())


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def derived_figures(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each record with fraction_of_floor (median / floor: 1.0 is at the memory floor) and
    speedups over its variant's default config and over the reference, both measured on the
    same problem in the same round."""
    baselines = baseline_times(records)
    rows = []
    for record in records:
        row = dict(record)
        median = record.get("median_us") if record.get("status") == "ok" else None
        row["fraction_of_floor"] = _ratio(median, record.get("floor_us"))
        row["speedup_vs_default"] = _ratio(
            baseline(baselines, record, record["variant"]), median)
        row["speedup_vs_reference"] = _ratio(baseline(baselines, record, "reference"), median)
        rows.append(row)
    return rows


def baseline_times(records: list[dict[str, Any]]) -> dict[tuple, float]:
    """Median times of each problem's defaults and reference, per round and latest overall."""
    baselines: dict[tuple, float] = {}
    for record in sorted(records, key=lambda r: r.get("round", 0)):
        if record.get("status") == "ok" and record.get("is_default"):
            for where in ((record["problem_id"], record.get("round", 0)), (record["problem_id"],)):
                baselines[where + (record["variant"],)] = record["median_us"]
    return baselines


def baseline(baselines: dict[tuple, float], record: dict[str, Any], variant: str) -> float | None:
    """`variant`'s default time on the record's problem: same round if timed there, else the
    latest round it was timed in (the reference is only timed longer if it earns it)."""
    same_round = (record.get("problem_id"), record.get("round", 0), variant)
    return baselines.get(same_round, baselines.get((record.get("problem_id"), variant)))


def write_csv(records: Iterable[dict[str, Any]], path: Path) -> None:
    """The measurements as a CSV: fixed columns, one column per tunable, derived figures."""
    rows = derived_figures(list(records))
    tunables = sorted({name for row in rows for name in (row.get("config") or {})})
    tunable_columns = [name if name not in _LEADING_COLUMNS + _DERIVED_COLUMNS
                       else f"config_{name}" for name in tunables]
    columns = list(_LEADING_COLUMNS) + tunable_columns + list(_DERIVED_COLUMNS)
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            out = {column: row.get(column) for column in columns}
            config = row.get("config") or {}
            out["config"] = json.dumps(config, sort_keys=True)
            for name, column in zip(tunables, tunable_columns):
                out[column] = config.get(name)
            out["features"] = "+".join(row.get("features") or []) or "none"
            writer.writerow(out)
    os.replace(temporary, path)
