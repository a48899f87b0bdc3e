"""ragged_paged_attention_v3's arguments: checks, normalization and the shape descriptor.

Shapes and dtypes are checked at trace time (errors name the argument); values (lengths,
page indices, the distribution) only on request, host side (:func:`value_problems`).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ..inputs import (as_int32, check_float, check_heads, check_int, check_rank, dtype_name,
                      features_used, sinks_per_head, static_scalar, window_left_of)
from ..paged.inputs import value_problems as paged_value_problems
from . import cache


@dataclasses.dataclass(frozen=True)
class PagedV3Shape:
    """Static facts about one ragged_paged_attention_v3 call."""

    op: ClassVar[str] = "paged_v3"
    num_tokens: int  # T
    max_seqs: int
    pages_per_seq: int
    page_size: int
    num_pages: int  # P
    q_heads: int
    kv_heads: int
    head_dim: int
    dtype: str  # the queries'
    cache_dtype: str
    features: frozenset[str] = frozenset()

    @property
    def group_size(self) -> int:
        return self.q_heads // self.kv_heads

    @property
    def max_len(self) -> int:
        return self.pages_per_seq * self.page_size

    @property
    def packing(self) -> int:
        return cache.packing(self.cache_dtype)


class PagedV3Args(NamedTuple):
    """Normalized ragged_paged_attention_v3 arguments."""

    queries: jax.Array  # [T, Hq, D]
    keys: jax.Array  # [T, Hkv, D]
    values: jax.Array  # [T, Hkv, D]
    kv_cache: jax.Array  # [P, page_size, rows, pack, D_padded]
    context_lens: jax.Array  # int32 [max_seqs]
    page_table: jax.Array  # int32 [max_seqs, pages_per_seq]
    query_start_loc: jax.Array  # int32 [max_seqs + 1]
    distribution: jax.Array  # int32 [3]
    softmax_scale: float
    window_left: int | None
    logits_soft_cap: float | None
    sinks: jax.Array | None  # float32 [Hq]
    k_scale: jax.Array | float | None  # float32 scalar
    v_scale: jax.Array | float | None


def _scale(name: str, value, cache_dtype: str):
    if value is None:
        if cache_dtype in cache.QUANTIZED:
            raise ValueError(f"{name} is required for a {cache_dtype} kv_cache (per-tensor "
                             "float32 scale)")
        return None
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        return static_scalar(name, value, None)
    if not hasattr(value, "shape") or tuple(value.shape) not in ((), (1,)):
        raise ValueError(f"{name} must be a float or a float32 array of shape () or [1], got "
                         f"{tuple(value.shape) if hasattr(value, 'shape') else type(value).__name__}")
    if not jnp.issubdtype(value.dtype, jnp.floating):
        raise TypeError(f"{name} must be a float array, got dtype {dtype_name(value)}")
    return jnp.asarray(value, jnp.float32).reshape(())


def prepare(
    queries, keys, values, kv_cache, context_lens, page_table, query_start_loc, distribution,
    *, softmax_scale=None, sliding_window=None, logits_soft_cap=None, sinks=None,
    k_scale=None, v_scale=None,
) -> tuple[PagedV3Args, PagedV3Shape]:
    """Checks ragged_paged_attention_v3's arguments; returns normalized arguments and shape."""
    check_rank("queries", queries, (3,), "[T, Hq, D]")
    check_rank("keys", keys, (3,), "[T, Hkv, D]")
    check_rank("values", values, (3,), "[T, Hkv, D]")
    layout = "[P, page_size, ceil(2 * Hkv / pack), pack, D_padded]"
    check_rank("kv_cache", kv_cache, (5,), layout)
    check_float("queries", queries)
    check_float("keys", keys)
    check_float("values", values)
    if keys.dtype != values.dtype:
        raise TypeError(f"keys and values must share one dtype, got {dtype_name(keys)} and "
                        f"{dtype_name(values)}")
    cache_dtype = dtype_name(kv_cache)
    if cache_dtype not in cache.CACHE_PACKING:
        raise TypeError(f"kv_cache must have dtype in {list(cache.CACHE_PACKING)}, got "
                        f"{cache_dtype}")
    num_tokens, q_heads, head_dim = queries.shape
    if tuple(keys.shape[::2]) != (num_tokens, head_dim):
        raise ValueError(f"keys must have shape [T, Hkv, D] with T = {num_tokens}, D = "
                         f"{head_dim} (from queries), got {tuple(keys.shape)}")
    if tuple(values.shape) != tuple(keys.shape):
        raise ValueError(f"values must have the shape of keys {tuple(keys.shape)}, got "
                         f"{tuple(values.shape)}")
    kv_heads = keys.shape[1]
    check_heads(q_heads, kv_heads, "queries", "keys")
    num_pages, page_size = kv_cache.shape[:2]
    wanted = cache.cache_shape(num_pages, page_size, kv_heads, head_dim, cache_dtype)
    if tuple(kv_cache.shape) != wanted:
        raise ValueError(
            f"kv_cache must have shape {layout} = {wanted} for Hkv = {kv_heads}, D = "
            f"{head_dim} and dtype {cache_dtype} (pack {cache.packing(cache_dtype)}), got "
            f"{tuple(kv_cache.shape)}")
    check_rank("context_lens", context_lens, (1,), "int32 [max_seqs]")
    max_seqs = context_lens.shape[0]
    check_int("context_lens", context_lens, (max_seqs,), "int32 [max_seqs]")
    check_rank("page_table", page_table, (1, 2),
               "int32 [max_seqs, pages_per_seq] or [max_seqs * pages_per_seq]")
    if page_table.ndim == 1:
        if max_seqs == 0 or page_table.shape[0] % max_seqs:
            raise ValueError(f"page_table of shape {tuple(page_table.shape)} must hold "
                             f"max_seqs * pages_per_seq entries with max_seqs = {max_seqs} "
                             "(from context_lens)")
        check_int("page_table", page_table, page_table.shape, "int32 [max_seqs * pages_per_seq]")
        page_table = page_table.reshape(max_seqs, -1)
    check_int("page_table", page_table, (max_seqs, page_table.shape[1]),
              "int32 [max_seqs, pages_per_seq]")
    pages_per_seq = page_table.shape[1]
    check_int("query_start_loc", query_start_loc, (max_seqs + 1,), "int32 [max_seqs + 1]")
    check_int("distribution", distribution, (3,), "int32 [3]")
    window_left = window_left_of(sliding_window)
    soft_cap = static_scalar("logits_soft_cap", logits_soft_cap, None)
    scale = static_scalar("softmax_scale", softmax_scale, head_dim**-0.5)
    args = PagedV3Args(
        queries=queries, keys=keys, values=values, kv_cache=kv_cache,
        context_lens=as_int32("context_lens", context_lens),
        page_table=as_int32("page_table", page_table),
        query_start_loc=as_int32("query_start_loc", query_start_loc),
        distribution=as_int32("distribution", distribution),
        softmax_scale=scale, window_left=window_left, logits_soft_cap=soft_cap,
        sinks=sinks_per_head(sinks, q_heads, kv_heads),
        k_scale=_scale("k_scale", k_scale, cache_dtype),
        v_scale=_scale("v_scale", v_scale, cache_dtype),
    )
    shape = PagedV3Shape(
        num_tokens=num_tokens, max_seqs=max_seqs, pages_per_seq=pages_per_seq,
        page_size=page_size, num_pages=num_pages, q_heads=q_heads, kv_heads=kv_heads,
        head_dim=head_dim, dtype=dtype_name(queries), cache_dtype=cache_dtype,
        features=features_used(window_left, soft_cap, sinks),
    )
    return args, shape


