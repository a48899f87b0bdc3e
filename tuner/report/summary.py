"""What the report says about a run: per problem its winner, the times and what happened to
its configs; the worst failures; counts per status; the run's date and versions."""

from __future__ import annotations

import dataclasses
import datetime
from typing import Any

import pandas as pd

from attnbench.kernels.table import Entry

from ..results import records as run_files
from ..canonical_json import canonical
from .load import Run, record_of

FAILURE_STATUSES = ("wrong", "compile_error", "error", "timeout", "crashed")
TOP_FAILURES = 10


def candidates(measurements: pd.DataFrame) -> pd.Series:
    """Each measurement's variant and config as one text: what tells a problem's configs
    apart."""
    return pd.Series([canonical([variant, config]) for variant, config
                      in zip(measurements["variant"], measurements["config"])],
                     index=measurements.index, dtype=object)


def latest_per_candidate(measurements: pd.DataFrame) -> pd.DataFrame:
    """Each config of each problem once: its measurement from the last round it was measured
    in (a later record wins a tie), in log order, with its `candidate` text."""
    return (measurements.assign(candidate=candidates(measurements))
            .sort_values("round", kind="stable")
            .drop_duplicates(["problem_id", "candidate"], keep="last")
            .sort_index())


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
    configs: pd.DataFrame  # the latest measurement of each config

    @property
    def gigabytes_per_s(self) -> float | None:
        return achieved_gigabytes_per_s(self.winner)


def achieved_gigabytes_per_s(record: dict[str, Any] | None) -> float | None:
    if not record or not record.get("bytes_moved") or not record.get("median_us"):
        return None
    return record["bytes_moved"] / record["median_us"] / 1e3


def _first_record(rows: pd.DataFrame) -> dict[str, Any] | None:
    return record_of(rows.iloc[0]) if len(rows) else None


def summarize_problems(run: Run) -> list[ProblemSummary]:
    """One summary per problem of the run, in the order the log first names them."""
    from attnbench.kernels import registry

    latest = latest_per_candidate(run.measurements)
    status_counts = (pd.crosstab(latest["problem_id"], latest["status"])
                     .reindex(columns=run_files.STATUSES, fill_value=0))
    configs_of = dict(tuple(latest.groupby("problem_id", sort=False)))
    default_variants = run.meta.get("default_variants", {})
    summaries = []
    for problem_id in run.measurements["problem_id"].unique():
        configs = configs_of[problem_id]
        sample = record_of(configs.iloc[0])
        counts = {status: int(n) for status, n in status_counts.loc[problem_id].items()}
        counts["tried"] = len(configs) - counts["skipped"]
        ok = configs[configs["status"] == "ok"]
        entry = run.winner_of(sample["key"]) if "key" in sample else None
        winner = None
        if entry is not None:
            winner = _first_record(ok[ok["candidate"] == canonical([entry.variant,
                                                                    entry.config])])
        untuned_variant = default_variants.get(
            sample["op"], registry.default_variant_name(sample["op"], run.platform))
        untuned = _first_record(ok[(ok["variant"] == untuned_variant) & ok["is_default"]])
        summaries.append(ProblemSummary(sample["op"], problem_id,
                                        sample.get("problem", problem_id), sample.get("key", {}),
                                        counts, winner, entry, untuned, configs))
    return summaries


def _reason_line(reason: str | None) -> str:
    """The line of a failure's reason that says what went wrong: a traceback's last."""
    lines = (reason or "").strip().splitlines()
    if not lines:
        return ""
    return lines[-1] if lines[0].startswith("Traceback") else lines[0]


def worst_failures(run: Run, limit: int = TOP_FAILURES) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(the wrong configs with the largest errors, the other failures grouped by op, variant,
    status and reason with a `count` and an example `config`, most frequent first)."""
    latest = latest_per_candidate(run.measurements)
    # An error that could not be measured ranks as the largest.
    wrong = (latest[latest["status"] == "wrong"]
             .sort_values("relative_error", ascending=False, na_position="first", kind="stable")
             .head(limit))
    failed = latest[latest["status"].isin(FAILURE_STATUSES) & (latest["status"] != "wrong")]
    others = (failed.assign(reason=failed["reason"].map(_reason_line))
              .groupby(["op", "variant", "status", "reason"], sort=False)
              .agg(count=("candidate", "size"), config=("config", "first"))
              .reset_index()
              .sort_values("count", ascending=False, kind="stable")
              .head(limit))
    return wrong, others


def status_counts_text(measurements: pd.DataFrame) -> str:
    """'3 ok, 1 wrong': how many measurements ended in each status."""
    counts = measurements["status"].value_counts().sort_index()
    return ", ".join(f"{n} {status}" for status, n in counts.items())


def run_date(run: Run) -> str:
    started = run.meta.get("started") or record_of(run.measurements.iloc[0]).get("finished")
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


def _peer_row(who: str, origin: str, record: dict[str, Any] | None) -> dict[str, Any] | None:
    if record is None:
        return None
    return {"who": who, "from": origin, "variant": record["variant"],
            "config": record["config"], "status": record["status"],
            "median_us": record.get("median_us") if record["status"] == "ok" else None,
            "fraction_of_floor": record.get("fraction_of_floor"),
            "relative_error": record.get("relative_error"),
            "reason": record.get("reason") or "",
            "input_conversion": record.get("input_conversion") or ""}


def peer_rows(summary: ProblemSummary) -> list[dict[str, Any]]:
    """A problem's "vs peers" comparison: our winner and untuned default, then each peer's
    default and fastest correct config (or, when none ran correctly, why). Empty when no
    peer was measured on the problem."""
    configs = summary.configs
    if "peer" not in configs or not configs["peer"].notna().any():
        return []
    rows = [_peer_row("ours: winner", "attnbench", summary.winner),
            _peer_row("ours: untuned default", "attnbench", summary.untuned)]
    measured = configs[configs["peer"].notna() & (configs["status"] != "skipped")]
    skipped = configs[configs["peer"].notna() & (configs["status"] == "skipped")]
    for variant in sorted(set(configs.loc[configs["peer"].notna(), "variant"])):
        mine = measured[measured["variant"] == variant]
        if mine.empty:  # every config skipped: the first reason says why
            first = skipped[skipped["variant"] == variant]
            rows.append(_peer_row("peer: not run", str(first["peer"].iloc[0]),
                                  _first_record(first)))
            continue
        origin = str(mine["peer"].iloc[0])
        default = mine[mine["is_default"].astype(bool)]
        rows.append(_peer_row("peer: default", origin,
                              _first_record(default) or _first_record(mine)))
        ok = mine[mine["status"] == "ok"].sort_values("median_us", kind="stable")
        if len(ok):
            rows.append(_peer_row("peer: best", origin, _first_record(ok)))
    return [row for row in rows if row is not None]
