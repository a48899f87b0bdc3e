"""The search space: which configs of which variants a sweep tries on one problem.

For each variant the file names, the grid is expanded; each combination that breaks a field
rule, the config's ``invalid_reason(shape)`` or one of the file's constraints becomes a
``skipped`` candidate carrying the reason. The variant's heuristic default is always a
candidate, whatever the grid and the strategy. Strategies: the full grid, a seeded random
sample, or successive halving (all valid configs timed briefly, the fastest share kept and
timed longer; the defaults always go through).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import math
import zlib
from typing import Any

from attnbench.kernels.variant import Variant

from . import expressions
from ..canonical_json import canonical
from .sweep_file import Search, SweepProblem, SweepSpec, Timing, VariantPlan

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One config of one variant for one problem; `skip_reason` set when it must not run."""

    variant: Variant
    config: dict[str, Any]  # every tunable, defaults filled in ({} for a config-less variant)
    is_default: bool
    skip_reason: str | None = None
    skip_status: str = "skipped"  # "skipped_static" when `attnbench check` found it cannot launch


def problem_fields(problem: SweepProblem) -> dict[str, Any]:
    return {"op": problem.op, **dataclasses.asdict(problem.problem)}


def problem_id(problem: SweepProblem) -> str:
    """A short stable id of a problem (its fields, not its place in the file)."""
    return hashlib.sha1(canonical(problem_fields(problem)).encode()).hexdigest()[:12]


def problem_seed(spec: SweepSpec, problem: SweepProblem) -> int:
    """The seed of a problem's inputs: fixed per sweep and problem, so a resumed run measures
    the same inputs, and different across problems."""
    return (spec.seed * 1_000_003 + zlib.crc32(problem_id(problem).encode())) % (2**31)


def sample_seed(spec: SweepSpec, shape: Any) -> str:
    """The seed of the configs sampled from a grid: the sweep's seed and the problem's table key
    without its size axes. Problems of one model, dtype, page size and feature set then draw
    the same configs whatever their batch and context, so their times compare config for
    config, and the GPU compile check (where sizes are run-time arguments) builds each
    kernel once for all of them."""
    from attnbench.kernels.registry import get_operator
    from attnbench.kernels.table import make_key

    key = make_key(shape, device_kind="")
    for axis in get_operator(shape.op).size_axes:
        key.pop(axis, None)
    return canonical([spec.seed, key])


def measurement_id(problem: SweepProblem, variant: str, config: dict[str, Any],
                   round_index: int) -> str:
    """What makes a measurement unique in a run: resume skips ids already recorded."""
    text = canonical([problem_id(problem), problem.op, variant, config, round_index])
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def size_names(problem: SweepProblem, shape: Any) -> dict[str, Any]:
    """The values of the problem-size names constraints may use (sweep_file.constraint_names)."""
    names: dict[str, Any] = {
        "q_heads": shape.q_heads, "kv_heads": shape.kv_heads, "head_dim": shape.head_dim,
        "group_size": shape.group_size, "dtype_bytes": _DTYPE_BYTES[shape.dtype],
        "max_len": shape.max_len,
        "has_sliding_window": "sliding_window" in shape.features,
        "has_logits_soft_cap": "logits_soft_cap" in shape.features,
        "has_sinks": "sinks" in shape.features,
    }
    names.update(problem.problem.constraint_sizes(shape))
    return names


def _grid_values(plan: VariantPlan) -> dict[str, list]:
    space = plan.variant.config_class.space()
    if plan.grid is None:
        return {name: list(s["choices"]) for name, s in space.items()}
    return {name: list(plan.grid.get(name, [s["default"]])) for name, s in space.items()}


def _constraint_failure(plan: VariantPlan, config: dict[str, Any],
                        sizes: dict[str, Any]) -> str | None:
    names = {**sizes, **config}
    for constraint in plan.constraints:
        try:
            holds = constraint.evaluate(names)
        except expressions.ExpressionError as error:
            return f"constraint `{constraint.text}` cannot be evaluated: {error}"
        if not holds:
            return f"constraint `{constraint.text}` is false"
    return None


