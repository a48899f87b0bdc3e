"""`attnbench bench`: time the variants of one operator on one problem against the floor.

A quick, unpersisted look at how close each variant gets to the memory floor; the sweep
(`attnbench sweep`) is the thorough, resumable version that writes tables.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import jax

from attnbench.kernels import lookup, registry
from attnbench.kernels.jax_compat import compile_with_device_events
from attnbench.kernels.platform import current_device_kind, current_platform
from attnbench.kernels.tunables import KernelConfig, sample_configs

from . import roofline
from .accuracy import extras_problems, judge
from .input_sets import copied, donation, rotated_input_sets
from ..plan.sweep_file import problem_from_entry
from .timing import Timing, TimingPolicy, time_call

# The benchmark problems: Llama-3-8B heads at batch 8 and 8K context, ragged, as a decode
# batch, a paged decode batch and a paged batch with prefill chunks. Each is (operator,
# problem entry written as in a sweep file, so `bench --set` uses the sweep files' names).
BENCH_PROBLEMS: dict[str, tuple[str, dict[str, Any]]] = {
    "decode": ("decode", {"model": "llama-3-8b", "batch": 8, "context": 8192,
                          "lengths": "uniform", "min_len": 100}),
    "paged": ("paged", {"model": "llama-3-8b", "num_seqs": 8, "context": 8192, "page_size": 16,
                        "lengths": "uniform", "min_len": 100}),
    "paged-mixed": ("paged", {"model": "llama-3-8b", "num_seqs": 8, "context": 8192,
                              "page_size": 16, "lengths": "uniform", "min_len": 600,
                              "prefill_fraction": 0.25, "prefill_chunk": 512}),
    # The paged decode batch again, the new tokens written by the call (compare with "paged").
    "paged-v3": ("paged_v3", {"model": "llama-3-8b", "num_seqs": 8, "context": 8192,
                              "page_size": 16, "lengths": "uniform", "min_len": 100}),
}


# The row of the choice a call makes on its own (`--variant auto`).
AUTO = "auto"


def bench_problem(name: str, overrides: dict[str, Any] | None = None) -> Any:
    """The named bench problem with some of its fields replaced (sweep-file field names).

    Raises ValueError for an unknown name and SweepFileError for a bad field or value.
    """
    if name not in BENCH_PROBLEMS:
        raise ValueError(f"unknown bench problem {name!r}; choose from {list(BENCH_PROBLEMS)}")
    op, entry = BENCH_PROBLEMS[name]
    # The model preset (heads and features) applies first; explicit fields override it.
    entry = {**entry, **(overrides or {})}
    return problem_from_entry(op, entry, where=f"bench {name}").problem


@dataclasses.dataclass(frozen=True)
class BenchRow:
    variant: str
    config: dict
    timing: Timing | None
    relative_error: float
    status: str  # "ok", "wrong: <why>" or "error: ..."
    floor_us: float
    source: str = ""  # the auto row's: what kind of choice it is, and where it came from

    @property
    def fraction_of_floor(self) -> float:
        return self.timing.median_us / self.floor_us if self.timing else float("inf")


def compile_call(op: str, variant: str, config: KernelConfig | None, args: tuple,
                 kwargs: dict, device_events: bool = False) -> Callable:
    """The ahead-of-time compiled operator call for these inputs (compile time excluded
    later), donating the arguments the operator returns updated, with profiler events
    where the platform emits them only on request."""
    operator = registry.get_operator(op)
    config_dict = None if config is None else config.to_dict()

    def call(*arrays):
        return operator.function(*arrays, variant=variant, config=config_dict, **kwargs)

    donated, _ = donation(operator, len(args))
    lowered = jax.jit(call, donate_argnums=donated).lower(*args)
    return compile_with_device_events(lowered, current_platform()) if device_events else lowered.compile()


def run_bench(problem, *, variant_names: list[str] | None = None, sample: int = 0,
              repeats: int = 10, seed: int = 0, timer: str = "auto",
              cache: str = "auto") -> Iterator[BenchRow]:
    """Yields one row per (variant, config): heuristic default first, then `sample` random.

    `timer` and `cache` as in a sweep file's timing (timing.TimingPolicy.for_device)."""
    policy = TimingPolicy.for_device(current_platform(), current_device_kind(), timer=timer,
                                     cache=cache,
                                     host_cache_bytes=roofline.last_level_cache_bytes())
    events = policy.timer == "profiler"
    op = problem.op
    args, kwargs = problem.make_inputs(seed)
    shape = problem.shape(seed)
    moved = roofline.bytes_moved(op, args, kwargs)
    floor = roofline.floor_us(moved, roofline.read_bandwidth())
    operator = registry.get_operator(op)
    donated, carry = donation(operator, len(args))
    reference, reference_extras = operator.split_result(
        compile_call(op, "reference", None, args, kwargs)(*copied(args, donated)))
    zero_rows, key_ranges = operator.zero_rows(args), operator.key_ranges(args, kwargs)
    input_sets = [args]
    if moved < 4 * roofline.last_level_cache_bytes():
        # Same shapes as `args` (another seed's paged inputs have another page count, which
        # the compiled call would refuse).
        input_sets = rotated_input_sets(args, seed, 3)
    platform = current_platform()
    runs = []
    if variant_names is None or AUTO in variant_names:
        # What a call with neither variant= nor config= runs (tables, nearest entry, or the
        # default variant's heuristic), timed as the same compiled call a user gets.
        choice = lookup.choose(shape, platform=platform)
        runs.append((f"{AUTO}:{choice.variant.name}", choice.config, None,
                     f"{choice.kind}: {choice.source}"))
    for variant in registry.variants(op):
        if variant_names is not None and variant.name not in variant_names:
            continue
        if variant_names is None and (variant.name == "reference" or platform not in variant.platforms):
            continue
        configs = [variant.default_config(shape)]
        configs += [c for c in sample_configs(variant.config_class, shape, sample, seed)
                    if c != configs[0]]
        runs += [(variant.name, config, variant.name, "") for config in configs]
    for label, config, variant_name, source in runs:
        try:
            compiled = compile_call(op, variant_name, None if variant_name is None else config,
                                    args, kwargs, events)
            output, extras = operator.split_result(compiled(*copied(args, donated)))
            accuracy = judge(output, reference, problem.dtype,
                             zero_rows=zero_rows, key_ranges=key_ranges)
            wrong_extras = extras_problems(operator, extras, reference_extras)
        except Exception as error:  # noqa: BLE001 -- a failing config is a result
            yield BenchRow(label, config.to_dict(), None, float("inf"),
                           f"error: {type(error).__name__}: {error}"[:200], floor, source)
            continue
        if not accuracy.ok or wrong_extras:
            yield BenchRow(label, config.to_dict(), None, accuracy.relative_error,
                           "wrong: " + (accuracy.reason or "; ".join(wrong_extras)), floor,
                           source)
            continue
        timing = time_call(compiled, [copied(inputs, donated) for inputs in input_sets],
                           repeats=repeats, policy=policy, bytes_per_call=moved,
                           carry=carry)
        yield BenchRow(label, config.to_dict(), timing, accuracy.relative_error,
                       "ok", floor, source)
