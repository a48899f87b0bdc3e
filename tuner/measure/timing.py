"""Timing a compiled call: warm-up, repeats, median with 20th/80th percentiles.

Compile time is never included: callers pass an already compiled function. When several
input sets are given, calls rotate through them so that a problem small enough to sit in
cache is not timed hot on the same buffers every repeat.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence

import jax
import numpy as np


@dataclasses.dataclass(frozen=True)
class Timing:
    median_us: float
    p20_us: float
    p80_us: float
    samples: int


def time_call(
    compiled: Callable, input_sets: Sequence[tuple], *, warmup: int = 2, repeats: int = 10,
    max_seconds: float | None = None,
) -> Timing:
    """Times `compiled(*inputs)` for inputs rotating over `input_sets`.

    Runs `warmup` untimed calls, then `repeats` timed ones; stops early (after at least 3)
    once `max_seconds` of timed calls have passed.
    """
    if not input_sets:
        raise ValueError("input_sets must hold at least one tuple of inputs")
    for i in range(warmup):
        jax.block_until_ready(compiled(*input_sets[i % len(input_sets)]))
    samples = []
    spent = 0.0
    for i in range(repeats):
        inputs = input_sets[i % len(input_sets)]
        began = time.perf_counter()
        jax.block_until_ready(compiled(*inputs))
        elapsed = time.perf_counter() - began
        samples.append(elapsed * 1e6)
        spent += elapsed
        if max_seconds is not None and spent > max_seconds and len(samples) >= 3:
            break
    p20, median, p80 = np.percentile(samples, [20, 50, 80])
    return Timing(float(median), float(p20), float(p80), len(samples))
