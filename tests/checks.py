"""Checking a variant against the reference, shared by the variant test modules."""

from __future__ import annotations

import functools
import importlib

import jax

from attnbench.kernels.registry import get_operator
from attnbench.tuner.measure.accuracy import extras_problems, judge



def require_test_extra(*modules: str) -> None:
    """Imports `modules` or fails the test module that needs them, naming the `test` extra.

    The extra installs every toolchain the suite runs (the Triton interpreter, jax-triton,
    torch, libtpu), so a missing one means a broken install, not an optional feature: the
    GPU kernels' tests must fail then, not skip and leave CI green.
    """
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as error:
            raise ImportError(f"{name} is missing: the tests need the `test` extra "
                              f"(pip install -e '.[test]')") from error


@functools.lru_cache(maxsize=4)
def _reference_result(problem, seed: int):
    """The reference's (output, extra outputs) on `problem`'s inputs of `seed` (deterministic),
    kept for the next variant run on the same inputs: its compile is most of a tiny case."""
    args, kwargs = problem.make_inputs(seed)
    spec = get_operator(problem.op)
    return spec.split_result(
        jax.jit(lambda *a: spec.function(*a, variant="reference", **kwargs))(*args))


def run_and_compare(problem, variant: str, config=None, *, seed: int, interpret: bool = False,
                    jit: bool = True):
    """Runs `variant` (with `config`, or its heuristic default) on fresh inputs of `problem`
    and returns (output, reference, Accuracy). Fails the test if the output is not right."""
    args, kwargs = problem.make_inputs(seed)
    spec = get_operator(problem.op)
    operator = spec.function
    config_dict = None if config is None else dict(config.to_dict() if hasattr(config, "to_dict") else config)

    def call(*a):
        return operator(*a, variant=variant, config=config_dict, interpret=interpret, **kwargs)

    out, extras = spec.split_result(jax.block_until_ready((jax.jit(call) if jit else call)(*args)))
    reference, reference_extras = _reference_result(problem, seed)
    # The sweep's own judgement, padding rows (exact zeros) included, extra outputs (an
    # updated cache) bit for bit.
    accuracy = judge(out, reference, problem.dtype, zero_rows=spec.zero_rows(args),
                     key_ranges=spec.key_ranges(args, kwargs))
    assert accuracy.ok, (
        f"{problem.op}/{variant} config={config_dict} seed={seed} on {problem}: {accuracy.reason}")
    wrong = extras_problems(spec, extras, reference_extras)
    assert not wrong, f"{problem.op}/{variant} config={config_dict} seed={seed}: {wrong}"
    assert out.dtype == args[0].dtype
    return out, reference, accuracy