def variant_candidates(plan: VariantPlan, problem: SweepProblem, shape: Any, platform: str,
                       search: Search, seed: str) -> list[Candidate]:
    """The candidates of one variant on one problem: the default first, then the grid
    (sampled when the strategy or the variant asks), skipped combinations last.

    A sample is the valid configs of lowest rank, each config's rank a hash of `seed` (see
    :func:`sample_seed`) and the config alone: two problems whose valid sets overlap draw
    the same configs from the overlap."""
    variant = plan.variant
    reason = variant.unsupported_reason(shape, platform, interpret=False)
    if reason:
        return [Candidate(variant, {}, True, reason)]
    try:
        default = variant.default_config(shape).to_dict()
    except Exception as error:  # noqa: BLE001 -- a broken heuristic is reported, not raised
        return [Candidate(variant, {}, True, f"heuristic default failed: {error}")]
    sizes = size_names(problem, shape)
    grid = _grid_values(plan)
    valid, skipped, seen = [], [], {canonical(default)}
    for values in itertools.product(*grid.values()):
        config = dict(zip(grid, values))
        if canonical(config) in seen:
            continue
        seen.add(canonical(config))
        try:
            built = variant.config_class(**config)
            why = built.invalid_reason(shape) or _constraint_failure(plan, config, sizes)
        except (ValueError, TypeError) as error:
            why = str(error)
        if why:
            skipped.append(Candidate(variant, config, False, why))
        else:
            valid.append(Candidate(variant, config, False))
    samples = plan.samples if plan.samples is not None else (
        search.samples if search.strategy == "random" else None)
    if samples is not None and len(valid) > samples:
        def rank(candidate: Candidate) -> str:
            text = canonical([seed, variant.name, candidate.config])
            return hashlib.sha1(text.encode()).hexdigest()

        chosen = {id(c) for c in sorted(valid, key=rank)[:samples]}
        valid = [c for c in valid if id(c) in chosen]  # grid order, as the full grid runs
    return [Candidate(variant, default, True)] + valid + skipped


def problem_candidates(spec: SweepSpec, problem: SweepProblem, shape: Any,
                       platform: str) -> list[Candidate]:
    """Every candidate of every variant the file names for this problem's operator."""
    seed = sample_seed(spec, shape)
    candidates = []
    for plan in spec.variants.get(problem.op, ()):
        candidates += variant_candidates(plan, problem, shape, platform, spec.search, seed)
    return candidates


# ---- Rounds (successive halving) --------------------------------------------------------------


def round_count(search: Search) -> int:
    return search.rounds if search.strategy == "halving" else 1


def round_repeats(search: Search, timing: Timing, round_index: int) -> int:
    """Timed calls per config in a round: geometric from first_repeats up to timing.repeats."""
    rounds = round_count(search)
    if rounds == 1 or round_index == rounds - 1:
        return timing.repeats
    low, high = min(search.first_repeats, timing.repeats), timing.repeats
    return max(1, round(low * (high / low) ** (round_index / (rounds - 1))))


def survivors(candidates: list[Candidate], results: dict[str, dict[str, Any]],
              keep: float) -> list[Candidate]:
    """The candidates that go on to the next round: the fastest `keep` share of those that
    ran `ok`, plus every variant's default (if it ran ok). The reference goes on only on
    merit: it is slow to time, and speedups over it use its first-round time.

    `results` maps canonical([variant, config]) to the candidate's record of this round.
    """
    timed = []
    for candidate in candidates:
        record = results.get(canonical([candidate.variant.name, candidate.config]))
        if record is not None and record.get("status") == "ok":
            timed.append((record["median_us"], candidate))
    timed.sort(key=lambda item: item[0])
    kept = max(1, math.ceil(len(timed) * keep)) if timed else 0
    chosen = {id(c) for _, c in timed[:kept]}
    chosen |= {id(c) for _, c in timed if c.is_default and c.variant.name != "reference"}
    return [c for _, c in timed if id(c) in chosen]
