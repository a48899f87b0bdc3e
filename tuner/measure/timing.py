"""Timing a compiled call: warm-up, repeats, median with 20th/80th percentiles.

Compile time is never included: callers pass an already compiled function. When several
input sets are given, calls rotate through them so that a problem small enough to sit in
cache is not timed hot on the same buffers every repeat.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

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
    max_seconds: float | None = None, carry: Callable[[tuple, Any], tuple] | None = None,
) -> Timing:
    """Times `compiled(*inputs)` for inputs rotating over `input_sets`.

    Runs `warmup` untimed calls, then `repeats` timed ones; stops early (after at least 3)
    once `max_seconds` of timed calls have passed. `carry(inputs, result)`, when given,
    makes the inputs of that set's next call (a call that donates an input and returns it
    updated, like a cache written in place, consumes the one it was given).
    """
    if not input_sets:
        raise ValueError("input_sets must hold at least one tuple of inputs")
    input_sets = list(input_sets)

    def call(index: int) -> None:
        inputs = input_sets[index % len(input_sets)]
        result = jax.block_until_ready(compiled(*inputs))
        if carry is not None:
            input_sets[index % len(input_sets)] = carry(inputs, result)

    for i in range(warmup):
        call(i)
    samples = []
    spent = 0.0
    for i in range(repeats):
        began = time.perf_counter()
        call(i)
        elapsed = time.perf_counter() - began
        samples.append(elapsed * 1e6)
        spent += elapsed
        if max_seconds is not None and spent > max_seconds and len(samples) >= 3:
            break
    p20, median, p80 = np.percentile(samples, [20, 50, 80])
    return Timing(float(median), float(p20), float(p80), len(samples))
