"""Comparing two sweeps' winners: regressions for CI, changed winners, keys on one side.

A side is a run folder (its winners are selected from its log, so a run in progress can be
compared too) or a tuned table. For each table key both sides hold, the ratio is B's time
over A's. Its noise band comes from the percentiles: from B's p20 over A's p80 (the most
favourable reading) to B's p80 over A's p20. A key regressed when the ratio exceeds
1 + threshold AND the whole band lies above 1 (B's p20 above A's p80): slower by more than
the threshold, and not explainable by timing noise. A key a run folder measured without
any correct config, which the other side has a winner for, counts as a regression too.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from attnbench.kernels.table import Entry, TableError, key_text, read_table

from .results import records as run_files
from .report import ReportError, config_text, is_run_folder, load_run

Echo = Callable[[str], None]


class CompareError(RuntimeError):
    """A side that cannot be compared; the message says why."""


@dataclasses.dataclass
class Side:
    """One side of a comparison: winners per key, and keys measured without a winner."""

    path: Path
    kind: str  # "run" or "table"
    label: str
    winners: dict[str, Entry]  # by canonical key
    failed: dict[str, dict[str, Any]]  # keys measured (run only) with no correct config
    unfinished: bool = False

    @property
    def device_kinds(self) -> set[str]:
        keys = [e.key for e in self.winners.values()] + list(self.failed.values())
        return {k.get("device_kind") for k in keys}


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def load_side(path: Path) -> Side:
    """A run folder or a tuned table (a .json file) as a comparison side."""
    path = Path(path)
    if not path.exists():
        raise CompareError(f"{path}: no such file or folder")
    if path.is_dir():
        if not is_run_folder(path):
            if (path / run_files.TABLE_FILE).exists():
                return load_side(path / run_files.TABLE_FILE)
            raise CompareError(f"{path} is neither a run folder (no {run_files.RUN_FILE} or "
                               f"{run_files.LOG_FILE}) nor a tuned table")
        try:
            run = load_run(path)
        except ReportError as error:
            raise CompareError(str(error)) from None
        winners = {_canonical(e.key): e for e in run.winners}
        failed = {}
        for record in run.records:
            if record.get("status") != "skipped" and "key" in record:
                key = _canonical(record["key"])
                if key not in winners:
                    failed[key] = record["key"]
        label = f"run {run.meta.get('run_id', path.name)}"
        return Side(path, "run", label, winners, failed, run.unfinished)
    try:
        table = read_table(path)
    except TableError as error:
        raise CompareError(str(error)) from None
    winners = {_canonical(e.key): e for e in table.entries}
    return Side(path, "table", f"table {path.name}", winners, {})


def _percentiles(entry: Entry) -> tuple[float, float]:
    """(p20, p80) of an entry's time; both its median when the table did not keep them."""
    p20 = entry.source.get("p20_us")
    p80 = entry.source.get("p80_us")
    if not isinstance(p20, (int, float)) or not isinstance(p80, (int, float)):
        return entry.time_us, entry.time_us
    return p20, p80


@dataclasses.dataclass
class Row:
    """One key both sides hold."""

    key: dict[str, Any]
    a: Entry
    b: Entry
    ratio: float  # B time / A time
    band: tuple[float, float]  # the ratio's noise band (low, high)
    verdict: str  # regression, improvement, same

    @property
    def winner_changed(self) -> bool:
        return (self.a.variant, _canonical(self.a.config)) != (self.b.variant,
                                                               _canonical(self.b.config))


@dataclasses.dataclass
class Comparison:
    a: Side
    b: Side
    threshold: float
    rows: list[Row]  # regressions first (largest ratio first), then by ratio
    failed_in_b: list[tuple[dict[str, Any], Entry]]  # A's winner; B measured it, none correct
    failed_in_a: list[tuple[dict[str, Any], Entry]]
    only_a: list[dict[str, Any]]
    only_b: list[dict[str, Any]]
    unusable: list[str]  # shared keys without times to compare

    @property
    def regressions(self) -> list[Row]:
        return [r for r in self.rows if r.verdict == "regression"]

    @property
    def regressed(self) -> bool:
        return bool(self.regressions or self.failed_in_b)


def judge(ratio: float, band: tuple[float, float], threshold: float) -> str:
    """regression / improvement beyond the threshold and outside the noise band, else same."""
    if ratio > 1 + threshold and band[0] > 1:
        return "regression"
    if ratio < 1 / (1 + threshold) and band[1] < 1:
        return "improvement"
    return "same"


def compare(a: Side, b: Side, threshold: float) -> Comparison:
    rows, unusable = [], []
    for key in sorted(set(a.winners) & set(b.winners)):
        entry_a, entry_b = a.winners[key], b.winners[key]
        if not entry_a.time_us or not entry_b.time_us:
            unusable.append(key_text(entry_a.key))
            continue
        a20, a80 = _percentiles(entry_a)
        b20, b80 = _percentiles(entry_b)
        ratio = entry_b.time_us / entry_a.time_us
        band = (b20 / a80, b80 / a20) if a20 and a80 else (ratio, ratio)
        rows.append(Row(entry_a.key, entry_a, entry_b, ratio, band, judge(ratio, band, threshold)))
    rows.sort(key=lambda r: (r.verdict != "regression", -r.ratio))
    failed_in_b = [(a.winners[k].key, a.winners[k]) for k in sorted(set(a.winners) & set(b.failed))]
    failed_in_a = [(b.winners[k].key, b.winners[k]) for k in sorted(set(b.winners) & set(a.failed))]
    every_a = set(a.winners) | set(a.failed)
    every_b = set(b.winners) | set(b.failed)
    key_of = {**{k: e.key for k, e in a.winners.items()}, **a.failed,
              **{k: e.key for k, e in b.winners.items()}, **b.failed}
    only_a = [key_of[k] for k in sorted(every_a - every_b)]
    only_b = [key_of[k] for k in sorted(every_b - every_a)]
    return Comparison(a, b, threshold, rows, failed_in_b, failed_in_a, only_a, only_b, unusable)


