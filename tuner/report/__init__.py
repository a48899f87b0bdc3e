"""The report of one sweep run: summary.md, four kinds of PNG plots, and index.html.

    RUN_DIR --(load_run)--> records with derived figures, winners per table key
            --(build_summary)--> per problem: winner, times, counts; worst failures
            --(plots)--> times_*.png, heatmap_*.png, bandwidth.png, speedup.png
            --(render)--> summary.md, index.html (plots embedded: readable offline)

Everything is read from the run's append-only log (measurements.jsonl), the same records
measurements.csv is written from, so a run still in progress can be reported on too; the
derived figures are computed by records.derived_figures, as for the CSV. Winners come from
selection.select_winners, as for the run's table.json.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import html
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from attnbench.kernels.table import Entry, key_text

from .. import records as run_files

Echo = Callable[[str], None]

FAILURE_STATUSES = ("wrong", "compile_error", "error", "timeout", "crashed")
_PROBLEMS_PER_FIGURE = 9
_MAX_HEATMAPS = 40
_TOP_FAILURES = 10
_DEFAULT_NOISE = 0.03


class ReportError(RuntimeError):
    """A run folder that cannot be reported on; the message says why and what to do."""


# ---- Loading --------------------------------------------------------------------------------


@dataclasses.dataclass
class Run:
    """One run folder as the report sees it."""

    path: Path
    meta: dict[str, Any]  # run.json
    environment: dict[str, Any]  # environment.json
    records: list[dict[str, Any]]  # the log, each with the CSV's derived figures
    winners: list[Entry]
    noise: float
    unfinished: bool  # no table.json yet, or the log grew after it was written

    @property
    def platform(self) -> str:
        return self.environment.get("platform", "cpu")

    @property
    def bandwidth(self) -> float | None:
        return self.environment.get("read_bandwidth_bytes_per_s")

    def winner_of(self, key: dict[str, Any]) -> Entry | None:
        wanted = _canonical(key)
        return next((e for e in self.winners if _canonical(e.key) == wanted), None)


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def _read_json_or_empty(path: Path) -> dict[str, Any]:
    try:
        return run_files.read_json(path)
    except (OSError, json.JSONDecodeError):
        return {}


def _sweep_noise(run_dir: Path) -> float:
    """The sweep file's selection noise; the default when the copy is gone or unreadable."""
    from ..sweep_file import SweepFileError, load_sweep

    try:
        return load_sweep(run_dir / run_files.SWEEP_COPY).noise
    except (OSError, SweepFileError):
        return _DEFAULT_NOISE


def is_run_folder(path: Path) -> bool:
    path = Path(path)
    return path.is_dir() and ((path / run_files.RUN_FILE).exists()
                              or (path / run_files.LOG_FILE).exists())


def load_run(run_dir: Path) -> Run:
    """The run folder's records and winners; ReportError when there is nothing to report."""
    from ..selection import select_winners

    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise ReportError(f"{run_dir}: no such folder")
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
    return Run(run_dir, meta, environment, run_files.derived_figures(raw), winners, noise,
               unfinished)


# ---- What the summary says -------------------------------------------------------------------


def config_text(config: dict[str, Any]) -> str:
    """A config as `name=value` pairs (`default`-free: every tunable is listed)."""
    if not config:
        return "(no tunables)"
    return " ".join(f"{name}={value}" for name, value in config.items())


def _candidate(record: dict[str, Any]) -> str:
    return _canonical([record["variant"], record.get("config") or {}])


def latest_per_candidate(records: list[dict[str, Any]], problem_id: str) -> list[dict[str, Any]]:
    """Each config of a problem once: its record from the last round it was measured in."""
    latest: dict[str, dict[str, Any]] = {}
    for record in records:
        if record["problem_id"] != problem_id:
            continue
        name = _candidate(record)
        if name not in latest or record.get("round", 0) >= latest[name].get("round", 0):
            latest[name] = record
    return list(latest.values())


