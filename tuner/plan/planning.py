"""Planning a sweep: each problem of the file (or of this shard) with its candidate configs."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

from attnbench.kernels.platform import lowering_for

from . import space
from .sweep_file import SweepProblem, SweepSpec


def shard_problems(problems: tuple[SweepProblem, ...], shard: tuple[int, int]) -> list[SweepProblem]:
    """Problem i goes to shard i % N: deterministic, and a problem's configs stay together
    (its defaults and reference are the baselines of its speedups)."""
    index, count = shard
    return [p for i, p in enumerate(problems) if i % count == index]


@dataclasses.dataclass
class ProblemPlan:
    problem: SweepProblem
    shape: Any
    seed: int
    candidates: list[space.Candidate]

    @property
    def runnable(self) -> list[space.Candidate]:
        return [c for c in self.candidates if c.skip_reason is None]


def plan(spec: SweepSpec, shard: tuple[int, int], platform: str,
         device_kind: str | None = None) -> list[ProblemPlan]:
    """The problems of this shard with their candidate configs.

    Validity rules that depend on the target (a TPU's VMEM budget) judge for `device_kind`
    on `platform` when given: the parent knows the device only from a worker's probe and
    must not ask JAX itself.
    """
    target = lowering_for(platform, device_kind) if device_kind else contextlib.nullcontext()
    plans = []
    with target:
        for problem in shard_problems(spec.problems, shard):
            seed = space.problem_seed(spec, problem)
            shape = problem.problem.shape(seed)
            plans.append(ProblemPlan(problem, shape, seed,
                                     space.problem_candidates(spec, problem, shape, platform)))
    return plans


def describe_plan(spec: SweepSpec, plans: list[ProblemPlan]) -> list[str]:
    """What a dry run prints: per problem and variant, configs to run and skipped."""
    lines = []
    runs = skips = 0
    for item in plans:
        lines.append(f"{item.problem.label}  [{space.problem_id(item.problem)}]")
        by_variant: dict[str, list[int]] = {}
        for candidate in item.candidates:
            counts = by_variant.setdefault(candidate.variant.name, [0, 0])
            counts[candidate.skip_reason is not None] += 1
        for name, (run, skipped) in by_variant.items():
            reasons = {c.skip_reason for c in item.candidates
                       if c.variant.name == name and c.skip_reason}
            note = f"  (e.g. {sorted(reasons)[0]})" if reasons else ""
            lines.append(f"  {name:<20} {run:4d} to run, {skipped:4d} skipped{note}")
            runs += run
            skips += skipped
    rounds = space.round_count(spec.search)
    extra = ""
    if rounds > 1:
        later = sum(max(1, round(len(p.runnable) * spec.search.keep ** r))
                    for p in plans for r in range(1, rounds))
        extra = f" + about {later} in later halving rounds"
    lines.append(f"total: {len(plans)} problems, {runs} configs to run{extra}, "
                 f"{skips} skipped after pruning")
    return lines


