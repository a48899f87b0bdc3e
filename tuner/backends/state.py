"""The driver's view of one sweep execution: the run folder's log, what it holds, and how a
record is made and written. Both backends measure through it; only it appends to the log."""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from attnbench.kernels.fingerprint import variant_fingerprint
from attnbench.kernels.table import make_key

from ..measure.accuracy import RELATIVE_ERROR_BOUND
from ..plan import space
from ..plan.planning import ProblemPlan
from ..plan.sweep_file import SweepSpec
from ..progress import SweepProgress
from ..results import records as run_files

Echo = Callable[[str], None]


def base_record(run: dict[str, Any], item: ProblemPlan, candidate: space.Candidate,
                round_index: int, repeats: int) -> dict[str, Any]:
    p = item.problem.problem
    shape = item.shape
    record = {
        "id": space.measurement_id(item.problem, candidate.variant.name, candidate.config,
                                   round_index),
        "run_id": run["run_id"], "device_kind": run["device_kind"], "op": item.problem.op,
        "problem_id": space.problem_id(item.problem), "problem": item.problem.label,
        "model": item.problem.model, "max_len": p.max_len, "lengths": p.lengths,
        "min_len": p.min_len, "q_heads": p.q_heads, "kv_heads": p.kv_heads,
        "head_dim": p.head_dim, "dtype": p.dtype, "features": sorted(shape.features),
        "variant": candidate.variant.name, "config": candidate.config,
        "is_default": candidate.is_default, "round": round_index, "repeats": repeats,
        "key": make_key(shape, run["device_kind"]),
        # The code measured, so a table entry can tell when its variant has changed since.
        "fingerprint": variant_fingerprint(candidate.variant),
    }
    origin = candidate.variant.peer
    if origin is not None:  # another project's kernel: which one, at which version
        record["peer"] = f"{origin.project} {origin.version()}"
    record.update(p.record_fields(shape))
    # How many sequences the problem serves, whatever the op calls them (batch, num_seqs):
    # reports plot against it without knowing the op.
    record["sequences"] = p.sequences
    return record


class RunState:
    """The state of one sweep execution over a run folder."""

    def __init__(self, run_dir: Path, spec: SweepSpec, run: dict[str, Any],
                 environment: dict[str, Any], echo: Echo):
        self.run_dir, self.spec, self.run, self.environment = run_dir, spec, run, environment
        self.echo = echo
        self.log = run_files.MeasurementLog(run_dir / run_files.LOG_FILE)
        if self.log.repaired_bytes:
            echo(f"repaired the measurement log: cut a half-written last line "
                 f"({self.log.repaired_bytes} bytes)")
        self.done = {r["id"]: r for r in run_files.read_records(self.log.path)}

    def record(self, record: dict[str, Any], progress: SweepProgress, label: str,
               sync: bool = True) -> None:
        record["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds")
        self.log.append(record, sync=sync)
        self.done[record["id"]] = record
        progress.step(record, label)

    def tolerance(self, item: ProblemPlan) -> float:
        dtype = item.problem.problem.dtype
        return self.spec.tolerances.get(dtype, RELATIVE_ERROR_BOUND[dtype])

    def record_skips(self, item: ProblemPlan, progress: SweepProgress) -> None:
        """The configs pruned before running, recorded once (they need no device)."""
        for candidate in item.candidates:
            if candidate.skip_reason is not None:
                record = base_record(self.run, item, candidate, 0, 0)
                if record["id"] not in self.done:
                    record.update(status=candidate.skip_status, reason=candidate.skip_reason)
                    self.record(record, progress, item.problem.label, sync=False)
        self.log.sync()

    def round_candidates(self, item: ProblemPlan, round_index: int,
                         previous: list[space.Candidate]) -> list[space.Candidate]:
        """Who runs in `round_index`: everything runnable first, then the survivors of the
        round before, judged on what the log holds."""
        if round_index == 0:
            return item.runnable
        problem = space.problem_id(item.problem)
        results = {space.canonical([r["variant"], r["config"]]): r for r in self.done.values()
                   if r.get("problem_id") == problem and r.get("round") == round_index - 1}
        return space.survivors(previous, results, self.spec.search.keep)

    def progress_counts(self, plans: list[ProblemPlan]) -> tuple[int, int]:
        """(total, done) for the progress display."""
        # Later halving rounds join the total as they start (their size depends on results).
        total = sum(len(p.candidates) for p in plans)
        done_round0 = sum(1 for r in self.done.values() if r.get("round", 0) == 0)
        done_later = len(self.done) - done_round0
        return total + done_later, done_round0 + done_later

    def new_progress(self, plans: list[ProblemPlan]) -> SweepProgress:
        return SweepProgress(*self.progress_counts(plans))


@dataclasses.dataclass
class KindRun:
    """One device kind's share of a sweep: the state of its run folder and its problems."""

    state: RunState
    plans: list[ProblemPlan]

    @property
    def kind(self) -> str:
        return self.state.run["device_kind"]


def shared_progress(runs: Sequence[KindRun]) -> SweepProgress:
    """One display counting the configs of every kind's run."""
    counts = [run.state.progress_counts(run.plans) for run in runs]
    return SweepProgress(sum(total for total, _ in counts), sum(done for _, done in counts))