@dataclasses.dataclass
class ProblemSummary:
    op: str
    problem_id: str
    label: str
    key: dict[str, Any]
    counts: dict[str, int]  # per status over the problem's configs, and "tried"
    winner: dict[str, Any] | None  # the winning config's record on this problem (last round)
    entry: Entry | None
    untuned: dict[str, Any] | None  # the platform's default variant with its default config
    records: list[dict[str, Any]]  # latest record per config

    @property
    def sample(self) -> dict[str, Any]:
        return self.records[0]

    @property
    def gigabytes_per_s(self) -> float | None:
        return achieved_gigabytes_per_s(self.winner)


def achieved_gigabytes_per_s(record: dict[str, Any] | None) -> float | None:
    if not record or not record.get("bytes_moved") or not record.get("median_us"):
        return None
    return record["bytes_moved"] / record["median_us"] / 1e3


def summarize_problems(run: Run) -> list[ProblemSummary]:
    """One summary per problem of the run, in the order the log first names them."""
    from attnbench.kernels import registry

    order: list[str] = []
    for record in run.records:
        if record["problem_id"] not in order:
            order.append(record["problem_id"])
    summaries = []
    for problem_id in order:
        latest = latest_per_candidate(run.records, problem_id)
        counts = {status: 0 for status in run_files.STATUSES}
        for record in latest:
            counts[record["status"]] = counts.get(record["status"], 0) + 1
        counts["tried"] = len(latest) - counts["skipped"]
        sample = latest[0]
        entry = run.winner_of(sample["key"]) if "key" in sample else None
        winner = None
        if entry is not None:
            name = _canonical([entry.variant, entry.config])
            winner = next((r for r in latest if _candidate(r) == name and r["status"] == "ok"),
                          None)
        untuned_name = run.meta.get("default_variants", {}).get(
            sample["op"], registry.DEFAULT_VARIANT.get((sample["op"], run.platform)))
        untuned = next((r for r in latest if r["variant"] == untuned_name and r.get("is_default")
                        and r["status"] == "ok"), None)
        summaries.append(ProblemSummary(sample["op"], problem_id, sample.get("problem", problem_id),
                                        sample.get("key", {}), counts, winner, entry, untuned,
                                        latest))
    return summaries


def worst_failures(run: Run, limit: int = _TOP_FAILURES) -> tuple[list[dict[str, Any]],
                                                                   list[dict[str, Any]]]:
    """(the wrong configs with the largest errors, the other failures grouped by reason)."""
    latest = [r for pid in {r["problem_id"] for r in run.records}
              for r in latest_per_candidate(run.records, pid)]
    wrong = sorted((r for r in latest if r["status"] == "wrong"),
                   key=lambda r: -(r.get("relative_error") or math.inf))[:limit]
    groups: dict[tuple, dict[str, Any]] = {}
    for record in latest:
        if record["status"] not in FAILURE_STATUSES or record["status"] == "wrong":
            continue
        reason = (record.get("reason") or "").strip().splitlines()
        first = reason[-1] if reason and reason[0].startswith("Traceback") else (reason or [""])[0]
        group = groups.setdefault((record["op"], record["variant"], record["status"], first),
                                  {"op": record["op"], "variant": record["variant"],
                                   "status": record["status"], "reason": first, "count": 0,
                                   "example": record})
        group["count"] += 1
    others = sorted(groups.values(), key=lambda g: -g["count"])[:limit]
    return wrong, others


# ---- Plot titles and figures -----------------------------------------------------------------


def run_date(run: Run) -> str:
    started = run.meta.get("started") or run.records[0].get("finished")
    if started:
        return str(started)[:10]
    return datetime.date.today().isoformat()


def versions_text(run: Run) -> str:
    versions = run.environment.get("versions", {})
    names = ["attnbench", "jax", "jaxlib"]
    if run.platform == "gpu":
        names += ["triton", "jax-triton"]
    if run.platform == "tpu":
        names += ["libtpu"]
    return ", ".join(f"{n} {versions[n]}" for n in names if n in versions) or "versions unknown"


