"""A run folder as the report reads it: its measurements as a DataFrame, and its metadata,
environment and winners.

Everything is read from the run's append-only log (measurements.jsonl), the same records
measurements.csv is written from, so a run still in progress can be reported on too; the
derived figures are computed by records.derived_figures, as for the CSV. Winners come from
selection.select_winners, as for the run's table.json.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from pathlib import Path
from typing import Any

import pandas as pd

from attnbench.kernels.table import Entry

from ..results import records as run_files
from ..canonical_json import canonical

DEFAULT_NOISE = 0.03

# The measured and derived figures. A config that failed has none of them: NaN there.
FIGURES = ("median_us", "p20_us", "p80_us", "relative_error", "max_abs_error", "compile_s",
           "bytes_moved", "floor_us", "fraction_of_floor", "speedup_vs_default",
           "speedup_vs_reference")


class ReportError(RuntimeError):
    """A run folder that cannot be reported on; the message says why and what to do."""


@dataclasses.dataclass
class Run:
    """One run folder as the report sees it."""

    path: Path
    meta: dict[str, Any]  # run.json
    environment: dict[str, Any]  # environment.json
    measurements: pd.DataFrame  # one row per log record, with the CSV's derived figures
    winners: list[Entry]
    noise: float
    unfinished: bool  # no table.json yet, or the log grew after it was written

    @property
    def run_id(self) -> str:
        return self.meta.get("run_id", self.path.name)

    @property
    def platform(self) -> str:
        return self.environment.get("platform", "cpu")

    @property
    def bandwidth(self) -> float | None:
        return self.environment.get("read_bandwidth_bytes_per_s")

    def winner_of(self, key: dict[str, Any]) -> Entry | None:
        return self._winners_by_key.get(canonical(key))

    @functools.cached_property
    def _winners_by_key(self) -> dict[str, Entry]:
        # Peers' best configs are entries too, but never a key's winner.
        return {canonical(entry.key): entry for entry in self.winners
                if "peer" not in entry.source}


def measurements_frame(records: list[dict[str, Any]]) -> pd.DataFrame:
    """The records as a DataFrame. The figures are floats; every other field keeps the type
    it was logged with, None where a record lacks it (inferred types would turn a size that
    one operator lacks, such as page_size, into a float: 16.0 in labels and file names)."""
    frame = pd.DataFrame(records, dtype=object)
    frame = frame.where(frame.notna(), None)
    for name in (*FIGURES, "round", "is_default", "config", "key"):
        if name not in frame:
            frame[name] = None
    for name in FIGURES:
        frame[name] = pd.to_numeric(frame[name]).astype(float)
    frame["round"] = pd.to_numeric(frame["round"]).fillna(0).astype(int)
    frame["is_default"] = frame["is_default"].eq(True)
    frame["config"] = [config or {} for config in frame["config"]]
    return frame


def record_of(row: pd.Series) -> dict[str, Any]:
    """A row as the record it was logged as: the fields it has no value for left out."""
    return {name: value for name, value in row.items() if not _missing(value)}


def records_of(frame: pd.DataFrame) -> list[dict[str, Any]]:
    return [record_of(row) for _, row in frame.iterrows()]


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _read_json_or_empty(path: Path) -> dict[str, Any]:
    try:
        return run_files.read_json(path)
    except (OSError, json.JSONDecodeError):
        return {}


def _sweep_noise(run_dir: Path) -> float:
    """The sweep file's selection noise; the default when the copy is gone or unreadable."""
    from ..plan.sweep_file import SweepFileError, load_sweep

    try:
        return load_sweep(run_dir / run_files.SWEEP_COPY).noise
    except (OSError, SweepFileError):
        return DEFAULT_NOISE


def is_run_folder(path: Path) -> bool:
    path = Path(path)
    return path.is_dir() and ((path / run_files.RUN_FILE).exists()
                              or (path / run_files.LOG_FILE).exists())


def load_run(run_dir: Path) -> Run:
    """The run folder's measurements and winners; ReportError when there is nothing to
    report."""
    from ..results.selection import select_winners

    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise ReportError(f"{run_dir}: no such folder")
    if (run_dir / run_files.KINDS_FILE).exists() and not is_run_folder(run_dir):
        kinds = sorted(run_files.read_json(run_dir / run_files.KINDS_FILE).get("kinds", {}))
        raise ReportError(f"{run_dir} holds one run folder per device kind ({', '.join(kinds)}); "
                          f"report each of them: attnbench report {run_dir / '<kind>'}")
    if not is_run_folder(run_dir):
        raise ReportError(f"{run_dir} is not a run folder (it has neither {run_files.RUN_FILE} "
                          f"nor {run_files.LOG_FILE}); run `attnbench sweep` to make one")
    log = run_dir / run_files.LOG_FILE
    raw = run_files.read_records(log)
    if not raw:
        raise ReportError(f"{run_dir} holds no measurements yet (its {run_files.LOG_FILE} is "
                          f"missing or empty): the sweep has not measured anything so far")
    meta = _read_json_or_empty(run_dir / run_files.RUN_FILE)
    environment = _read_json_or_empty(run_dir / run_files.ENVIRONMENT_FILE)
    environment.setdefault("device_kind", meta.get("device_kind") or raw[0].get("device_kind"))
    environment.setdefault("platform", "cpu" if environment["device_kind"] == "cpu" else "gpu")
    noise = _sweep_noise(run_dir)
    provenance = {"run_id": meta.get("run_id", raw[0].get("run_id")),
                  "sweep": meta.get("sweep_name")}
    winners = select_winners(raw, noise=noise, platform=environment["platform"],
                             provenance=provenance)
    table = run_dir / run_files.TABLE_FILE
    unfinished = not table.exists() or log.stat().st_mtime > table.stat().st_mtime + 1.0
    return Run(run_dir, meta, environment, measurements_frame(run_files.derived_figures(raw)),
               winners, noise, unfinished)
