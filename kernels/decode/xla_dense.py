"""decode_attention as one dense XLA computation over the whole cache, masked.

Every position of every row is read and scored, then masked; there is no loop and no
skipping, so its cost is the full cache whatever the lengths. What it tunes is how the two
contractions are written, which on XLA's CPU backend changes the time several-fold for the
same arithmetic: the layout the q.k and p.v products are expressed in, and whether the
cache is widened to float32 before the products or accumulated in float32 by the dot.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from .. import softmax
from .inputs import DecodeArgs, DecodeShape
from ..softmax import soft_cap
from ..tunables import KernelConfig, one_of, tunable
from ..variant import Variant

CONTRACTIONS = ("head_major_dot", "sequence_major_dot", "fused_reduce")
PRECISIONS = ("dot_accumulates_f32", "upcast_first")
WEIGHT_DTYPES = ("float32", "cache")


@dataclasses.dataclass(frozen=True)
class XlaDenseConfig(KernelConfig):
    contraction: str = tunable(
        "head_major_dot", CONTRACTIONS, one_of(*CONTRACTIONS),
        "head_major_dot: transpose the cache to [B, Hkv, S, D] and use batched dots; "
        "sequence_major_dot: dots over the cache layout as is (XLA picks the copies); "
        "fused_reduce: elementwise products reduced over D (q.k) and S (p.v)")
    precision: str = tunable(
        "dot_accumulates_f32", PRECISIONS, one_of(*PRECISIONS),
        "dot_accumulates_f32: products of the cache dtype accumulated in float32 "
        "(preferred_element_type); upcast_first: widen key/value to float32 before the dots")
    weight_dtype: str = tunable(
        "float32", WEIGHT_DTYPES, one_of(*WEIGHT_DTYPES),
        "dtype of the softmax weights in the p.v product: float32, or rounded to the cache "
        "dtype (half the bytes for the weights, one more rounding)")

    def invalid_reason(self, shape: DecodeShape) -> str | None:
        if self.contraction == "fused_reduce" and self.precision != "upcast_first":
            return "fused_reduce multiplies elementwise, so it needs precision='upcast_first'"
        return None


def heuristic(shape: DecodeShape) -> XlaDenseConfig:
    """Measured best on a 2-core CPU for B=8, S=8192, Hq=32, Hkv=8, D=128 bfloat16."""
    return XlaDenseConfig()


def decode_attention_dense(args: DecodeArgs, config: XlaDenseConfig, *,
                           interpret: bool = False) -> jax.Array:
    """decode_attention over the whole cache, masked. Returns f32 [B, Hq, D]."""
    del interpret  # plain XLA runs natively everywhere
    batch, q_heads, head_dim = args.query.shape
    _, max_len, kv_heads, _ = args.key.shape
    group = q_heads // kv_heads
    key, value = args.key, args.value
    if config.precision == "upcast_first":
        key, value = key.astype(jnp.float32), value.astype(jnp.float32)
        query = args.query.astype(jnp.float32)
    else:
        query = args.query.astype(key.dtype)
    query = query.reshape(batch, kv_heads, group, head_dim)
    accumulate = {"preferred_element_type": jnp.float32}

    if config.contraction == "head_major_dot":
        key = jnp.swapaxes(key, 1, 2)  # [B, Hkv, S, D]
        value = jnp.swapaxes(value, 1, 2)
        scores = jnp.einsum("bhgd,bhsd->bhgs", query, key, **accumulate)
    elif config.contraction == "sequence_major_dot":
        scores = jnp.einsum("bhgd,bshd->bhgs", query, key, **accumulate)
    else:
        scores = jnp.sum(key[:, :, :, None, :] * query[:, None], axis=-1)  # [B, S, Hkv, G]
        scores = jnp.transpose(scores, (0, 2, 3, 1))
    scores = soft_cap(scores * args.softmax_scale, args.logits_soft_cap)

    end = jnp.clip(args.sequence_end, 0, max_len)[:, None]
    low = jnp.clip(args.sequence_start, 0, max_len)[:, None]
    if args.window_left is not None:
        low = jnp.maximum(low, end - 1 - args.window_left)
    position = jnp.arange(max_len)[None, :]
    valid = ((position >= low) & (position < end))[:, None, None, :]  # [B, 1, 1, S]
    # 0 * NaN is NaN: garbage in a masked value slot must be dropped, not just weighted 0.
    head_major = config.contraction == "head_major_dot"  # value [B, Hkv, S, D], else [B, S, Hkv, D]
    value = jnp.where(valid[:, 0, :, :, None] if head_major else valid[:, 0, 0, :, None, None],
                      value, 0)

    def weighted_values(weights):
        if config.weight_dtype == "cache":
            weights = weights.astype(args.value.dtype)
        if config.contraction == "head_major_dot":
            return jnp.einsum("bhgs,bhsd->bhgd", weights.astype(value.dtype), value,
                              **accumulate)
        if config.contraction == "sequence_major_dot":
            return jnp.einsum("bhgs,bshd->bhgd", weights.astype(value.dtype), value,
                              **accumulate)
        weights = jnp.transpose(weights.astype(jnp.float32), (0, 3, 1, 2))  # [B, S, Hkv, G]
        return jnp.sum(weights[..., None] * value[:, :, :, None, :], axis=1)

    # The whole row is one block: its state, normalized.
    row = softmax.block(scores, valid, weighted_values)
    sinks = None if args.sinks is None else args.sinks.reshape(1, kv_heads, group)
    return softmax.finalize(row, sinks).reshape(batch, q_heads, head_dim)


VARIANT = Variant(
    name="xla_dense",
    op="decode",
    platforms=("cpu", "gpu", "tpu"),
    interpretable=True,
    features=frozenset({"sliding_window", "logits_soft_cap", "sinks"}),
    config_class=XlaDenseConfig,
    kernel=decode_attention_dense,
    heuristic=heuristic,
    description="XLA one-shot over the whole cache, masked (no skipping); tunes how the "
                "q.k and p.v contractions are written",
)
