"""What every operator's float32 reference shares: the contract's softmax, written plainly.

Each operator's package has its reference (``kernels/<op>/reference.py``, variant
``"reference"``): the oracle every other variant is checked against, written for obviousness,
not speed (every logit is materialized, masks are spelled out, every index it reads with is
clamped). docs/semantics.md is the text they implement.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .inputs import FEATURES
from .softmax import divide_or_zero

# A reference supports every feature of the contract: it is what defines them.
ALL_FEATURES = frozenset(FEATURES)


def masked_softmax_attention(
    scores: jax.Array, valid: jax.Array, values: jax.Array, sinks: jax.Array | None
) -> jax.Array:
    """softmax over the last axis of `scores` restricted to `valid`, applied to `values`.

    scores: f32 [..., N]; valid: bool [..., N]; values: f32 [..., N, D] (same leading axes);
    sinks: f32 broadcastable to scores[..., 0] or None. A row with no valid key gives zeros.
    """
    masked = jnp.where(valid, scores, -jnp.inf)
    row_max = jnp.max(masked, axis=-1)
    if sinks is not None:
        row_max = jnp.maximum(row_max, sinks)
    # A row with no valid key (and no sink) has max -inf; shift by 0 instead so that
    # exp() below gives 0, not NaN.
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    weights = jnp.where(valid, jnp.exp(masked - row_max[..., None]), 0.0)
    denominator = jnp.sum(weights, axis=-1)
    if sinks is not None:
        denominator = denominator + jnp.exp(sinks - row_max)
    # 0 * NaN is NaN: a masked key's value must be dropped, not just given weight 0.
    values = jnp.where(valid[..., None], values, 0.0)
    numerator = jnp.einsum("...n,...nd->...d", weights, values)
    return divide_or_zero(numerator, denominator)
