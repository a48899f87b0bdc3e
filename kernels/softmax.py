"""Partial softmax states and their merge: the arithmetic every XLA variant shares.

A blocked attention kernel never holds a whole row of logits. It holds, per query row, the
state of the keys it has seen so far: their largest logit, the sum of their weights and the
weighted sum of their values, both relative to that largest logit. Two states of the same
row merge into the state of both key sets, in any order and any grouping; the output is the
merged state normalized. Writing this once keeps the variants from drifting apart on the
details that decide correctness: what an empty state is, how a fully masked row avoids NaN,
and where the sinks enter.

The reference (``reference.py``) does not use these pieces: it stays a separate, one-pass
statement of the contract so that it can check them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp


class Partial(NamedTuple):
    """The softmax state of some keys, per query row ([...] is the rows' shape).

    ``total`` and ``out`` are relative to ``shift(row_max)``: the true sums are
    ``total * exp(shift(row_max))`` and ``out * exp(shift(row_max))``.
    """

    row_max: jax.Array  # f32 [...]: the largest valid logit; -inf while there is none
    total: jax.Array  # f32 [...]: sum of exp(logit - shift)
    out: jax.Array  # f32 [..., D]: sum of exp(logit - shift) * value


def empty(shape: tuple[int, ...], head_dim: int) -> Partial:
    """The state of no keys, the identity of `merge`."""
    return Partial(jnp.full(shape, -jnp.inf, jnp.float32), jnp.zeros(shape, jnp.float32),
                   jnp.zeros((*shape, head_dim), jnp.float32))


def shift(row_max: jax.Array) -> jax.Array:
    """What logits are measured from: the row's max, or 0 for a row with no valid key.

    Not -inf there: exp(-inf - -inf) is NaN, and a fully masked row must give zeros.
    """
    return jnp.where(jnp.isfinite(row_max), row_max, 0.0)


def block(scores: jax.Array, valid: jax.Array,
          weighted_values: Callable[[jax.Array], jax.Array], axis: int = -1) -> Partial:
    """The state of one block of keys.

    scores: f32 logits with the keys on `axis`; valid: bool, broadcastable to scores;
    weighted_values: weights (f32, the shape of scores) -> f32 [..., D], the p.v product
    (each variant writes its own contraction). A block with no valid key gives
    (-inf, 0, 0): its weights are exp(-inf) = 0.
    """
    scores = jnp.where(valid, scores, -jnp.inf)
    row_max = jnp.max(scores, axis=axis)
    weights = jnp.exp(scores - jnp.expand_dims(shift(row_max), axis))
    return Partial(row_max, jnp.sum(weights, axis=axis), weighted_values(weights))


def merge(a: Partial, b: Partial) -> Partial:
    """The state of the keys of `a` and of `b` (the same rows)."""
    row_max = jnp.maximum(a.row_max, b.row_max)
    common = shift(row_max)
    # An empty side has row_max -inf, so its factor is exp(-inf) = 0: it adds nothing.
    scale_a = jnp.exp(a.row_max - common)
    scale_b = jnp.exp(b.row_max - common)
    return Partial(row_max, a.total * scale_a + b.total * scale_b,
                   a.out * scale_a[..., None] + b.out * scale_b[..., None])


def merge_axis(states: Partial, axis: int) -> Partial:
    """`merge` of all the states stacked along `axis` of the rows' shape, at once.

    The same arithmetic as merging them pairwise, without a loop over the axis.
    """
    axis = axis % states.row_max.ndim  # `out` has one axis more: count from the front
    row_max = jnp.max(states.row_max, axis=axis)
    scale = jnp.exp(states.row_max - jnp.expand_dims(shift(row_max), axis))
    return Partial(row_max, jnp.sum(states.total * scale, axis=axis),
                   jnp.sum(states.out * scale[..., None], axis=axis))


def finalize(state: Partial, sinks: jax.Array | None = None) -> jax.Array:
    """The attention output f32 [..., D]: `state` normalized, zeros for a row with no key.

    sinks: f32 logits broadcastable to the rows' shape, or None. A sink is a key whose
    value is zero: it joins the denominator and adds nothing to the numerator, so it is
    merged in as exactly that state (logit sink, weight 1, value 0).
    """
    if sinks is not None:
        sinks = jnp.broadcast_to(sinks, state.total.shape).astype(jnp.float32)
        state = merge(state, Partial(sinks, jnp.ones_like(sinks), jnp.zeros_like(state.out)))
    return divide_or_zero(state.out, state.total)


def divide_or_zero(numerator: jax.Array, denominator: jax.Array) -> jax.Array:
    """numerator [..., D] / denominator [...], and 0 where the denominator is 0 (a row that
    attended no key and no sink): the contract's zeros, never NaN.

    Only an exact 0 counts as empty: a NaN denominator (a NaN logit of a valid key) must
    give NaN, as the contract has NaN in valid inputs reach the output.
    """
    empty = denominator == 0
    safe = jnp.where(empty, 1.0, denominator)
    return jnp.where(empty[..., None], 0.0, numerator / safe[..., None])


def soft_cap(scores: jax.Array, cap: float | None) -> jax.Array:
    """cap * tanh(scores / cap): logits squashed into (-cap, cap); None leaves them as is."""
    return scores if cap is None else cap * jnp.tanh(scores / cap)
