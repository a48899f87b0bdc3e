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
import io
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from attnbench.kernels.table import Entry, TableError, key_text, read_table

from ..results import records as run_files
from ..canonical_json import canonical
from .load import ReportError, is_run_folder, load_run
from .render import config_text

Echo = Callable[[str], None]

# A log has no width: plain output never wraps a key over two lines.
_LOG_WIDTH = 1000


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

    def held_keys(self) -> pd.DataFrame:
        """Every key the side holds, indexed by its canonical text: the key, and its winner
        (None where a run measured it without a correct config)."""
        rows = {text: {"key": entry.key, "winner": entry} for text, entry in self.winners.items()}
        rows.update({text: {"key": key, "winner": None} for text, key in self.failed.items()})
        return pd.DataFrame.from_dict(rows, orient="index", columns=["key", "winner"],
                                      dtype=object)


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
        winners = {canonical(e.key): e for e in run.winners}
        measured = run.measurements
        keys = measured.loc[(measured["status"] != "skipped") & measured["key"].notna(), "key"]
        failed = {canonical(key): key for key in keys if canonical(key) not in winners}
        return Side(path, "run", f"run {run.run_id}", winners, failed, run.unfinished)
    try:
        table = read_table(path)
    except TableError as error:
        raise CompareError(str(error)) from None
    winners = {canonical(e.key): e for e in table.entries}
    return Side(path, "table", f"table {path.name}", winners, {})


def _percentiles(entry: Entry) -> tuple[float, float]:
    """(p20, p80) of an entry's time; both its median when the table did not keep them."""
    p20 = entry.source.get("p20_us")
    p80 = entry.source.get("p80_us")
    if not isinstance(p20, (int, float)) or not isinstance(p80, (int, float)):
        return entry.time_us, entry.time_us
    return p20, p80


def _timings(winners: pd.Series) -> pd.DataFrame:
    """The time, p20 and p80 of each winner (NaN for a time the table does not hold)."""
    return pd.DataFrame([(entry.time_us, *_percentiles(entry)) for entry in winners],
                        index=winners.index, columns=["time", "p20", "p80"], dtype=float)


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
        return (self.a.variant, canonical(self.a.config)) != (self.b.variant,
                                                              canonical(self.b.config))


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


def _compare_times(shared: pd.DataFrame, threshold: float) -> list[Row]:
    """A row per key both sides have a timed winner for: regressions first (largest ratio
    first), then by ratio."""
    a, b = _timings(shared["winner_a"]), _timings(shared["winner_b"])
    ratio = b["time"] / a["time"]
    has_band = (a["p20"] > 0) & (a["p80"] > 0)
    low = (b["p20"] / a["p80"]).where(has_band, ratio)
    high = (b["p80"] / a["p20"]).where(has_band, ratio)
    rows = [Row(entry_a.key, entry_a, entry_b, r, (lo, hi), judge(r, (lo, hi), threshold))
            for entry_a, entry_b, r, lo, hi
            in zip(shared["winner_a"], shared["winner_b"], ratio, low, high)]
    rows.sort(key=lambda row: (row.verdict != "regression", -row.ratio))
    return rows


def compare(a: Side, b: Side, threshold: float) -> Comparison:
    """Sorts every key either side holds into the lists of the comparison (by key)."""
    keys = pd.merge(a.held_keys(), b.held_keys(), how="outer", left_index=True,
                    right_index=True, suffixes=("_a", "_b"), indicator="held_by", sort=True)
    both = keys[keys["held_by"] == "both"]
    won_a, won_b = both["winner_a"].notna(), both["winner_b"].notna()
    shared = both[won_a & won_b]
    timed = pd.Series([bool(x.time_us and y.time_us)
                       for x, y in zip(shared["winner_a"], shared["winner_b"])],
                      index=shared.index, dtype=bool)
    return Comparison(
        a, b, threshold, _compare_times(shared[timed], threshold),
        failed_in_b=[(entry.key, entry) for entry in both.loc[won_a & ~won_b, "winner_a"]],
        failed_in_a=[(entry.key, entry) for entry in both.loc[won_b & ~won_a, "winner_b"]],
        only_a=keys.loc[keys["held_by"] == "left_only", "key_a"].tolist(),
        only_b=keys.loc[keys["held_by"] == "right_only", "key_b"].tolist(),
        unusable=[key_text(entry.key) for entry in shared.loc[~timed, "winner_a"]])


# ---- Rendering -------------------------------------------------------------------------------


def _entry_text(entry: Entry) -> str:
    p20, p80 = _percentiles(entry)
    return (f"{entry.variant} {config_text(entry.config)}: {entry.time_us:.1f} us "
            f"(p20-p80 {p20:.1f}-{p80:.1f})")