def plot_subtitle(run: Run, records: list[dict[str, Any]]) -> str:
    """device · dtype · date · versions: the line under every plot's title."""
    dtypes = sorted({r.get("dtype", "?") for r in records}) or ["?"]
    device = run.environment.get("device_kind_raw") or run.environment.get("device_kind", "?")
    return f"{device} · {'/'.join(dtypes)} · {run_date(run)} · {versions_text(run)}"


def _figure(rows: int, columns: int, width: float, height: float):
    # The object-oriented API with the Agg canvas: no pyplot, no global backend switch.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, columns, squeeze=False)
    return figure, axes


def _save(figure, path: Path) -> Path:
    figure.savefig(path)
    return path


def _title(figure, text: str) -> None:
    """The figure's title, each line wrapped to the figure's width (a title wider than the
    figure would be cut off at both edges)."""
    import textwrap

    width = int(figure.get_figwidth() * 13)
    lines = [part for line in text.splitlines() for part in textwrap.wrap(line, width) or [""]]
    figure.suptitle("\n".join(lines), fontsize=9)


def _short(label: str, width: int = 60) -> str:
    return label if len(label) <= width else label[: width - 1] + "…"


def _colors(names: list[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    palette = colormaps["tab10"]
    return {name: palette(i % 10) for i, name in enumerate(sorted(set(names)))}


def plot_sorted_times(run: Run, summaries: list[ProblemSummary], out: Path) -> list[Path]:
    """Per problem, every correct config's median (p20-p80 bars), fastest first; the winner
    and each variant's default marked. Nine problems per PNG, one set per op."""
    from matplotlib.ticker import MaxNLocator

    paths = []
    for op in sorted({s.op for s in summaries}):
        chosen = [s for s in summaries if s.op == op and any(r["status"] == "ok" for r in s.records)]
        for page in range(0, len(chosen), _PROBLEMS_PER_FIGURE):
            group = chosen[page: page + _PROBLEMS_PER_FIGURE]
            columns = min(3, len(group))
            rows = math.ceil(len(group) / columns)
            figure, axes = _figure(rows, columns, 5.2 * columns, 3.8 * rows + 0.8)
            ok_records = [r for s in group for r in s.records if r["status"] == "ok"]
            colors = _colors([r["variant"] for r in ok_records])
            for axis, summary in zip(axes.flat, group):
                ok = sorted((r for r in summary.records if r["status"] == "ok"),
                            key=lambda r: r["median_us"])
                ranks = list(range(1, len(ok) + 1))
                for variant, color in colors.items():
                    mine = [(i, r) for i, r in zip(ranks, ok) if r["variant"] == variant]
                    if not mine:
                        continue
                    axis.vlines([i for i, _ in mine], [r["p20_us"] for _, r in mine],
                                [r["p80_us"] for _, r in mine], color=color, alpha=0.35, lw=1)
                    axis.scatter([i for i, _ in mine], [r["median_us"] for _, r in mine], s=14,
                                 color=color, label=variant, zorder=3)
                defaults = [(i, r) for i, r in zip(ranks, ok) if r.get("is_default")]
                axis.scatter([i for i, _ in defaults], [r["median_us"] for _, r in defaults],
                             marker="^", s=70, facecolors="none", edgecolors="black",
                             linewidths=1.2, label="variant default", zorder=4)
                if summary.winner is not None:
                    place = next(i for i, r in zip(ranks, ok) if r is summary.winner)
                    axis.scatter([place], [summary.winner["median_us"]], marker="*", s=200,
                                 color="red", edgecolors="black", linewidths=0.6,
                                 label=f"winner ({summary.winner['variant']})", zorder=5)
                axis.set_yscale("log")
                axis.xaxis.set_major_locator(MaxNLocator(integer=True))
                axis.set_xlabel("configs, fastest first (rank)")
                axis.set_ylabel("median time (µs), bars p20–p80")
                axis.set_title(_short(summary.label, 56), fontsize=9)
                axis.grid(True, which="both", alpha=0.3)
                axis.legend(fontsize=7, loc="upper left")
            for axis in list(axes.flat)[len(group):]:
                axis.set_visible(False)
            _title(figure, f"{op}: time of every correct config per problem\n"
                           f"{plot_subtitle(run, ok_records)}")
            suffix = f"_{page // _PROBLEMS_PER_FIGURE + 1}" if len(chosen) > _PROBLEMS_PER_FIGURE else ""
            paths.append(_save(figure, out / f"times_{op}{suffix}.png"))
    return paths


def problem_family(record: dict[str, Any]) -> str:
    """Problems that differ only in size (batch, context, lengths) form one family."""
    heads = record.get("model") or (f"Hq{record.get('q_heads')}/Hkv{record.get('kv_heads')}/"
                                    f"D{record.get('head_dim')}")
    features = "+".join(record.get("features") or []) or "no features"
    page = f" page {record['page_size']}" if record.get("page_size") else ""
    return f"{record['op']} {heads} {record.get('dtype')}{page} {features}"


def _sorted_values(values: set) -> list:
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return sorted(values)
    return sorted(values, key=str)


def heatmap_axes(records: list[dict[str, Any]]) -> tuple[str, str] | None:
    """The two tunables with the most distinct values among correct configs (ties: the
    order the config declares them), or None when fewer than two vary."""
    varying: list[tuple[int, int, str]] = []
    order: list[str] = []
    for record in records:
        for name in record.get("config") or {}:
            if name not in order:
                order.append(name)
    for position, name in enumerate(order):
        count = len({_canonical((r.get("config") or {}).get(name)) for r in records})
        if count >= 2:
            varying.append((-count, position, name))
    if len(varying) < 2:
        return None
    first, second = sorted(varying)[:2]
    return first[2], second[2]


def _slug(text: str) -> str:
    kept = "".join(c if c.isalnum() else "-" for c in text.lower())
    return "-".join(part for part in kept.split("-") if part)[:80]


def heatmap_grid(records: list[dict[str, Any]], rows_name: str, columns_name: str):
    """(row values, column values, cell values, unit) over the problems of `records`: the best
    median over the other tunables; one problem: µs; several: the geometric mean over
    problems of time / the variant's best time on that problem."""
    rows = _sorted_values({r["config"][rows_name] for r in records})
    columns = _sorted_values({r["config"][columns_name] for r in records})
    problems = sorted({r["problem_id"] for r in records})
    per_problem: dict[str, dict[tuple, float]] = {}
    for record in records:
        cell = (rows.index(record["config"][rows_name]),
                columns.index(record["config"][columns_name]))
        cells = per_problem.setdefault(record["problem_id"], {})
        cells[cell] = min(cells.get(cell, math.inf), record["median_us"])
    grid = [[math.nan] * len(columns) for _ in rows]
    for i in range(len(rows)):
        for j in range(len(columns)):
            if len(problems) == 1:
                grid[i][j] = per_problem[problems[0]].get((i, j), math.nan)
                continue
            ratios = [cells[(i, j)] / min(cells.values()) for cells in per_problem.values()
                      if (i, j) in cells]
            if ratios:
                grid[i][j] = math.exp(sum(math.log(x) for x in ratios) / len(ratios))
    unit = ("median time (µs)" if len(problems) == 1 else
            f"time / best (×), geomean of {len(problems)} problems")
    return rows, columns, grid, unit


def plot_heatmaps(run: Run, out: Path) -> tuple[list[Path], list[str]]:
    """Time over two tunables, one PNG per variant and problem family (first round, where
    every config was timed alike). Returns the paths and notes on what was left out."""
    import numpy as np

    ok = [r for r in run.records if r["status"] == "ok" and r.get("round", 0) == 0]
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for record in ok:
        groups.setdefault((record["op"], record["variant"], problem_family(record)), []).append(record)
    paths, notes = [], []
    for (op, variant, family), records in sorted(groups.items()):
        names = heatmap_axes(records)
        if names is None:
            continue
        if len(paths) >= _MAX_HEATMAPS:
            notes.append(f"heatmap of {op}/{variant} on {family} left out (more than "
                         f"{_MAX_HEATMAPS} heatmaps)")
            continue
        rows, columns, grid, unit = heatmap_grid(records, *names)
        values = np.array(grid, dtype=float)
        figure, axes = _figure(1, 1, max(6.5, 2.0 + 0.9 * len(columns)),
                               max(4.0, 2.0 + 0.5 * len(rows)))
        axis = axes[0, 0]
        image = axis.imshow(np.ma.masked_invalid(values), cmap="viridis_r", aspect="auto")
        axis.set_xticks(range(len(columns)), [str(c) for c in columns])
        axis.set_yticks(range(len(rows)), [str(r) for r in rows])
        axis.set_xlabel(names[1])
        axis.set_ylabel(names[0])
        finite = values[np.isfinite(values)]
        middle = (finite.min() + finite.max()) / 2 if finite.size else 0
        for i in range(len(rows)):
            for j in range(len(columns)):
                value = values[i, j]
                text = "—" if not np.isfinite(value) else (
                    f"{value:.3g}" if value < 1000 else f"{value:.0f}")
                axis.text(j, i, text, ha="center", va="center", fontsize=8,
                          color="white" if np.isfinite(value) and value > middle else "black")
        if finite.size:
            best = np.unravel_index(np.nanargmin(values), values.shape)
            axis.add_patch(_best_box(best))
        figure.colorbar(image, ax=axis, label=unit)
        _title(figure, f"{op}/{variant}: {names[0]} × {names[1]} on {family} (each cell: the "
                       f"best over the other tunables; red box: best cell)\n"
                       f"{plot_subtitle(run, records)}")
        paths.append(_save(figure, out / f"heatmap_{op}_{variant}_{_slug(family)}.png"))
    return paths, notes


def _best_box(cell: tuple[int, int]):
    from matplotlib.patches import Rectangle

    row, column = cell
    return Rectangle((column - 0.5, row - 0.5), 1, 1, fill=False, edgecolor="red", lw=2)


def plot_bandwidth(run: Run, summaries: list[ProblemSummary], out: Path) -> Path | None:
    """Achieved GB/s of each problem's winner (and the untuned default) against the measured
    read bandwidth: the roofline of a memory-bound kernel."""
    chosen = [s for s in summaries if s.gigabytes_per_s is not None]
    if not chosen:
        return None
    figure, axes = _figure(1, 1, 12.0, 2.0 + 0.38 * len(chosen))
    axis = axes[0, 0]
    places = list(range(len(chosen)))[::-1]
    axis.barh(places, [s.gigabytes_per_s for s in chosen], color="tab:blue",
              label="winner (tuned)")
    untuned = [(p, achieved_gigabytes_per_s(s.untuned)) for p, s in zip(places, chosen)
               if s.untuned is not None]
    if untuned:
        axis.scatter([g for _, g in untuned], [p for p, _ in untuned], marker="o", s=40,
                     facecolors="none", edgecolors="black", label="untuned default", zorder=3)
    if run.bandwidth:
        axis.axvline(run.bandwidth / 1e9, color="red", ls="--",
                     label=f"measured read bandwidth {run.bandwidth / 1e9:.1f} GB/s")
    axis.set_yticks(places, [_short(f"{s.label} [{s.winner['variant']}]", 90) for s in chosen],
                    fontsize=8)
    axis.set_xlabel("achieved bandwidth (GB/s) = bytes that must be read / median time")
    axis.grid(True, axis="x", alpha=0.3)
    axis.legend(fontsize=8, loc="lower right")
    _title(figure, "achieved bandwidth of the winner per problem vs the memory roofline\n"
                   f"{plot_subtitle(run, [s.winner for s in chosen])}")
    return _save(figure, out / "bandwidth.png")


def speedup_points(run: Run, summaries: list[ProblemSummary]) -> list[dict[str, Any]]:
    """Per problem with a winner: op, batch (sequences), context and tuned-over-default
    speedup. Default: the untuned choice (the platform's default variant with its default
    config); where that was not measured, the winning variant's default config."""
    points = []
    for summary in summaries:
        winner = summary.winner
        if winner is None:
            continue
        if summary.untuned is not None:
            speedup = summary.untuned["median_us"] / winner["median_us"]
        elif winner.get("speedup_vs_default"):
            speedup = winner["speedup_vs_default"]
        else:
            continue
        batch = winner.get("batch") if summary.op == "decode" else winner.get("num_seqs")
        points.append({"op": summary.op, "batch": batch, "max_len": winner.get("max_len"),
                       "speedup": speedup, "label": summary.label})
    return points


def plot_speedup(run: Run, summaries: list[ProblemSummary], out: Path) -> Path | None:
    """Speedup of the tuned config over the default against context length, one line per
    batch size (geometric mean where several problems share a batch and context)."""
    points = [p for p in speedup_points(run, summaries) if p["batch"] and p["max_len"]]
    if not points:
        return None
    ops = sorted({p["op"] for p in points})
    figure, axes = _figure(1, len(ops), 6.0 * len(ops), 4.6)
    for axis, op in zip(axes.flat, ops):
        mine = [p for p in points if p["op"] == op]
        for batch in sorted({p["batch"] for p in mine}):
            at: dict[int, list[float]] = {}
            for p in mine:
                if p["batch"] == batch:
                    at.setdefault(p["max_len"], []).append(p["speedup"])
            contexts = sorted(at)
            means = [math.exp(sum(math.log(v) for v in at[c]) / len(at[c])) for c in contexts]
            line = axis.plot(contexts, means, marker="o",
                             label=f"{'batch' if op == 'decode' else 'sequences'} {batch}")[0]
            spread = [(c, v) for c in contexts for v in at[c] if len(at[c]) > 1]
            if spread:
                axis.scatter([c for c, _ in spread], [v for _, v in spread], s=10,
                             color=line.get_color(), alpha=0.5)
        axis.axhline(1.0, color="grey", lw=1, ls=":")
        axis.set_xscale("log", base=2)
        axis.set_xlabel("context length (tokens, longest sequence)")
        axis.set_ylabel("speedup: default time / tuned time (×)")
        axis.set_title(op, fontsize=10)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=8)
    _title(figure, "speedup of the tuned config over the untuned default\n"
                   f"{plot_subtitle(run, [s.winner for s in summaries if s.winner])}")
    return _save(figure, out / "speedup.png")


# ---- Rendering -------------------------------------------------------------------------------


@dataclasses.dataclass
class Table:
    columns: list[str]
    rows: list[list[str]]


@dataclasses.dataclass
class Section:
    title: str
    paragraphs: list[str] = dataclasses.field(default_factory=list)
    tables: list[Table] = dataclasses.field(default_factory=list)
    bullets: list[str] = dataclasses.field(default_factory=list)


def _number(value: float | None, digits: int = 1, suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    return f"{value:.{digits}f}{suffix}"


def _status_counts(records: list[dict[str, Any]]) -> str:
    counts: dict[str, int] = {}
    for record in records:
        counts[record["status"]] = counts.get(record["status"], 0) + 1
    return ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))


