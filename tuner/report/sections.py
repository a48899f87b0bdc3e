"""The report's sections: the run, one per operator (a row per problem), the worst
failures. Markdown and HTML are rendered from the same sections."""

from __future__ import annotations

from attnbench.kernels.table import key_text

from .load import Run, records_of
from .render import Section, Table, config_text, number_text, shortened
from .summary import (ProblemSummary, peer_rows, status_counts_text, versions_text,
                      worst_failures)

_PROBLEM_COLUMNS = ["problem", "winner", "config", "median µs (p20–p80)", "× floor", "GB/s",
                    "vs default", "vs reference", "tried", "skipped", "wrong",
                    "compile failed", "timed out", "errors"]


def run_section(run: Run) -> Section:
    env = run.environment
    bandwidth = f"{run.bandwidth / 1e9:.1f} GB/s" if run.bandwidth else "not measured"
    section = Section("Run", paragraphs=[
        f"Run `{run.run_id}` of sweep "
        f"`{run.meta.get('sweep_name', '?')}` ({run.meta.get('sweep_file', '?')}), started "
        f"{run.meta.get('started', '?')}.",
        f"Device {env.get('device_kind_raw') or env.get('device_kind')} "
        f"(`{env.get('device_kind')}`, platform {run.platform}, host {env.get('host', '?')}); "
        f"measured read bandwidth {bandwidth}; {versions_text(run)}.",
        f"{len(run.measurements)} measurements: {status_counts_text(run.measurements)}. "
        f"Winners are chosen per table key with noise {run.noise:.0%} (a default this close "
        f"to the fastest is kept).",
    ])
    if run.unfinished:
        section.paragraphs.insert(0, "**This run is unfinished** (still running, or "
                                     "interrupted before it wrote table.json): the report "
                                     "covers the measurements logged so far.")
    return section


def _problem_row(summary: ProblemSummary) -> list[str]:
    c = summary.counts
    outcomes = [c["tried"], c["skipped"], c["wrong"], c["compile_error"], c["timeout"],
                c["error"] + c["crashed"]]
    w = summary.winner
    if w is None:
        winner_cells = ["no correct config", "", "—", "—", "—", "—", "—"]
    else:
        winner_cells = [
            w["variant"], config_text(w["config"]),
            f"{w['median_us']:.1f} ({w['p20_us']:.1f}–{w['p80_us']:.1f})",
            number_text(w.get("fraction_of_floor"), 2), number_text(summary.gigabytes_per_s, 1),
            number_text(w.get("speedup_vs_default"), 2),
            number_text(w.get("speedup_vs_reference"), 2),
        ]
    return [summary.label] + winner_cells + [str(n) for n in outcomes]


def operator_section(op: str, summaries: list[ProblemSummary]) -> Section:
    """The problems of one operator: a row each, and a note where a default was kept."""
    mine = [s for s in summaries if s.op == op]
    notes = []
    for summary in mine:
        chosen = (summary.entry.source.get("chosen") if summary.entry else None) or ""
        if summary.winner is not None and chosen and chosen != "fastest ok config":
            notes.append(f"{summary.label}: {chosen}")
    keys = sorted({key_text(s.key) for s in mine if s.key})
    return Section(op, paragraphs=[
        "Per problem: the winning variant and config, its median time, its time over "
        "the memory-bandwidth floor (1.00 = at the floor), achieved bandwidth, its "
        "speedup over its variant's default config and over the reference (same "
        "round), and what happened to the configs of this problem.",
        "Table keys: " + "; ".join(f"`{k}`" for k in keys) + "."],
        tables=[Table(_PROBLEM_COLUMNS, [_problem_row(s) for s in mine])], bullets=notes)


def failures_section(run: Run) -> Section:
    wrong, others = worst_failures(run)
    section = Section("Worst failures")
    if wrong.empty and others.empty:
        section.paragraphs.append("No config failed.")
    if not wrong.empty:
        section.paragraphs.append("Wrong results (largest relative error first):")
        section.tables.append(Table(
            ["problem", "variant", "config", "relative error", "max abs error", "reason"],
            [[r.get("problem", r["problem_id"]), r["variant"], config_text(r["config"]),
              number_text(r.get("relative_error"), 3), number_text(r.get("max_abs_error"), 3),
              shortened(r.get("reason") or "", 100)] for r in records_of(wrong)]))
    if not others.empty:
        section.paragraphs.append("Other failures, grouped by reason (most frequent first):")
        section.tables.append(Table(
            ["op", "variant", "status", "count", "reason", "e.g. config"],
            [[g["op"], g["variant"], g["status"], str(g["count"]), shortened(g["reason"], 140),
              config_text(g["config"])] for g in others.to_dict("records")]))
    return section


def _error_text(value: float | None) -> str:
    return "—" if value is None or value != value else f"{value:.1e}"


_PEER_COLUMNS = ["", "from", "variant", "config", "status", "median µs", "× floor",
                 "rel err", "reason"]


def peers_section(summaries: list[ProblemSummary]) -> Section | None:
    """Per problem with peers measured: ours beside each peer's default and best config."""
    tables, notes = [], set()
    for summary in summaries:
        rows = peer_rows(summary)
        if not rows:
            continue
        tables.append(Table(_PEER_COLUMNS, [
            [row["who"], row["from"], row["variant"], config_text(row["config"]), row["status"],
             number_text(row["median_us"], 1), number_text(row["fraction_of_floor"], 2),
             _error_text(row["relative_error"]), shortened(row["reason"], 100)]
            for row in rows], caption=summary.label))
        notes |= {f"{row['variant']}: input converted once per input set, not timed: "
                  f"{row['input_conversion']}" for row in rows if row["input_conversion"]}
    if not tables:
        return None
    return Section("vs peers", paragraphs=[
        "Per problem: our winner and untuned default beside each peer (another project's "
        "kernel, at the version shown) with its default and its fastest correct config, "
        "judged by the same gate against the same reference."], tables=tables,
        bullets=sorted(notes))


def build_sections(run: Run, summaries: list[ProblemSummary]) -> list[Section]:
    """The summary as sections of text and tables, rendered to Markdown and HTML alike."""
    peers = peers_section(summaries)
    return ([run_section(run)]
            + [operator_section(op, summaries) for op in sorted({s.op for s in summaries})]
            + ([peers] if peers else [])
            + [failures_section(run)])
