"""decode_attention in float32: the contract as plainly as possible (variant "reference")."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ..reference import ALL_FEATURES, masked_softmax_attention
from ..softmax import soft_cap
from ..tunables import NoConfig
from ..variant import Variant
from .inputs import DecodeArgs


def decode_attention_reference(args: DecodeArgs, config: NoConfig | None = None, *,
                               interpret: bool = False) -> jax.Array:
    """decode_attention in float32. Returns f32 [B, Hq, D] (the operator casts it)."""
    del config, interpret
    batch, q_heads, head_dim = args.query.shape
    _, max_len, kv_heads, _ = args.key.shape
    group = q_heads // kv_heads
    query = args.query.astype(jnp.float32).reshape(batch, kv_heads, group, head_dim)
    key = args.key.astype(jnp.float32)
    value = args.value.astype(jnp.float32)

    scores = jnp.einsum("bhgd,bshd->bhgs", query, key) * args.softmax_scale
    scores = soft_cap(scores, args.logits_soft_cap)

    start = jnp.clip(args.sequence_start, 0, max_len)[:, None]
    end = jnp.clip(args.sequence_end, 0, max_len)[:, None]
    position = end - 1  # the query sits at the last valid position
    j = jnp.arange(max_len)[None, :]
    valid = (j >= start) & (j < end)
    if args.window_left is not None:
        valid &= j >= position - args.window_left
    valid = valid[:, None, None, :]  # [B, 1, 1, S]

    sinks = None if args.sinks is None else args.sinks.reshape(1, kv_heads, group)
    values = jnp.transpose(value, (0, 2, 1, 3))[:, :, None]  # [B, Hkv, 1, S, D]
    valid = jnp.broadcast_to(valid, scores.shape)
    out = masked_softmax_attention(scores, valid, values, sinks)
    return out.reshape(batch, q_heads, head_dim)


VARIANT = Variant(
    name="reference",
    op="decode",
    platforms=("cpu", "gpu", "tpu"),
    interpretable=True,
    features=ALL_FEATURES,
    config_class=NoConfig,
    kernel=decode_attention_reference,
    heuristic=lambda shape: NoConfig(),
    description="float32 XLA oracle: every logit materialized (slow, obviously right)",
)