def build_sections(run: Run, summaries: list[ProblemSummary]) -> list[Section]:
    """The summary as sections of text and tables, rendered to Markdown and HTML alike."""
    env = run.environment
    bandwidth = f"{run.bandwidth / 1e9:.1f} GB/s" if run.bandwidth else "not measured"
    head = Section("Run", paragraphs=[
        f"Run `{run.meta.get('run_id', run.path.name)}` of sweep "
        f"`{run.meta.get('sweep_name', '?')}` ({run.meta.get('sweep_file', '?')}), started "
        f"{run.meta.get('started', '?')}.",
        f"Device {env.get('device_kind_raw') or env.get('device_kind')} "
        f"(`{env.get('device_kind')}`, platform {run.platform}, host {env.get('host', '?')}); "
        f"measured read bandwidth {bandwidth}; {versions_text(run)}.",
        f"{len(run.records)} measurements: {_status_counts(run.records)}. "
        f"Winners are chosen per table key with noise {run.noise:.0%} (a default this close "
        f"to the fastest is kept).",
    ])
    if run.unfinished:
        head.paragraphs.insert(0, "**This run is unfinished** (still running, or interrupted "
                                  "before it wrote table.json): the report covers the "
                                  "measurements logged so far.")
    sections = [head]
    for op in sorted({s.op for s in summaries}):
        rows = []
        notes = []
        for s in (s for s in summaries if s.op == op):
            c = s.counts
            failures = [c["tried"], c["skipped"], c["wrong"], c["compile_error"], c["timeout"],
                        c["error"] + c["crashed"]]
            w = s.winner
            if w is None:
                winner_cells = ["no correct config", "", "—", "—", "—", "—", "—"]
            else:
                winner_cells = [
                    w["variant"], config_text(w.get("config") or {}),
                    f"{w['median_us']:.1f} ({w['p20_us']:.1f}–{w['p80_us']:.1f})",
                    _number(w.get("fraction_of_floor"), 2), _number(s.gigabytes_per_s, 1),
                    _number(w.get("speedup_vs_default"), 2), _number(w.get("speedup_vs_reference"), 2),
                ]
                chosen = (s.entry.source.get("chosen") if s.entry else None) or ""
                if chosen and chosen != "fastest ok config":
                    notes.append(f"{s.label}: {chosen}")
            rows.append([s.label] + winner_cells + [str(n) for n in failures])
        table = Table(["problem", "winner", "config", "median µs (p20–p80)", "× floor",
                       "GB/s", "vs default", "vs reference", "tried", "skipped", "wrong",
                       "compile failed", "timed out", "errors"], rows)
        keys = sorted({key_text(s.key) for s in summaries if s.op == op and s.key})
        sections.append(Section(
            f"{op}", paragraphs=[
                "Per problem: the winning variant and config, its median time, its time over "
                "the memory-bandwidth floor (1.00 = at the floor), achieved bandwidth, its "
                "speedup over its variant's default config and over the reference (same "
                "round), and what happened to the configs of this problem.",
                "Table keys: " + "; ".join(f"`{k}`" for k in keys) + "."],
            tables=[table], bullets=notes))
    wrong, others = worst_failures(run)
    failures = Section("Worst failures")
    if not wrong and not others:
        failures.paragraphs.append("No config failed.")
    if wrong:
        failures.paragraphs.append("Wrong results (largest relative error first):")
        failures.tables.append(Table(
            ["problem", "variant", "config", "relative error", "max abs error", "reason"],
            [[r.get("problem", r["problem_id"]), r["variant"], config_text(r.get("config") or {}),
              _number(r.get("relative_error"), 3), _number(r.get("max_abs_error"), 3),
              _short(r.get("reason") or "", 100)] for r in wrong]))
    if others:
        failures.paragraphs.append("Other failures, grouped by reason (most frequent first):")
        failures.tables.append(Table(
            ["op", "variant", "status", "count", "reason", "e.g. config"],
            [[g["op"], g["variant"], g["status"], str(g["count"]), _short(g["reason"], 140),
              config_text(g["example"].get("config") or {})] for g in others]))
    sections.append(failures)
    return sections


