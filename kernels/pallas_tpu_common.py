"""The in-kernel pieces both Pallas TPU kernels (decode and paged) are built from.

Scores of a query block against a KV block, one online-softmax step over VMEM scratch, the
final normalization with sinks, and what ``interpret=`` means for ``pallas_call``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .sharding import check_interpreter_threads


def interpret_params(interpret: bool):
    """What `interpret=` gives pallas_call: TPU interpret mode on CPU, or compile for TPU.

    Reads past a buffer's logical end raise, so a missing index clamp fails loudly, and
    scratch/VMEM starts as NaN, so a value read before it is written poisons the output.
    """
    if not interpret:
        return False
    from jax.experimental.pallas import tpu as pltpu

    check_interpreter_threads("Pallas' TPU interpret mode")

    return pltpu.InterpretParams(out_of_bounds_reads="raise", uninitialized_memory="nan")


def online_softmax_step(scores, valid, values, m_ref, l_ref, acc_ref) -> None:
    """Folds one block into the running (max, denominator, numerator) in VMEM scratch.

    scores f32 [R, N]; valid bool [R, N]; values [N, D] (any float dtype); m/l f32 [R, 1];
    acc f32 [R, D]. A row with nothing valid so far keeps m = -inf, l = 0, acc = 0.
    """
    masked = jnp.where(valid, scores, -jnp.inf)
    m_prev = m_ref[...]
    m_next = jnp.maximum(m_prev, jnp.max(masked, axis=1, keepdims=True))
    # Shift by 0, not -inf, while a row has seen no valid key: exp(-inf - -inf) is NaN.
    shift = jnp.where(m_next == -jnp.inf, 0.0, m_next)
    weights = jnp.exp(masked - shift)
    rescale = jnp.exp(m_prev - shift)
    l_ref[...] = rescale * l_ref[...] + jnp.sum(weights, axis=1, keepdims=True)
    # P is rounded to the value dtype (bf16 stays on the MXU's native path).
    update = jax.lax.dot_general(
        weights.astype(values.dtype), values, (((1,), (0,)), ((), ())),
        preferred_element_type=jnp.float32)
    acc_ref[...] = rescale * acc_ref[...] + update
    m_ref[...] = m_next


def finish_softmax(m_ref, l_ref, acc_ref, sinks):
    """acc / denominator with the sink joining the denominator; rows with none give zeros.

    sinks: f32 [R, 1] or None. Returns f32 [R, D].
    """
    m = m_ref[...]
    l = l_ref[...]
    acc = acc_ref[...]
    if sinks is not None:
        m_all = jnp.maximum(m, sinks)
        rescale = jnp.exp(jnp.where(m == -jnp.inf, -jnp.inf, m - m_all))
        l = rescale * l + jnp.exp(sinks - m_all)
        acc = rescale * acc
    # Only an exact 0 is an empty row: a NaN from a valid input must reach the output.
    safe = jnp.where(l == 0, 1.0, l)
    return jnp.where(l == 0, 0.0, acc / safe)


def scores_of(query, keys, softmax_scale: float, soft_cap: float | None):
    """softmax_scale * query @ keys^T in f32, soft-capped. query [R, D], keys [N, D]."""
    if query.dtype != keys.dtype:
        query, keys = query.astype(jnp.float32), keys.astype(jnp.float32)
    scores = jax.lax.dot_general(
        query, keys, (((1,), (1,)), ((), ())),
        preferred_element_type=jnp.float32) * softmax_scale
    if soft_cap is not None:
        scores = soft_cap * jnp.tanh(scores / soft_cap)
    return scores
