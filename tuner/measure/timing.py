"""Timing a compiled call: warm-up, repeats, median with 20th/80th percentiles.

Compile time is never included: callers pass an already compiled function. Two timers:

- ``profiler``: the device's own clock. The timed calls run inside one profiler session and
  each call's time is its execution's span in the trace (tuner/measure/device_trace.py), so
  a call shorter than its dispatch is not ranked by Python overhead. Default on GPU and TPU.
- ``wall``: ``perf_counter`` around each call and ``block_until_ready``. Default on CPU, where
  the host is the device; also what the profiler timer falls back to (with the reason kept)
  when the trace does not hold exactly the executions made.

Cache state: on a GPU (and TPU v4's CMEM) a buffer of twice the device's cache
(kernels/devices.py) is rewritten before every timed call, so each call starts cold
(``cache: cold``); later TPUs have no cache in front of HBM, so their calls are cold as is. Elsewhere calls rotate through the given input sets, and the record says
``cold`` only where the sets together exceed the cache (``cache_bytes``), else ``warm``.
"""

from __future__ import annotations

import dataclasses
import functools
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from attnbench.kernels.jax_compat import hlo_module_name

from .device_trace import DeviceTraceError, execution_times_us, load_trace

TIMERS = ("auto", "profiler", "wall")
CACHE_MODES = ("auto", "cold", "warm")


@dataclasses.dataclass(frozen=True)
class Timing:
    median_us: float
    p20_us: float
    p80_us: float
    samples: int
    timer: str = "wall"  # the clock the samples come from: "profiler" or "wall"
    cache: str = "warm"  # "cold" or "warm": the cache state each timed call started in
    timer_note: str = ""  # why the asked-for timer was not used, if it was not
    # With the profiler timer: the wall-clock median of the same calls (dispatch included).
    wall_median_us: float | None = None


@dataclasses.dataclass(frozen=True)
class TimingPolicy:
    """How to time on one device (see the module docstring); `for_device` picks defaults."""

    timer: str = "wall"
    flush_bytes: int = 0  # > 0: rewrite a buffer this large before every timed call
    cache_bytes: int = 0  # the cache rotated input sets must exceed to count as cold
    cacheless: bool = False  # the device reads its memory through no cache (TPU v5e-v7x)
    platform: str = "cpu"  # whose trace events the profiler timer reads

    def __post_init__(self):
        if self.timer not in ("profiler", "wall"):
            raise ValueError(f"timer must be 'profiler' or 'wall', got {self.timer!r}")
        if self.flush_bytes < 0 or self.cache_bytes < 0:
            raise ValueError("flush_bytes and cache_bytes must be >= 0")

    @classmethod
    def for_device(cls, platform: str, device_kind: str, *, timer: str = "auto",
                   cache: str = "auto", host_cache_bytes: int = 0) -> TimingPolicy:
        from attnbench.kernels.devices import cache_bytes

        if timer not in TIMERS:
            raise ValueError(f"timer must be one of {TIMERS}, got {timer!r}")
        if cache not in CACHE_MODES:
            raise ValueError(f"cache must be one of {CACHE_MODES}, got {cache!r}")
        if timer == "auto":
            timer = "wall" if platform == "cpu" else "profiler"
        device_cache = cache_bytes(device_kind, platform) if platform != "cpu" else 0
        flush = 2 * device_cache if cache != "warm" and device_cache else 0
        if platform == "cpu":
            flush = 2 * host_cache_bytes if cache == "cold" else 0
        return cls(timer, flush, device_cache or host_cache_bytes,
                   cacheless=platform == "tpu" and not device_cache, platform=platform)


