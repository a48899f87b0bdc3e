"""Test-only decode variants for the tuner's tests: one that is right, and one per way a
kernel goes bad (wrong numbers, NaN, failing to compile, hanging, killing its process).

They are never in the shipped registry: a test adds them with monkeypatch (see `VARIANTS`),
and a sweep's worker process finds them through their module (worker.VariantRef).
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time

import jax.numpy as jnp

from attnbench.kernels.decode.reference import decode_attention_reference
from attnbench.kernels.tunables import POSITIVE_INT, KernelConfig, one_of, tunable
from attnbench.kernels.variant import Variant

ALL_FEATURES = frozenset({"sliding_window", "logits_soft_cap", "sinks"})


@dataclasses.dataclass(frozen=True)
class GoodConfig(KernelConfig):
    extra_work: int = tunable(0, (0, 1, 2, 3, 4, 5, 6, 7), one_of(*range(64)),
                              "rounds of useless work added to the right answer (slower)")
    block: int = tunable(16, (16, 32, 64), POSITIVE_INT, "checked by the validity rule")

    def invalid_reason(self, shape):
        if self.block > shape.max_len:
            return f"block {self.block} > S {shape.max_len}"
        return None


def good_kernel(args, config, *, interpret=False):
    out = decode_attention_reference(args)
    if config.extra_work:
        noise = jnp.tanh(args.key.astype(jnp.float32))
        for _ in range(config.extra_work * 20):
            noise = jnp.tanh(noise * 1.0001)
        # Adds exactly zero (the sum is finite, tanh being bounded), but XLA does not fold
        # x * 0.0 for floats (x could be NaN), so the work stays and the config is slower.
        out = out + 0.0 * jnp.sum(noise)
    return out


@dataclasses.dataclass(frozen=True)
class WrongConfig(KernelConfig):
    mode: str = tunable("scaled", ("scaled", "nan"), one_of("scaled", "nan"))


def wrong_kernel(args, config, *, interpret=False):
    out = decode_attention_reference(args)
    if config.mode == "nan":
        return out.at[0, 0, 0].set(jnp.nan)
    return out * 1.5


@dataclasses.dataclass(frozen=True)
class EmptyConfig(KernelConfig):
    pass


def compile_error_kernel(args, config, *, interpret=False):
    raise ValueError("this kernel never compiles (test variant)")


def hang_kernel(args, config, *, interpret=False):
    time.sleep(3600)
    return decode_attention_reference(args)


@dataclasses.dataclass(frozen=True)
class CrashConfig(KernelConfig):
    how: str = tunable("exit", ("exit", "segfault"), one_of("exit", "segfault"))


def crash_kernel(args, config, *, interpret=False):
    if config.how == "segfault":
        os.kill(os.getpid(), signal.SIGSEGV)
    os._exit(3)


def _heuristic_good(shape):
    return GoodConfig()


def _heuristic_wrong(shape):
    return WrongConfig()


def _heuristic_empty(shape):
    return EmptyConfig()


def _heuristic_crash(shape):
    return CrashConfig()


def _variant(name, kernel, config_class, heuristic):
    return Variant(name=name, op="decode", platforms=("cpu", "gpu", "tpu"), interpretable=True,
                   features=ALL_FEATURES, config_class=config_class, kernel=kernel,
                   heuristic=heuristic, description="test-only")


GOOD = _variant("test_good", good_kernel, GoodConfig, _heuristic_good)
WRONG = _variant("test_wrong", wrong_kernel, WrongConfig, _heuristic_wrong)
COMPILE_ERROR = _variant("test_compile_error", compile_error_kernel, EmptyConfig, _heuristic_empty)
HANG = _variant("test_hang", hang_kernel, EmptyConfig, _heuristic_empty)
CRASH = _variant("test_crash", crash_kernel, CrashConfig, _heuristic_crash)
VARIANTS = (GOOD, WRONG, COMPILE_ERROR, HANG, CRASH)
BAD_VARIANTS = ("test_wrong", "test_compile_error", "test_hang", "test_crash")
