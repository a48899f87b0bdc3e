"""Input sets for timed calls: rotated copies, and array keywords passed as traced inputs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
import numpy as np

from attnbench.kernels.random_inputs import normal


def rotated_input_sets(args: tuple, seed: int, count: int) -> list[tuple]:
    """`count` positional-argument tuples of identical shapes for timing with rotation.

    The first is `args` (from `make_inputs(seed)`); the others keep its lengths and page
    table (so one compiled call runs them all) and draw fresh query and cache values, so a
    problem that fits in cache is not timed on the same hot buffers every call.
    """
    sets = [tuple(args)]
    for index in range(1, count):
        rng = np.random.default_rng([seed, index])
        sets.append(tuple(
            normal(rng, tuple(a.shape), jnp.dtype(a.dtype).name)
            if jnp.issubdtype(a.dtype, jnp.floating) else a
            for a in args
        ))
    return sets


def with_array_keywords_last(function: Callable | None, positional: int, kwargs: dict[str, Any]
                             ) -> tuple[Callable, tuple]:
    """`function` taking its array keyword arguments (sinks) as trailing positional inputs.

    A jitted call then traces them as inputs instead of baking them in as constants, so one
    compiled call serves every input set. Returns (call, trailing inputs):
    ``call(*args, *trailing) == function(*args, **kwargs)`` for `positional` args.
    """
    names = [name for name, value in kwargs.items() if hasattr(value, "shape")]
    fixed = {name: value for name, value in kwargs.items() if name not in names}

    def call(*inputs):
        arrays = dict(zip(names, inputs[positional:]))
        return function(*inputs[:positional], **fixed, **arrays)

    return call, tuple(kwargs[name] for name in names)


def donation(operator, positional: int) -> tuple[tuple[int, ...], Callable | None]:
    """(donate_argnums, carry) for timing `operator`'s compiled calls: the arguments it
    returns updated are donated, and `carry` puts each call's updated ones back in place of
    the consumed inputs (timing.time_call)."""
    donated = tuple(i for i in operator.donated_args if i < positional)
    if not donated:
        return (), None

    def carry(inputs: tuple, result: Any) -> tuple:
        _, extras = operator.split_result(result)
        fresh = list(inputs)
        for position, value in zip(donated, extras):
            fresh[position] = value
        return tuple(fresh)

    return donated, carry


def copied(inputs: tuple, positions: tuple[int, ...]) -> tuple:
    """`inputs` with those positions copied, so a call that donates them leaves the
    originals intact."""
    return tuple(jnp.array(a, copy=True) if i in positions else a for i, a in enumerate(inputs))
