"""decode_attention's arguments: checks, normalization and the shape descriptor.

Shapes and dtypes are checked at trace time (errors name the argument); the result is a
normalized bundle the variants compute on (query always rank 3, window as a left extent,
scale resolved) and a hashable shape descriptor that configs and table keys depend on.
Values (lengths) are checked only on request, host side: :func:`value_problems`.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, NamedTuple

import jax
import numpy as np

from ..inputs import (as_int32, check_float, check_head_dim, check_heads, check_int, check_rank,
                      dtype_name, features_used, sinks_per_head, static_scalar, window_left_of)


@dataclasses.dataclass(frozen=True)
class DecodeShape:
    """Static facts about one decode_attention call: what configs and table keys depend on."""

    op: ClassVar[str] = "decode"
    batch: int
    max_len: int  # S, the cache length
    q_heads: int
    kv_heads: int
    head_dim: int
    dtype: str  # of key/value, which dominate the bytes moved
    features: frozenset[str] = frozenset()

    @property
    def group_size(self) -> int:
        return self.q_heads // self.kv_heads


class DecodeArgs(NamedTuple):
    """Normalized decode_attention arguments. Arrays keep their input dtypes."""

    query: jax.Array  # [B, Hq, D]
    key: jax.Array  # [B, S, Hkv, D]
    value: jax.Array  # [B, S, Hkv, D]
    sequence_start: jax.Array  # int32 [B]
    sequence_end: jax.Array  # int32 [B]
    softmax_scale: float
    window_left: int | None  # key j needs j >= p - window_left
    logits_soft_cap: float | None
    sinks: jax.Array | None  # float32 [Hq]


def prepare(
    query, key, value, sequence_start, sequence_end, *,
    softmax_scale=None, sliding_window=None, logits_soft_cap=None, sinks=None,
) -> tuple[DecodeArgs, DecodeShape, bool]:
    """Checks decode_attention's arguments.

    Returns the normalized arguments, the shape descriptor, and whether the query came
    as rank 4 ([B, 1, Hq, D]) so the output must be given back in that rank.
    """
    check_rank("query", query, (3, 4), "[B, Hq, D] or [B, 1, Hq, D]")
    query_was_rank4 = query.ndim == 4
    if query_was_rank4:
        if query.shape[1] != 1:
            raise ValueError(
                f"query of rank 4 must have shape [B, 1, Hq, D], got {tuple(query.shape)}"
            )
        query = query[:, 0]
    check_rank("key", key, (4,), "[B, S, Hkv, D]")
    check_rank("value", value, (4,), "[B, S, Hkv, D]")
    for name, array in (("query", query), ("key", key), ("value", value)):
        check_float(name, array)
    if key.dtype != value.dtype:
        raise TypeError(
            f"key and value must share a dtype, got key {dtype_name(key)} "
            f"and value {dtype_name(value)}"
        )
    batch, q_heads, head_dim = query.shape
    kv_batch, max_len, kv_heads, kv_dim = key.shape
    if kv_batch != batch:
        raise ValueError(f"key must have batch {batch} (from query), got {kv_batch}")
    if kv_dim != head_dim:
        raise ValueError(f"key must have head dim D = {head_dim} (from query), got {kv_dim}")
    if tuple(value.shape) != tuple(key.shape):
        raise ValueError(
            f"value must have the shape of key {tuple(key.shape)}, got {tuple(value.shape)}"
        )
    check_head_dim("query", head_dim)
    check_heads(q_heads, kv_heads, "query", "key")
    check_int("sequence_start", sequence_start, (batch,), "int32 [B]")
    check_int("sequence_end", sequence_end, (batch,), "int32 [B]")
    window_left = window_left_of(sliding_window)
    soft_cap = static_scalar("logits_soft_cap", logits_soft_cap, None)
    scale = static_scalar("softmax_scale", softmax_scale, head_dim**-0.5)
    args = DecodeArgs(
        query=query, key=key, value=value,
        sequence_start=as_int32("sequence_start", sequence_start),
        sequence_end=as_int32("sequence_end", sequence_end),
        softmax_scale=scale, window_left=window_left, logits_soft_cap=soft_cap,
        sinks=sinks_per_head(sinks, q_heads, kv_heads),
    )
    shape = DecodeShape(
        batch=batch, max_len=max_len, q_heads=q_heads, kv_heads=kv_heads, head_dim=head_dim,
        dtype=dtype_name(key), features=features_used(window_left, soft_cap, sinks),
    )
    return args, shape, query_was_rank4


def value_problems(sequence_start, sequence_end, max_len: int) -> list[str]:
    """Every out-of-range value among decode lengths, one sentence each (empty: all fine)."""
    start = np.asarray(sequence_start)
    end = np.asarray(sequence_end)
    problems = []
    for b in np.flatnonzero(start < 0):
        problems.append(f"sequence_start[{b}] = {start[b]} is negative")
    for b in np.flatnonzero(end > max_len):
        problems.append(f"sequence_end[{b}] = {end[b]} is beyond the cache length S = {max_len}")
    for b in np.flatnonzero(start > end):
        problems.append(f"sequence_start[{b}] = {start[b]} > sequence_end[{b}] = {end[b]}")
    return problems
