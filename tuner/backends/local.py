"""The local backend: the problems one after another, each in a fresh worker process on this
host, its configs one at a time."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..measure import processes, worker
from ..plan import space
from ..plan.planning import ProblemPlan
from ..progress import SweepProgress
from .state import KindRun, RunState, base_record


def run_problem(state: RunState, item: ProblemPlan, progress: SweepProgress) -> None:
    timing = state.spec.timing
    label = item.problem.label
    tolerance = state.tolerance(item)
    bandwidth = state.environment.get("read_bandwidth_bytes_per_s")
    current: processes.Worker | None = None
    setup_failure: str | None = None
    state.record_skips(item, progress)
    round_candidates: list[space.Candidate] = []
    try:
        for round_index in range(space.round_count(state.spec.search)):
            round_candidates = state.round_candidates(item, round_index, round_candidates)
            repeats = space.round_repeats(state.spec.search, timing, round_index)
            if round_index > 0:
                progress.grow(sum(
                    1 for c in round_candidates
                    if base_record(state.run, item, c, round_index, repeats)["id"]
                    not in state.done))
            for candidate in round_candidates:
                record = base_record(state.run, item, candidate, round_index, repeats)
                if record["id"] in state.done:
                    continue
                if setup_failure is None and (current is None or not current.alive):
                    current = processes.Worker(item.problem, item.seed, tolerance, bandwidth)
                    setup_failure = current.wait_ready(timing.setup_timeout_s)
                    if setup_failure:
                        state.echo(f"\n{label}: {setup_failure}")
                if setup_failure:
                    record.update(status="crashed", reason=setup_failure)
                else:
                    task = worker.Task(worker.VariantRef.of(candidate.variant),
                                       candidate.config, timing.warmup, repeats,
                                       timing.max_seconds, timer=timing.timer,
                                       cache=timing.cache)
                    record["worker_pid"] = current.process.pid
                    record.update(current.measure(task, timing.timeout_s))
                state.record(record, progress, label)
    finally:
        if current is not None:
            current.stop()


def run(state: RunState, plans: list[ProblemPlan], progress: SweepProgress) -> None:
    for item in plans:
        run_problem(state, item, progress)


class LocalSession:
    """This host, its first device: nothing to start or stop."""

    def __enter__(self) -> LocalSession:
        return self

    def __exit__(self, *exc) -> None:
        pass

    def probe(self, wanted, measure_bandwidth: bool) -> list[dict[str, Any]]:
        # `wanted` is checked by the caller, whose message names this one device.
        return [processes.probe_environment(measure_bandwidth=measure_bandwidth)]

    def run(self, runs: list[KindRun], progress: SweepProgress,
            finished: Callable[[KindRun], None] | None = None) -> None:
        """Each kind's run in turn (this host has one kind); `finished` after each."""
        for kind_run in runs:
            run(kind_run.state, kind_run.plans, progress)
            if finished is not None:
                finished(kind_run)