def value_problems(context_lens, page_table, query_start_loc, distribution, *, num_pages: int,
                   page_size: int, num_tokens: int) -> list[str]:
    """Every out-of-range value of a ragged_paged_attention_v3 call (empty: all fine)."""
    bands = np.asarray(distribution).reshape(-1)
    max_seqs = np.asarray(context_lens).shape[0]
    problems = []
    if bands[0] < 0:
        problems.append(f"distribution[0] = {bands[0]} is negative")
    for k in (0, 1):
        if bands[k + 1] < bands[k]:
            problems.append(f"distribution decreases: distribution[{k}] = {bands[k]} > "
                            f"distribution[{k + 1}] = {bands[k + 1]}")
    if bands[2] > max_seqs:
        problems.append(f"distribution[2] = {bands[2]} exceeds the sequences (max_seqs = "
                        f"{max_seqs})")
    active = int(min(max(bands[2], 0), max_seqs))
    qsl = np.asarray(query_start_loc)
    for i in range(int(min(max(bands[0], 0), active))):
        if qsl[i + 1] - qsl[i] != 1:
            problems.append(f"sequence {i} is in the decode band (distribution[0] = "
                            f"{bands[0]}) but has q_len = {qsl[i + 1] - qsl[i]}")
    problems += paged_value_problems(context_lens, page_table, query_start_loc,
                                     np.int32(active), num_pages=num_pages,
                                     page_size=page_size, num_tokens=num_tokens)
    return problems
