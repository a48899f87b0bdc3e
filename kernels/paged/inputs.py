"""ragged_paged_attention's arguments: checks, normalization and the shape descriptor.

Shapes and dtypes are checked at trace time (errors name the argument); the result is a
normalized bundle the variants compute on (query always rank 3, window as a left extent,
scale resolved) and a hashable shape descriptor that configs and table keys depend on.
Values (lengths, page indices, query ranges) are checked only on request, host side: :func:`value_problems`.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ..tunables import cdiv
from ..inputs import (as_int32, check_float, check_head_dim, check_heads, check_int, check_rank,
                      dtype_name, features_used, sinks_per_head, static_scalar, window_left_of)


@dataclasses.dataclass(frozen=True)
class PagedShape:
    """Static facts about one ragged_paged_attention call."""

    op: ClassVar[str] = "paged"
    num_tokens: int  # T
    max_seqs: int
    pages_per_seq: int
    page_size: int
    num_pages: int  # P
    q_heads: int
    kv_heads: int
    head_dim: int
    dtype: str
    features: frozenset[str] = frozenset()

    @property
    def group_size(self) -> int:
        return self.q_heads // self.kv_heads

    @property
    def max_len(self) -> int:
        """The longest context a page table row can address."""
        return self.pages_per_seq * self.page_size


class PagedArgs(NamedTuple):
    """Normalized ragged_paged_attention arguments."""

    queries: jax.Array  # [T, Hq, D]
    kv_pages: jax.Array  # [P, page_size, 2 * Hkv, D]
    context_lens: jax.Array  # int32 [max_seqs]
    page_table: jax.Array  # int32 [max_seqs, pages_per_seq]
    query_start_loc: jax.Array  # int32 [max_seqs + 1]
    num_seqs: jax.Array  # int32 scalar
    softmax_scale: float
    window_left: int | None
    logits_soft_cap: float | None
    sinks: jax.Array | None  # float32 [Hq]


def prepare(
    queries, kv_pages, context_lens, page_table, query_start_loc, num_seqs, *,
    softmax_scale=None, sliding_window=None, logits_soft_cap=None, sinks=None,
) -> tuple[PagedArgs, PagedShape]:
    """Checks ragged_paged_attention's arguments; returns normalized arguments and shape."""
    check_rank("queries", queries, (3,), "[T, Hq, D]")
    check_rank("kv_pages", kv_pages, (4,), "[P, page_size, 2 * Hkv, D]")
    check_float("queries", queries)
    check_float("kv_pages", kv_pages)
    num_tokens, q_heads, head_dim = queries.shape
    num_pages, page_size, combined_heads, kv_dim = kv_pages.shape
    if combined_heads % 2 != 0:
        raise ValueError(
            "kv_pages must have shape [P, page_size, 2 * Hkv, D] (keys and values "
            f"interleaved), got an odd head axis {combined_heads}"
        )
    if kv_dim != head_dim:
        raise ValueError(f"kv_pages must have head dim D = {head_dim} (from queries), got {kv_dim}")
    kv_heads = combined_heads // 2
    check_head_dim("queries", head_dim)
    check_heads(q_heads, kv_heads, "queries", "kv_pages")
    check_rank("page_table", page_table, (2,), "int32 [max_seqs, pages_per_seq]")
    max_seqs, pages_per_seq = page_table.shape
    check_int("page_table", page_table, (max_seqs, pages_per_seq), "int32 [max_seqs, pages_per_seq]")
    check_int("context_lens", context_lens, (max_seqs,), "int32 [max_seqs]")
    check_int("query_start_loc", query_start_loc, (max_seqs + 1,), "int32 [max_seqs + 1]")
    if isinstance(num_seqs, (int, np.integer)) and not isinstance(num_seqs, bool):
        if not -2**31 <= num_seqs < 2**31:
            raise ValueError(f"num_seqs = {num_seqs} does not fit int32")
        num_seqs = jnp.asarray(num_seqs, jnp.int32)
    if not hasattr(num_seqs, "shape") or tuple(num_seqs.shape) not in ((), (1,)):
        raise ValueError(
            "num_seqs must be an int32 scalar or [1], got "
            f"{tuple(num_seqs.shape) if hasattr(num_seqs, 'shape') else type(num_seqs).__name__}"
        )
    if not jnp.issubdtype(num_seqs.dtype, jnp.integer):
        raise TypeError(f"num_seqs must be an integer, got dtype {dtype_name(num_seqs)}")
    window_left = window_left_of(sliding_window)
    soft_cap = static_scalar("logits_soft_cap", logits_soft_cap, None)
    scale = static_scalar("softmax_scale", softmax_scale, head_dim**-0.5)
    args = PagedArgs(
        queries=queries, kv_pages=kv_pages,
        context_lens=as_int32("context_lens", context_lens),
        page_table=as_int32("page_table", page_table),
        query_start_loc=as_int32("query_start_loc", query_start_loc),
        num_seqs=as_int32("num_seqs", num_seqs).reshape(()),
        softmax_scale=scale, window_left=window_left, logits_soft_cap=soft_cap,
        sinks=sinks_per_head(sinks, q_heads, kv_heads),
    )
    shape = PagedShape(
        num_tokens=num_tokens, max_seqs=max_seqs, pages_per_seq=pages_per_seq,
        page_size=page_size, num_pages=num_pages, q_heads=q_heads, kv_heads=kv_heads,
        head_dim=head_dim, dtype=dtype_name(kv_pages),
        features=features_used(window_left, soft_cap, sinks),
    )
    return args, shape


def value_problems(
    context_lens, page_table, query_start_loc, num_seqs, *, num_pages: int, page_size: int,
    num_tokens: int,
) -> list[str]:
    """Every out-of-range value of a ragged_paged_attention call (empty: all fine)."""
    ctx = np.asarray(context_lens)
    table = np.asarray(page_table)
    qsl = np.asarray(query_start_loc)
    n = int(np.asarray(num_seqs).reshape(()))
    max_seqs, pages_per_seq = table.shape
    problems = []
    if not 0 <= n <= max_seqs:
        problems.append(f"num_seqs = {n} is outside [0, max_seqs = {max_seqs}]")
        n = min(max(n, 0), max_seqs)
    if qsl[0] < 0:
        problems.append(f"query_start_loc[0] = {qsl[0]} is negative")
    for i in np.flatnonzero(np.diff(qsl[: n + 1]) < 0):
        problems.append(
            f"query_start_loc decreases: query_start_loc[{i}] = {qsl[i]} > "
            f"query_start_loc[{i + 1}] = {qsl[i + 1]}"
        )
    if qsl[n] > num_tokens:
        problems.append(f"query_start_loc[num_seqs] = {qsl[n]} is beyond T = {num_tokens}")
    for i in range(n):
        q_len = int(qsl[i + 1] - qsl[i])
        if ctx[i] < 0 or ctx[i] > pages_per_seq * page_size:
            problems.append(
                f"context_lens[{i}] = {ctx[i]} is outside [0, pages_per_seq * page_size = "
                f"{pages_per_seq * page_size}]"
            )
        if q_len > ctx[i]:
            problems.append(f"sequence {i}: q_len = {q_len} > context_lens[{i}] = {ctx[i]}")
        used_pages = cdiv(max(int(ctx[i]), 0), page_size)
        row = table[i, : min(used_pages, pages_per_seq)]
        for n_page in np.flatnonzero((row < 0) | (row >= num_pages)):
            problems.append(
                f"page_table[{i}, {n_page}] = {row[n_page]} is outside [0, P = {num_pages})"
            )
    return problems
