"""The report's PNGs: sorted times per problem, heatmaps over two tunables, achieved
bandwidth against the roofline, and the speedup of tuning against context length.

Every figure is drawn with matplotlib's object-oriented API on the Agg canvas: no pyplot,
no global backend switch in the caller's process.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..canonical_json import canonical
from .load import Run, records_of
from .render import shortened
from .summary import (ProblemSummary, achieved_gigabytes_per_s, peer_rows, run_date,
                      versions_text)

PROBLEMS_PER_FIGURE = 9
MAX_HEATMAPS = 40


def plot_subtitle(run: Run, dtypes: Iterable[str | None]) -> str:
    """device · dtype · date · versions: the line under every plot's title."""
    names = sorted({dtype or "?" for dtype in dtypes}) or ["?"]
    device = run.environment.get("device_kind_raw") or run.environment.get("device_kind", "?")
    return f"{device} · {'/'.join(names)} · {run_date(run)} · {versions_text(run)}"


def _figure(rows: int, columns: int, width: float, height: float):
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
    width = int(figure.get_figwidth() * 13)
    lines = [part for line in text.splitlines() for part in textwrap.wrap(line, width) or [""]]
    figure.suptitle("\n".join(lines), fontsize=9)


def _colors(names: Iterable[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    palette = colormaps["tab10"]
    return {name: palette(i % 10) for i, name in enumerate(sorted(set(names)))}


# ---- Sorted times ----------------------------------------------------------------------------


def _plot_problem_times(axis, summary: ProblemSummary, colors: dict[str, Any]) -> None:
    from matplotlib.ticker import MaxNLocator

    configs = summary.configs
    ok = configs[configs["status"] == "ok"].sort_values("median_us", kind="stable")
    ok = ok.assign(rank=range(1, len(ok) + 1))
    for variant, color in colors.items():
        mine = ok[ok["variant"] == variant]
        if mine.empty:
            continue
        axis.vlines(mine["rank"], mine["p20_us"], mine["p80_us"], color=color, alpha=0.35, lw=1)
        axis.scatter(mine["rank"], mine["median_us"], s=14, color=color, label=variant, zorder=3)
    defaults = ok[ok["is_default"]]
    axis.scatter(defaults["rank"], defaults["median_us"], marker="^", s=70, facecolors="none",
                 edgecolors="black", linewidths=1.2, label="variant default", zorder=4)
    winner = summary.winner
    if winner is not None:
        place = ok.loc[ok["candidate"] == winner["candidate"], "rank"].iloc[0]
        axis.scatter([place], [winner["median_us"]], marker="*", s=200, color="red",
                     edgecolors="black", linewidths=0.6, label=f"winner ({winner['variant']})",
                     zorder=5)
    axis.set_yscale("log")
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.set_xlabel("configs, fastest first (rank)")
    axis.set_ylabel("median time (µs), bars p20–p80")
    axis.set_title(shortened(summary.label, 56), fontsize=9)
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=7, loc="upper left")


def plot_sorted_times(run: Run, summaries: list[ProblemSummary], out: Path) -> list[Path]:
    """Per problem, every correct config's median (p20-p80 bars), fastest first; the winner
    and each variant's default marked. Nine problems per PNG, one set per op."""
    paths = []
    for op in sorted({s.op for s in summaries}):
        chosen = [s for s in summaries if s.op == op and (s.configs["status"] == "ok").any()]
        for page in range(0, len(chosen), PROBLEMS_PER_FIGURE):
            group = chosen[page: page + PROBLEMS_PER_FIGURE]
            columns = min(3, len(group))
            rows = math.ceil(len(group) / columns)
            figure, axes = _figure(rows, columns, 5.2 * columns, 3.8 * rows + 0.8)
            ok = pd.concat([s.configs[s.configs["status"] == "ok"] for s in group])
            colors = _colors(ok["variant"])
            for axis, summary in zip(axes.flat, group):
                _plot_problem_times(axis, summary, colors)
            for axis in list(axes.flat)[len(group):]:
                axis.set_visible(False)
            _title(figure, f"{op}: time of every correct config per problem\n"
                           f"{plot_subtitle(run, ok['dtype'])}")
            suffix = f"_{page // PROBLEMS_PER_FIGURE + 1}" if len(chosen) > PROBLEMS_PER_FIGURE else ""
            paths.append(_save(figure, out / f"times_{op}{suffix}.png"))
    return paths


# ---- Heatmaps --------------------------------------------------------------------------------


def problem_family(record: dict[str, Any]) -> str:
    """Problems that differ only in size (batch, context, lengths) form one family."""
    heads = record.get("model") or (f"Hq{record.get('q_heads')}/Hkv{record.get('kv_heads')}/"
                                    f"D{record.get('head_dim')}")
    features = "+".join(record.get("features") or []) or "no features"
    page = f" page {record['page_size']}" if record.get("page_size") else ""
    return f"{record['op']} {heads} {record.get('dtype')}{page} {features}"


def _tunables(measurements: pd.DataFrame) -> pd.DataFrame:
    """One column per tunable (in the order the configs declare them), one row per
    measurement."""
    return pd.DataFrame(measurements["config"].tolist(), index=measurements.index)


def _sorted_values(values: Iterable) -> list:
    values = set(values)
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return sorted(values)
    return sorted(values, key=str)


def heatmap_axes(measurements: pd.DataFrame) -> tuple[str, str] | None:
    """The two tunables with the most distinct values among correct configs (ties: the
    order the config declares them), or None when fewer than two vary."""
    distinct = _tunables(measurements).map(canonical).nunique()
    varying = distinct[distinct >= 2].sort_values(ascending=False, kind="stable")
    if len(varying) < 2:
        return None
    return varying.index[0], varying.index[1]


def heatmap_grid(measurements: pd.DataFrame, rows_name: str, columns_name: str):
    """(row values, column values, cell values, unit) over the problems measured: the best
    median over the other tunables; one problem: µs; several: the geometric mean over
    problems of time / the variant's best time on that problem."""
    tunables = _tunables(measurements)
    rows = _sorted_values(tunables[rows_name])
    columns = _sorted_values(tunables[columns_name])
    best = (measurements.assign(row=tunables[rows_name], column=tunables[columns_name])
            .groupby(["problem_id", "row", "column"])["median_us"].min())
    problems = best.index.unique("problem_id")
    if len(problems) == 1:
        cells = best.droplevel("problem_id")
        unit = "median time (µs)"
    else:
        relative = best / best.groupby("problem_id").transform("min")
        cells = np.exp(np.log(relative).groupby(level=["row", "column"]).mean())
        unit = f"time / best (×), geomean of {len(problems)} problems"
    grid = cells.unstack("column").reindex(index=rows, columns=columns)
    return rows, columns, grid.to_numpy(dtype=float), unit


def _slug(text: str) -> str:
    kept = "".join(c if c.isalnum() else "-" for c in text.lower())
    return "-".join(part for part in kept.split("-") if part)[:80]


def _best_box(cell: tuple[int, int]):
    from matplotlib.patches import Rectangle

    row, column = cell
    return Rectangle((column - 0.5, row - 0.5), 1, 1, fill=False, edgecolor="red", lw=2)


def _draw_heatmap(rows: list, columns: list, values: np.ndarray, names: tuple[str, str],
                  unit: str):
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
        axis.add_patch(_best_box(np.unravel_index(np.nanargmin(values), values.shape)))
    figure.colorbar(image, ax=axis, label=unit)
    return figure


def plot_heatmaps(run: Run, out: Path) -> tuple[list[Path], list[str]]:
    """Time over two tunables, one PNG per variant and problem family (first round, where
    every config was timed alike). Returns the paths and notes on what was left out."""
    measured = run.measurements
    ok = measured[(measured["status"] == "ok") & (measured["round"] == 0)]
    ok = ok.assign(family=[problem_family(record) for record in records_of(ok)])
    paths, notes = [], []
    for (op, variant, family), measurements in ok.groupby(["op", "variant", "family"]):
        names = heatmap_axes(measurements)
        if names is None:
            continue
        if len(paths) >= MAX_HEATMAPS:
            notes.append(f"heatmap of {op}/{variant} on {family} left out (more than "
                         f"{MAX_HEATMAPS} heatmaps)")
            continue
        rows, columns, values, unit = heatmap_grid(measurements, *names)
        figure = _draw_heatmap(rows, columns, values, names, unit)
        _title(figure, f"{op}/{variant}: {names[0]} × {names[1]} on {family} (each cell: the "
                       f"best over the other tunables; red box: best cell)\n"
                       f"{plot_subtitle(run, measurements['dtype'])}")
        paths.append(_save(figure, out / f"heatmap_{op}_{variant}_{_slug(family)}.png"))
    return paths, notes


# ---- Bandwidth and speedup -------------------------------------------------------------------


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
    axis.set_yticks(places, [shortened(f"{s.label} [{s.winner['variant']}]", 90)
                             for s in chosen], fontsize=8)
    axis.set_xlabel("achieved bandwidth (GB/s) = bytes that must be read / median time")
    axis.grid(True, axis="x", alpha=0.3)
    axis.legend(fontsize=8, loc="lower right")
    _title(figure, "achieved bandwidth of the winner per problem vs the memory roofline\n"
                   f"{plot_subtitle(run, [s.winner.get('dtype') for s in chosen])}")
    return _save(figure, out / "bandwidth.png")


def speedup_points(summaries: list[ProblemSummary]) -> pd.DataFrame:
    """Per problem with a winner and known sizes: op, sequences, context and tuned-over-
    default speedup. Default: the untuned choice (the platform's default variant with its
    default config); where that was not measured, the winning variant's default config."""
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
        if winner.get("sequences") and winner.get("max_len"):
            points.append({"op": summary.op, "sequences": winner["sequences"],
                           "max_len": winner["max_len"], "speedup": speedup,
                           "label": summary.label})
    return pd.DataFrame(points, columns=["op", "sequences", "max_len", "speedup", "label"])


def plot_speedup(run: Run, summaries: list[ProblemSummary], out: Path) -> Path | None:
    """Speedup of the tuned config over the default against context length, one line per
    number of sequences (geometric mean where several problems share both)."""
    points = speedup_points(summaries)
    if points.empty:
        return None
    ops = sorted(points["op"].unique())
    figure, axes = _figure(1, len(ops), 6.0 * len(ops), 4.6)
    for axis, (op, mine) in zip(axes.flat, points.groupby("op")):
        for sequences, line in mine.groupby("sequences"):
            log_speedup = np.log(line["speedup"]).groupby(line["max_len"])
            means = np.exp(log_speedup.mean())
            drawn = axis.plot(means.index, means.to_numpy(), marker="o",
                              label=f"sequences {sequences}")[0]
            spread = line[log_speedup.transform("size") > 1]
            if not spread.empty:
                axis.scatter(spread["max_len"], spread["speedup"], s=10,
                             color=drawn.get_color(), alpha=0.5)
        axis.axhline(1.0, color="grey", lw=1, ls=":")
        axis.set_xscale("log", base=2)
        axis.set_xlabel("context length (tokens, longest sequence)")
        axis.set_ylabel("speedup: default time / tuned time (×)")
        axis.set_title(op, fontsize=10)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=8)
    _title(figure, "speedup of the tuned config over the untuned default\n"
                   f"{plot_subtitle(run, [s.winner.get('dtype') for s in summaries if s.winner])}")
    return _save(figure, out / "speedup.png")


