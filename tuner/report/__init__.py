"""The report of one sweep run: summary.md, four kinds of PNG plots, and index.html.

    RUN_DIR --(load)--> measurements (a DataFrame) with derived figures, winners per key
            --(summary)--> per problem: winner, times, counts; worst failures
            --(plots)--> times_*.png, heatmap_*.png, bandwidth.png, speedup.png,
                         peers.png (runs that measured peers)
            --(sections, render)--> summary.md, index.html (plots embedded: readable offline)

`attnbench compare` lives beside it, in `compare`: it reads run folders the same way.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

from ..results import records as run_files
from .load import ReportError, Run, load_run
from .plots import plot_bandwidth, plot_heatmaps, plot_peers, plot_sorted_times, plot_speedup
from .render import Section, render_html, render_markdown
from .sections import build_sections
from .summary import status_counts_text, summarize_problems

__all__ = ["ReportError", "ReportResult", "Run", "load_run", "write_report"]

Echo = Callable[[str], None]


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
    measurements = run.measurements
    notes = []
    if run.unfinished:
        notes.append(f"{run_dir} is unfinished (still running, or interrupted; no up-to-date "
                     f"{run_files.TABLE_FILE}): reporting the {len(measurements)} measurements "
                     f"logged so far")
    images: list[Path] = []
    if not (measurements["status"] == "ok").any():
        notes.append(f"no config ran correctly ({status_counts_text(measurements)}): no plots; "
                     f"summary.md lists the failures")
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
        peers = plot_peers(run, summaries, out)
        if peers is not None:  # only runs that measured peers have one
            images.append(peers)
    sections = build_sections(run, summaries)
    if notes:
        sections.insert(1, Section("Notes", bullets=notes))
    summary = out / "summary.md"
    summary.write_text(render_markdown(sections, images), encoding="utf-8")
    index = out / "index.html"
    index.write_text(render_html(sections, images, f"attnbench report: {run.run_id}"),
                     encoding="utf-8")
    for note in notes:
        echo(f"note: {note}")
    return ReportResult(out, [summary, index] + images, notes)
