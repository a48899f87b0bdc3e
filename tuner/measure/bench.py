"""`attnbench bench`: time the variants of one operator on one problem against the floor.

A quick, unpersisted look at how close each variant gets to the memory floor; the sweep
(`attnbench sweep`) is the thorough, resumable version that writes tables.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator
from typing import Any

import jax

from attnbench.kernels import lookup, registry
from attnbench.kernels.jax_compat import compile_with_device_events
from attnbench.kernels.platform import current_device_kind, current_platform
from attnbench.kernels.tunables import KernelConfig, sample_configs

from . import roofline
from .accuracy import extras_problems, judge
from .input_sets import copied, donation, rotated_input_sets, with_array_keywords_last
from .kernel_calls import KernelCall
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
    status: str  # "ok", "wrong: <why>", "unsupported: <why>" or "error: ..."
    floor_us: float  # the memory floor
    is_default: bool = False
    peer: str | None = None  # "jax 0.10.2": another project's kernel, at that version
    input_conversion: str = ""  # what was converted once, untimed, for a peer's layout
    source: str = ""  # the auto row's: what kind of choice it is, and where it came from
    compute_floor_us: float = 0.0  # an XLA matmul of the call's flops; 0: not measured

    @property
    def fraction_of_floor(self) -> float:
        return self.timing.median_us / self.floor_us if self.timing else float("inf")

    @property
    def fraction_of_compute_floor(self) -> float:
        if not self.timing or self.compute_floor_us <= 0:
            return float("inf")
        return self.timing.median_us / self.compute_floor_us


def compile_call(op: str, variant: str | None, config: KernelConfig | None, args: tuple,
                 kwargs: dict, device_events: bool = False) -> Callable:
    """The ahead-of-time compiled public operator call for these inputs (compile time
    excluded later), donating the arguments the operator returns updated, with profiler
    events where the platform emits them only on request."""
    operator = registry.get_operator(op)
    config_dict = None if config is None else config.to_dict()

    def call(*arrays):
        return operator.function(*arrays, variant=variant, config=config_dict, **kwargs)

    donated, _ = donation(operator, len(args))
    lowered = jax.jit(call, donate_argnums=donated).lower(*args)
    return (compile_with_device_events(lowered, current_platform()) if device_events
            else lowered.compile())


def _included(variant, variant_names: list[str] | None, peers: bool, platform: str) -> bool:
    """Named variants; otherwise ours that run natively here, and with `peers` every peer
    (those that cannot run here get a row saying why)."""
    if variant_names is not None:
        return variant.name in variant_names
    if variant.peer is not None:
        return peers
    return variant.name != "reference" and platform in variant.platforms


def run_bench(problem, *, variant_names: list[str] | None = None, sample: int = 0,
              repeats: int = 10, seed: int = 0, timer: str = "auto",
              cache: str = "auto", peers: bool = False) -> Iterator[BenchRow]:
    """Yields one row per (variant, config): heuristic default first, then `sample` random.

    `timer` and `cache` as in a sweep file's timing (timing.TimingPolicy.for_device);
    `peers`: also the peer variants (other projects' kernels), each judged and timed the
    same way, their layout conversion (if any) done once per input set before timing."""
    policy = TimingPolicy.for_device(current_platform(), current_device_kind(), timer=timer,
                                     cache=cache,
                                     host_cache_bytes=roofline.last_level_cache_bytes())
    events = policy.timer == "profiler"
    op = problem.op
    args, kwargs = problem.make_inputs(seed)
    shape = problem.shape(seed)
    moved = roofline.bytes_moved(op, args, kwargs)
    floor = roofline.floor_us(moved, roofline.read_bandwidth())
    compute_floor = roofline.compute_floor_us(roofline.flops(op, args, kwargs), problem.dtype)
    operator = registry.get_operator(op)
    donated, carry = donation(operator, len(args))
    _, trailing = with_array_keywords_last(None, len(args), kwargs)
    reference_call = KernelCall(operator, operator.reference, None, len(args), kwargs,
                                output_dtype="float32")
    reference, reference_extras = operator.split_result(
        jax.jit(reference_call.run)(*copied(tuple(args) + trailing, donated)))
    zero_rows, key_ranges = operator.zero_rows(args), operator.key_ranges(args, kwargs)
    input_sets = [args]
    if moved < 4 * roofline.last_level_cache_bytes():
        # Same shapes as `args` (another seed's paged inputs have another page count, which
        # the compiled call would refuse).
        input_sets = rotated_input_sets(args, seed, 3)
    input_sets = [tuple(inputs) + trailing for inputs in input_sets]
    platform = current_platform()

    def judged_and_timed(row, config, build: Callable, timed_sets: list[tuple], *,
                         is_default: bool = False, time_wrong: bool = False) -> BenchRow:
        try:
            compiled = build(timed_sets[0])
            output, extras = operator.split_result(compiled(*copied(timed_sets[0], donated)))
            accuracy = judge(output, reference, problem.dtype,
                             zero_rows=zero_rows, key_ranges=key_ranges)
            wrong_extras = extras_problems(operator, extras, reference_extras)
        except Exception as error:  # noqa: BLE001 -- a failing config is a result
            return row(config.to_dict(), None, float("inf"),
                       f"error: {type(error).__name__}: {error}"[:200], is_default=is_default)
        ok = accuracy.ok and not wrong_extras
        status = "ok" if ok else "wrong: " + (accuracy.reason or "; ".join(wrong_extras))
        if not ok and not time_wrong:
            return row(config.to_dict(), None, accuracy.relative_error, status,
                       is_default=is_default)
        timing = time_call(compiled, [copied(inputs, donated) for inputs in timed_sets],
                           repeats=repeats, policy=policy, bytes_per_call=moved, carry=carry)
        return row(config.to_dict(), timing, accuracy.relative_error, status,
                   is_default=is_default)

    if variant_names is None or AUTO in variant_names:
        # What a call with neither variant= nor config= runs (tables, nearest entry, or the
        # default variant's heuristic), timed as the same compiled call a user gets.
        choice = lookup.choose(shape, platform=platform)
        row = functools.partial(BenchRow, f"{AUTO}:{choice.variant.name}", floor_us=floor,
                                compute_floor_us=compute_floor,
                                source=f"{choice.kind}: {choice.source}")
        yield judged_and_timed(
            row, choice.config,
            lambda inputs: compile_call(op, None, None, inputs, kwargs, events),
            [inputs[:len(args)] for inputs in input_sets])
    for variant in registry.variants(op):
        if not _included(variant, variant_names, peers, platform):
            continue
        origin = None if variant.peer is None else f"{variant.peer.project} {variant.peer.version()}"
        row = functools.partial(BenchRow, variant.name, floor_us=floor,
                                compute_floor_us=compute_floor, peer=origin,
                                input_conversion=variant.conversion)
        unsupported = variant.unsupported_reason(shape, platform, interpret=False)
        if unsupported:
            yield row({}, None, float("inf"), f"unsupported: {unsupported}")
            continue
        configs = [variant.default_config(shape)]
        configs += [c for c in sample_configs(variant.config_class, shape, sample, seed)
                    if c != configs[0]]
        for number, config in enumerate(configs):
            call = KernelCall(operator, variant, config, len(args), kwargs)

            def build(inputs, call=call):
                lowered = jax.jit(call.run, donate_argnums=donated).lower(*inputs)
                return (compile_with_device_events(lowered, platform) if events
                        else lowered.compile())

            try:
                timed_sets = call.timed_input_sets(input_sets)
            except Exception as error:  # noqa: BLE001 -- a failing conversion is a result
                yield row(config.to_dict(), None, float("inf"),
                          f"error: {type(error).__name__}: {error}"[:200],
                          is_default=number == 0)
                continue
            # A wrong peer is timed too: how fast what users run today is, beside how far off
            # it is. It is never a best config (side_by_side).
            yield judged_and_timed(row, config, build, timed_sets, is_default=number == 0,
                                   time_wrong=variant.peer is not None)


def side_by_side(rows: list[BenchRow]) -> list[dict[str, Any]]:
    """Per variant, ours first then peers: its default config's row and its best (fastest
    ok) row, for the comparison tables of `attnbench bench --peers`."""
    by_variant: dict[str, list[BenchRow]] = {}
    for row in rows:
        by_variant.setdefault(row.variant, []).append(row)
    table = []
    for name, own in sorted(by_variant.items(), key=lambda item: item[1][0].peer is not None):
        default = next((r for r in own if r.is_default), own[0])
        correct = [r for r in own if r.timing is not None and r.status == "ok"]
        best = min(correct, key=lambda r: r.timing.median_us) if correct else None
        table.append({"variant": name, "peer": default.peer, "default": default, "best": best,
                      "configs": len(own), "input_conversion": default.input_conversion})
    return table


def _cells(row: BenchRow | None) -> list[str]:
    """status, median us, x floor, relative error (blank where not measured)."""
    if row is None:
        return ["", "", "", ""]
    error = "" if row.relative_error == float("inf") else f"{row.relative_error:.1e}"
    if row.timing is None:
        return [row.status.split(":")[0], "", "", error]
    return [row.status.split(":")[0], f"{row.timing.median_us:.0f}",
            f"{row.fraction_of_floor:.2f}", error]


def side_by_side_markdown(rows: list[BenchRow]) -> list[str]:
    """The comparison as a Markdown table: per variant its default and best correct config,
    with median time, fraction of the memory floor and error against the reference (a wrong
    peer's time is shown, marked wrong); then why a variant did not run or was wrong, and
    which inputs were converted for a peer before timing."""
    lines = ["| variant | from | default | us | x floor | rel err | best | us | x floor "
             "| rel err | best config |",
             "| --- | --- | --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | --- |"]
    notes = []
    for item in side_by_side(rows):
        default, best = item["default"], item["best"]
        config = ", ".join(f"{k}={v}" for k, v in best.config.items()) if best else ""
        lines.append(f"| {item['variant']} | {item['peer'] or 'attnbench'} | "
                     + " | ".join(_cells(default) + _cells(best)) + f" | {config} |")
        if default.status != "ok":
            notes.append(f"{item['variant']}: {default.status}")
        if item["input_conversion"]:
            notes.append(f"{item['variant']}: input converted, not timed: "
                         f"{item['input_conversion']}")
    return lines + ([""] + [f"- {note}" for note in notes] if notes else [])