def _markdown_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(sections: list[Section], images: list[Path]) -> str:
    lines = ["# attnbench sweep report", ""]
    for section in sections:
        lines += [f"## {section.title}", ""]
        for paragraph in section.paragraphs:
            lines += [paragraph, ""]
        for table in section.tables:
            lines.append("| " + " | ".join(table.columns) + " |")
            lines.append("|" + "|".join("---" for _ in table.columns) + "|")
            for row in table.rows:
                lines.append("| " + " | ".join(_markdown_cell(c) for c in row) + " |")
            lines.append("")
        for bullet in section.bullets:
            lines.append(f"- {bullet}")
        if section.bullets:
            lines.append("")
    if images:
        lines += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in images] + [""]
    return "\n".join(lines)


def _inline_code(text: str) -> str:
    """HTML-escapes `text` and turns Markdown's `code` and **bold** into tags."""
    escaped = html.escape(text)
    parts = escaped.split("`")
    escaped = "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))
    parts = escaped.split("**")
    return "".join(f"<strong>{p}</strong>" if i % 2 else p for i, p in enumerate(parts))


_STYLE = """
body { font-family: sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.5em; text-align: left; vertical-align: top; }
th { background: #f0f0f0; }
img { max-width: 100%; border: 1px solid #ddd; margin: 0.5em 0 1.5em; }
code { background: #f5f5f5; padding: 0 0.2em; }
"""