def plot_peers(run: Run, summaries: list[ProblemSummary], out: Path) -> Path | None:
    """Per problem with peers measured: median time of our winner and untuned default beside
    each peer's default and best config (bars), peers that did not run correctly listed
    with their status."""
    compared = [(s, peer_rows(s)) for s in summaries]
    compared = [(s, rows) for s, rows in compared if rows]
    if not compared:
        return None
    height = sum(1.2 + 0.32 * len(rows) for _, rows in compared)
    figure, axes = _figure(len(compared), 1, 12.0, 1.2 + height)
    for axis, (summary, rows) in zip(axes[:, 0], compared):
        places = list(range(len(rows)))[::-1]
        times = [row["median_us"] or 0.0 for row in rows]
        colors = ["tab:blue" if row["from"] == "attnbench" else "tab:orange" for row in rows]
        axis.barh(places, times, color=colors)
        labels = []
        for place, row, time in zip(places, rows, times):
            labels.append(shortened(f"{row['who']}: {row['variant']} ({row['from']})", 70))
            if not time:
                axis.text(0.01, place, row["status"], transform=axis.get_yaxis_transform(),
                          va="center", fontsize=7)
        axis.set_yticks(places, labels, fontsize=7)
        if any(times):
            axis.set_xscale("log")
        axis.set_xlabel("median time (µs); blue: attnbench, orange: peers")
        axis.set_title(shortened(summary.label, 90), fontsize=9)
        axis.grid(True, axis="x", alpha=0.3)
    _title(figure, "vs peers: ours and other projects' kernels on each problem\n"
                   f"{plot_subtitle(run, [s.key.get('dtype') for s, _ in compared])}")
    return _save(figure, out / "peers.png")