def _entry_text(entry: Entry) -> str:
    p20, p80 = _percentiles(entry)
    return (f"{entry.variant} {config_text(entry.config)}: {entry.time_us:.1f} us "
            f"(p20-p80 {p20:.1f}-{p80:.1f})")


def _row_text(row: Row) -> str:
    return (f"  {key_text(row.key)}\n"
            f"      {row.a.time_us:10.1f} us -> {row.b.time_us:10.1f} us   "
            f"x{row.ratio:.3f} (noise band x{row.band[0]:.3f}-x{row.band[1]:.3f})"
            f"{'   winner changed' if row.winner_changed else ''}")


def render(comparison: Comparison) -> list[str]:
    """The comparison as text lines: regressions first, then the rest."""
    c = comparison
    lines = [f"A: {c.a.label} ({c.a.path})", f"B: {c.b.label} ({c.b.path})"]
    for name, side in (("A", c.a), ("B", c.b)):
        if side.unfinished:
            lines.append(f"note: {name} is an unfinished run; comparing what it logged so far")
    lines.append(f"{len(c.rows)} shared keys; regression: B slower than A by more than "
                 f"{c.threshold:.1%} and outside the p20-p80 noise band")
    if not c.rows and not c.failed_in_b and c.a.device_kinds != c.b.device_kinds:
        lines.append(f"note: the sides were measured on different devices "
                     f"({sorted(map(str, c.a.device_kinds))} vs "
                     f"{sorted(map(str, c.b.device_kinds))}); keys include the device kind")
    regressions = c.regressions
    lines.append("")
    lines.append(f"REGRESSIONS ({len(regressions) + len(c.failed_in_b)})" if regressions or
                 c.failed_in_b else "no regressions")
    lines += [_row_text(row) for row in regressions]
    for key, entry in c.failed_in_b:
        lines.append(f"  {key_text(key)}\n      B measured it but no config was correct "
                     f"(A: {_entry_text(entry)})")
    improvements = [r for r in c.rows if r.verdict == "improvement"]
    if improvements:
        lines += ["", f"improvements ({len(improvements)})"] + [_row_text(r) for r in improvements]
    same = [r for r in c.rows if r.verdict == "same"]
    if same:
        lines += ["", f"within threshold or noise ({len(same)})"] + [_row_text(r) for r in same]
    changed = [r for r in c.rows if r.winner_changed]
    if changed:
        lines += ["", f"changed winners ({len(changed)}), A | B"]
        for row in changed:
            lines += [f"  {key_text(row.key)}",
                      f"      A: {_entry_text(row.a)}",
                      f"      B: {_entry_text(row.b)}"]
    for title, items in (("B has a winner where A measured no correct config", c.failed_in_a),):
        if items:
            lines += ["", f"{title} ({len(items)})"]
            lines += [f"  {key_text(k)}: B {_entry_text(e)}" for k, e in items]
    for name, keys in (("only in A", c.only_a), ("only in B", c.only_b)):
        if keys:
            lines += ["", f"keys {name} ({len(keys)})"] + [f"  {key_text(k)}" for k in keys]
    if c.unusable:
        lines += ["", f"shared keys without a time ({len(c.unusable)})"]
        lines += [f"  {k}" for k in c.unusable]
    return lines


def parse_threshold(text: str) -> float:
    """'5%', '5' or '0.05' -> 0.05 (a bare number of 1 or more is read as percent)."""
    value = text.strip()
    try:
        if value.endswith("%"):
            number = float(value[:-1]) / 100
        else:
            number = float(value)
            number = number / 100 if number >= 1 else number
    except ValueError:
        raise ValueError(f"threshold must look like 5% or 0.05, got {text!r}") from None
    if not 0 <= number < 10:
        raise ValueError(f"threshold must be between 0% and 1000%, got {text!r}")
    return number


def compare_paths(a: Path, b: Path, threshold: float, echo: Echo = print) -> Comparison:
    """Loads both sides, prints the comparison, returns it (`.regressed` for the exit code)."""
    side_a, side_b = load_side(a), load_side(b)
    for name, side in (("A", side_a), ("B", side_b)):
        if not side.winners and not side.failed:
            raise CompareError(f"{name} ({side.path}) holds no tuned entries and no "
                               f"measurements: nothing to compare")
    comparison = compare(side_a, side_b, threshold)
    for line in render(comparison):
        echo(line)
    # A gate that compared nothing must not pass: no shared key was timed on both sides.
    if not comparison.rows and not comparison.failed_in_a and not comparison.failed_in_b:
        raise CompareError(f"A ({side_a.path}) and B ({side_b.path}) share no key timed on "
                           f"both sides: nothing was compared (same sweep file and device?)")
    return comparison