def render_html(sections: list[Section], images: list[Path], title: str) -> str:
    """One self-contained page: the summary's tables and the plots embedded as data URIs."""
    body = [f"<h1>{html.escape(title)}</h1>"]
    for section in sections:
        body.append(f"<h2>{html.escape(section.title)}</h2>")
        body += [f"<p>{_inline_code(p)}</p>" for p in section.paragraphs]
        for table in section.tables:
            body.append("<table><tr>" + "".join(f"<th>{html.escape(c)}</th>"
                                                for c in table.columns) + "</tr>")
            body += ["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
                     for row in table.rows]
            body.append("</table>")
        if section.bullets:
            body.append("<ul>" + "".join(f"<li>{_inline_code(b)}</li>" for b in section.bullets)
                        + "</ul>")
    if images:
        body.append("<h2>Plots</h2>")
    for image in images:
        data = base64.b64encode(image.read_bytes()).decode("ascii")
        body.append(f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(image.stem)}">'
                    f"<figcaption>{html.escape(image.name)}</figcaption></figure>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>\n"
            + "\n".join(body) + "\n</body></html>\n")


# ---- The command -----------------------------------------------------------------------------


@dataclasses.dataclass
class ReportResult:
    out: Path
    files: list[Path]
    notes: list[str]  # what the reader should know: unfinished run, plots left out


