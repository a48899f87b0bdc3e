"""Input sets for timed calls: rotated copies, and array keywords passed as traced inputs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
import numpy as np



def rotated_input_sets(args: tuple, seed: int, count: int) -> list[tuple]:
    """`count` positional-argument tuples of identical shapes for timing with rotation.

    The first is `args` (from `make_inputs(seed)`); the others keep its lengths and page
    table (so one compiled call runs them all) in fresh buffers, so a problem that fits in
    cache is not timed on the same hot buffers every call. Their float arrays are `args`'
    with the sign of each head-dim channel flipped at random, the same channels in every
    array of a set: every logit q.k is exactly the same, so the timed inputs keep the probe
    keys and the logit statistics the checked run had, and only output channels flip sign.
    """
    sets = [tuple(args)]
    head_dim = args[0].shape[-1]
    for index in range(1, count):
        rng = np.random.default_rng([seed, index])
        signs = rng.choice(np.array([-1.0, 1.0], np.float32), head_dim)
        sets.append(tuple(
            (a * jnp.asarray(signs, a.dtype)).astype(a.dtype)
            if jnp.issubdtype(a.dtype, jnp.floating) and a.shape[-1] == head_dim else a
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