_VERDICT_STYLE = {"regression": "bold red", "improvement": "green", "same": ""}


def _times_table(rows: list[Row], table_box: box.Box) -> Table:
    table = Table(box=table_box, show_edge=False, pad_edge=False)
    table.add_column("key")
    for name in ("A us", "B us", "B / A"):
        table.add_column(name, justify="right", no_wrap=True)
    table.add_column("noise band", no_wrap=True)
    table.add_column("note")
    for row in rows:
        table.add_row(key_text(row.key), f"{row.a.time_us:.1f}", f"{row.b.time_us:.1f}",
                      Text(f"x{row.ratio:.3f}", style=_VERDICT_STYLE[row.verdict]),
                      f"x{row.band[0]:.3f}-x{row.band[1]:.3f}",
                      "winner changed" if row.winner_changed else "")
    return table


def render(comparison: Comparison, *, terminal: bool = False, width: int | None = None) -> str:
    """The comparison as text: regressions first, then the rest, the lists as tables. In a
    terminal with colours and wrapped to `width`; otherwise plain ASCII, never wrapped."""
    c = comparison
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=terminal, width=width or _LOG_WIDTH,
                      soft_wrap=not terminal, markup=False, highlight=False, emoji=False)
    # Box-drawing characters only where they are sure to show: a log may not be UTF-8.
    table_box = box.SIMPLE_HEAD if terminal else box.ASCII

    def heading(text: str, style: str = "bold") -> None:
        console.print()
        console.print(Text(text, style=style))

    console.print(f"A: {c.a.label} ({c.a.path})")
    console.print(f"B: {c.b.label} ({c.b.path})")
    for name, side in (("A", c.a), ("B", c.b)):
        if side.unfinished:
            console.print(f"note: {name} is an unfinished run; comparing what it logged so far")
    console.print(f"{len(c.rows)} shared keys; regression: B slower than A by more than "
                  f"{c.threshold:.1%} and outside the p20-p80 noise band")
    if not c.rows and not c.failed_in_b and c.a.device_kinds != c.b.device_kinds:
        console.print(f"note: the sides were measured on different devices "
                      f"({sorted(map(str, c.a.device_kinds))} vs "
                      f"{sorted(map(str, c.b.device_kinds))}); keys include the device kind")
    regressions = c.regressions
    if regressions or c.failed_in_b:
        heading(f"REGRESSIONS ({len(regressions) + len(c.failed_in_b)})", "bold red")
        table = _times_table(regressions, table_box)
        for key, entry in c.failed_in_b:
            table.add_row(key_text(key), f"{entry.time_us:.1f}", "-", "-", "-",
                          f"B measured it but no config was correct (A: {_entry_text(entry)})")
        console.print(table)
    else:
        heading("no regressions", "bold green")
    for verdict, title in (("improvement", "improvements"),
                           ("same", "within threshold or noise")):
        rows = [r for r in c.rows if r.verdict == verdict]
        if rows:
            heading(f"{title} ({len(rows)})")
            console.print(_times_table(rows, table_box))
    changed = [r for r in c.rows if r.winner_changed]
    if changed:
        heading(f"changed winners ({len(changed)}), A | B")
        table = Table("key", "winners", box=table_box, show_edge=False, pad_edge=False)
        for row in changed:
            table.add_row(key_text(row.key),
                          f"A: {_entry_text(row.a)}\nB: {_entry_text(row.b)}")
        console.print(table)
    if c.failed_in_a:
        heading(f"B has a winner where A measured no correct config ({len(c.failed_in_a)})")
        for key, entry in c.failed_in_a:
            console.print(f"  {key_text(key)}: B {_entry_text(entry)}")
    for name, keys in (("only in A", c.only_a), ("only in B", c.only_b)):
        if keys:
            heading(f"keys {name} ({len(keys)})")
            for key in keys:
                console.print(f"  {key_text(key)}")
    if c.unusable:
        heading(f"shared keys without a time ({len(c.unusable)})")
        for text in c.unusable:
            console.print(f"  {text}")
    # Table cells are padded to their column's width; a log needs no trailing blanks.
    return "\n".join(line.rstrip() for line in buffer.getvalue().splitlines())


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
    terminal = sys.stdout.isatty()
    echo(render(comparison, terminal=terminal,
                width=shutil.get_terminal_size().columns if terminal else None))
    # A gate that compared nothing must not pass: no shared key was timed on both sides.
    if not comparison.rows and not comparison.failed_in_a and not comparison.failed_in_b:
        raise CompareError(f"A ({side_a.path}) and B ({side_b.path}) share no key timed on "
                           f"both sides: nothing was compared (same sweep file and device?)")
    return comparison