def write_report(run_dir: Path, out: Path | None = None, echo: Echo = print) -> ReportResult:
    """Writes summary.md, the plots and index.html into `out` (default RUN_DIR/report)."""
    run = load_run(run_dir)
    out = Path(out) if out is not None else Path(run_dir) / "report"
    out.mkdir(parents=True, exist_ok=True)
    summaries = summarize_problems(run)
    notes = []
    if run.unfinished:
        notes.append(f"{run_dir} is unfinished (still running, or interrupted; no up-to-date "
                     f"{run_files.TABLE_FILE}): reporting the {len(run.records)} measurements "
                     f"logged so far")
    images: list[Path] = []
    if not any(r["status"] == "ok" for r in run.records):
        notes.append("no config ran correctly (" + _status_counts(run.records) + "): no plots; "
                     "summary.md lists the failures")
    else:
        images += plot_sorted_times(run, summaries, out)
        heatmaps, left_out = plot_heatmaps(run, out)
        notes += left_out
        if not heatmaps:
            notes.append("no heatmap: no variant had two tunables with several correct values")
        images += heatmaps
        for plot in (plot_bandwidth, plot_speedup):
            path = plot(run, summaries, out)
            if path is None:
                notes.append(f"no {plot.__name__.removeprefix('plot_')} plot: no problem has a "
                             f"winner with the figures it needs")
            else:
                images.append(path)
    sections = build_sections(run, summaries)
    if notes:
        sections.insert(1, Section("Notes", bullets=notes))
    summary = out / "summary.md"
    summary.write_text(render_markdown(sections, images), encoding="utf-8")
    index = out / "index.html"
    title = f"attnbench report: {run.meta.get('run_id', Path(run_dir).name)}"
    index.write_text(render_html(sections, images, title), encoding="utf-8")
    for note in notes:
        echo(f"note: {note}")
    return ReportResult(out, [summary, index] + images, notes)