class _CacheFlush:
    """Rewrites a device buffer of `num_bytes` (read and write: all of it passes the cache)."""

    def __init__(self, num_bytes: int):
        self.buffer = jnp.zeros((max(1, num_bytes // 4),), jnp.int32)

        def attnbench_cache_flush(buffer):
            return buffer + 1

        self.step = jax.jit(attnbench_cache_flush, donate_argnums=0)
        self.buffer = jax.block_until_ready(self.step(self.buffer))

    def __call__(self) -> None:
        self.buffer = jax.block_until_ready(self.step(self.buffer))


@functools.lru_cache(maxsize=1)
def _flush_of(num_bytes: int) -> _CacheFlush:
    """One flush buffer per worker, not one per timed config."""
    return _CacheFlush(num_bytes)


def time_call(
    compiled: Callable, input_sets: Sequence[tuple], *, warmup: int = 2, repeats: int = 10,
    max_seconds: float | None = None, policy: TimingPolicy | None = None,
    bytes_per_call: int = 0, carry: Callable[[tuple, Any], tuple] | None = None,
) -> Timing:
    """Times `compiled(*inputs)` for inputs rotating over `input_sets`.

    Runs `warmup` untimed calls, then `repeats` timed ones; stops early (after at least 3)
    once `max_seconds` of timed calls have passed. `policy` (default: wall clock, no flush)
    chooses the timer and cache handling; `bytes_per_call` (the memory one call moves)
    decides whether rotation alone made the calls cold. `carry(inputs, result)`, when
    given, makes the inputs of that set's next call (a call that donates an input and
    returns it updated, like a cache written in place, consumes the one it was given).
    """
    if not input_sets:
        raise ValueError("input_sets must hold at least one tuple of inputs")
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats} and {warmup}")
    policy = policy or TimingPolicy()
    flush = _flush_of(policy.flush_bytes) if policy.flush_bytes else None
    call = _Caller(compiled, input_sets, carry)
    for i in range(warmup):
        call(i)
    if flush is not None or policy.cacheless:
        cache = "cold"
    else:
        rotated = bytes_per_call * len(input_sets)
        cache = "cold" if policy.cache_bytes and rotated > policy.cache_bytes else "warm"
    note = ""
    if policy.timer == "profiler":
        try:
            samples, walls = _profiled(call, repeats, max_seconds, flush, policy.platform)
            return dataclasses.replace(_summary(samples, "profiler", cache, ""),
                                       wall_median_us=float(np.median(walls)))
        except (DeviceTraceError, RuntimeError, ValueError, OSError) as error:
            note = f"profiler timer unavailable, wall clock used: {type(error).__name__}: {error}"
    samples = _wall_clocked(call, repeats, max_seconds, flush)
    return _summary(samples, "wall", cache, note[:500])


class _Caller:
    """Call i of a timing loop: the compiled call on input set i (mod the sets), waited for,
    with `carry` making that set's next inputs from the result."""

    def __init__(self, compiled, input_sets, carry):
        self.compiled, self.input_sets, self.carry = compiled, list(input_sets), carry

    def __call__(self, index: int) -> None:
        slot = index % len(self.input_sets)
        inputs = self.input_sets[slot]
        result = jax.block_until_ready(self.compiled(*inputs))
        if self.carry is not None:
            self.input_sets[slot] = self.carry(inputs, result)


def _wall_clocked(call: _Caller, repeats, max_seconds, flush) -> list[float]:
    samples = []
    spent = 0.0
    for i in range(repeats):
        if flush is not None:
            flush()
        began = time.perf_counter()
        call(i)
        elapsed = time.perf_counter() - began
        samples.append(elapsed * 1e6)
        spent += elapsed
        if max_seconds is not None and spent > max_seconds and len(samples) >= 3:
            break
    return samples


def _profiled(call: _Caller, repeats, max_seconds, flush,
              platform: str) -> tuple[list[float], list[float]]:
    """(device µs, wall µs) of each timed call, the calls run inside one profiler session."""
    module = hlo_module_name(call.compiled)
    walls = []
    with tempfile.TemporaryDirectory(prefix="attnbench-trace-") as folder:
        with jax.profiler.trace(folder, create_perfetto_trace=True):
            spent = 0.0
            for i in range(repeats):
                if flush is not None:
                    flush()
                began = time.perf_counter()
                call(i)
                elapsed = time.perf_counter() - began
                walls.append(elapsed * 1e6)
                spent += elapsed
                if max_seconds is not None and spent > max_seconds and len(walls) >= 3:
                    break
        events = load_trace(folder)
    times, _ = execution_times_us(events, module, len(walls), platform)
    return times, walls


def _summary(samples: list[float], timer: str, cache: str, note: str) -> Timing:
    p20, median, p80 = np.percentile(samples, [20, 50, 80])
    return Timing(float(median), float(p20), float(p80), len(samples), timer, cache, note)
