"""Argument checking and normalization for the two operators (SEMANTICS.md, "Bad input").

Every operator call passes through here first. Shapes and dtypes are checked at trace time
and raise errors that name the argument; the result is a normalized argument bundle the
variants compute on (query always rank 3, window as a left extent, scale resolved) and a
hashable shape descriptor used for configs and tuned-table keys.

Values (lengths, page indices) cannot be checked inside a compiled call for free; the
opt-in host-side checks are :func:`decode_value_problems` and :func:`paged_value_problems`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

SUPPORTED_DTYPES = ("float32", "bfloat16", "float16")
FEATURES = ("sliding_window", "logits_soft_cap", "sinks")


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


def _dtype_name(array: Any) -> str:
    return jnp.dtype(array.dtype).name


def _check_rank(name: str, array: Any, ranks: tuple[int, ...], layout: str) -> None:
    if not hasattr(array, "shape") or not hasattr(array, "dtype"):
        raise TypeError(f"{name} must be an array {layout}, got {type(array).__name__}")
    if array.ndim not in ranks:
        raise ValueError(f"{name} must have shape {layout}, got shape {tuple(array.shape)}")


def _check_float(name: str, array: Any) -> None:
    if _dtype_name(array) not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{name} must have dtype in {list(SUPPORTED_DTYPES)}, got {_dtype_name(array)}"
        )


def _check_int(name: str, array: Any, shape: tuple[int, ...], layout: str) -> None:
    _check_rank(name, array, (len(shape),), layout)
    if not jnp.issubdtype(array.dtype, jnp.integer):
        raise TypeError(f"{name} must be an integer array {layout}, got dtype {_dtype_name(array)}")
    if tuple(array.shape) != shape:
        raise ValueError(f"{name} must have shape {layout} = {shape}, got {tuple(array.shape)}")


def window_left_of(sliding_window: Any) -> int | None:
    """int W -> W - 1; (left, right) -> left. None -> no window.

    The right extent never matters: in both operators a key after the query position is
    already excluded (decode: j < end = p + 1; paged: causal), so only `left` is kept.
    """
    if sliding_window is None:
        return None
    if isinstance(sliding_window, (tuple, list)):
        if len(sliding_window) != 2 or not all(
            isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 0
            for v in sliding_window
        ):
            raise ValueError(
                "sliding_window as a tuple must be (left, right) with ints >= 0, "
                f"got {sliding_window!r}"
            )
        return int(sliding_window[0])
    if isinstance(sliding_window, (int, np.integer)) and not isinstance(sliding_window, bool):
        if sliding_window < 1:
            raise ValueError(f"sliding_window must be an int >= 1, got {sliding_window}")
        return int(sliding_window) - 1
    raise TypeError(
        f"sliding_window must be an int >= 1 or a (left, right) tuple, got {sliding_window!r}"
    )


def _scalar(name: str, value: Any, default: float | None) -> float | None:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a Python float (static), got {type(value).__name__}")
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return float(value)


def _sinks(sinks: Any, q_heads: int) -> jax.Array | None:
    if sinks is None:
        return None
    _check_rank("sinks", sinks, (1,), "[Hq]")
    if not jnp.issubdtype(sinks.dtype, jnp.floating):
        raise TypeError(f"sinks must be a float array [Hq], got dtype {_dtype_name(sinks)}")
    if sinks.shape[0] != q_heads:
        raise ValueError(f"sinks must have shape [Hq] = ({q_heads},), got {tuple(sinks.shape)}")
    return jnp.asarray(sinks, jnp.float32)


def _features(window_left: int | None, soft_cap: float | None, sinks: Any) -> frozenset[str]:
    used = set()
    if window_left is not None:
        used.add("sliding_window")
    if soft_cap is not None:
        used.add("logits_soft_cap")
    if sinks is not None:
        used.add("sinks")
    return frozenset(used)


def _check_heads(q_heads: int, kv_heads: int, q_name: str, kv_name: str) -> None:
    if kv_heads < 1 or q_heads % kv_heads != 0:
        raise ValueError(
            f"the query heads of {q_name} ({q_heads}) must be a multiple of the key/value "
            f"heads of {kv_name} ({kv_heads})"
        )


def prepare_decode(
    query, key, value, sequence_start, sequence_end, *,
    softmax_scale=None, sliding_window=None, logits_soft_cap=None, sinks=None,
) -> tuple[DecodeArgs, DecodeShape, bool]:
    """Checks decode_attention's arguments.

    Returns the normalized arguments, the shape descriptor, and whether the query came
    as rank 4 ([B, 1, Hq, D]) so the output must be given back in that rank.
    """
    _check_rank("query", query, (3, 4), "[B, Hq, D] or [B, 1, Hq, D]")
    query_was_rank4 = query.ndim == 4
    if query_was_rank4:
        if query.shape[1] != 1:
            raise ValueError(
                f"query of rank 4 must have shape [B, 1, Hq, D], got {tuple(query.shape)}"
            )
        query = query[:, 0]
    _check_rank("key", key, (4,), "[B, S, Hkv, D]")
    _check_rank("value", value, (4,), "[B, S, Hkv, D]")
    for name, array in (("query", query), ("key", key), ("value", value)):
        _check_float(name, array)
    if key.dtype != value.dtype:
        raise TypeError(
            f"key and value must share a dtype, got key {_dtype_name(key)} "
            f"and value {_dtype_name(value)}"
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
    _check_heads(q_heads, kv_heads, "query", "key")
    _check_int("sequence_start", sequence_start, (batch,), "int32 [B]")
    _check_int("sequence_end", sequence_end, (batch,), "int32 [B]")
    window_left = window_left_of(sliding_window)
    soft_cap = _scalar("logits_soft_cap", logits_soft_cap, None)
    scale = _scalar("softmax_scale", softmax_scale, head_dim**-0.5)
    args = DecodeArgs(
        query=query, key=key, value=value,
        sequence_start=jnp.asarray(sequence_start, jnp.int32),
        sequence_end=jnp.asarray(sequence_end, jnp.int32),
        softmax_scale=scale, window_left=window_left, logits_soft_cap=soft_cap,
        sinks=_sinks(sinks, q_heads),
    )
    shape = DecodeShape(
        batch=batch, max_len=max_len, q_heads=q_heads, kv_heads=kv_heads, head_dim=head_dim,
        dtype=_dtype_name(key), features=_features(window_left, soft_cap, sinks),
    )
    return args, shape, query_was_rank4


def prepare_paged(
    queries, kv_pages, context_lens, page_table, query_start_loc, num_seqs, *,
    softmax_scale=None, sliding_window=None, logits_soft_cap=None, sinks=None,
) -> tuple[PagedArgs, PagedShape]:
    """Checks ragged_paged_attention's arguments; returns normalized arguments and shape."""
    _check_rank("queries", queries, (3,), "[T, Hq, D]")
    _check_rank("kv_pages", kv_pages, (4,), "[P, page_size, 2 * Hkv, D]")
    _check_float("queries", queries)
    _check_float("kv_pages", kv_pages)
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
    _check_heads(q_heads, kv_heads, "queries", "kv_pages")
    _check_rank("page_table", page_table, (2,), "int32 [max_seqs, pages_per_seq]")
    max_seqs, pages_per_seq = page_table.shape
    _check_int("page_table", page_table, (max_seqs, pages_per_seq), "int32 [max_seqs, pages_per_seq]")
    _check_int("context_lens", context_lens, (max_seqs,), "int32 [max_seqs]")
    _check_int("query_start_loc", query_start_loc, (max_seqs + 1,), "int32 [max_seqs + 1]")
    if isinstance(num_seqs, (int, np.integer)) and not isinstance(num_seqs, bool):
        num_seqs = jnp.asarray(num_seqs, jnp.int32)
    if not hasattr(num_seqs, "shape") or tuple(num_seqs.shape) not in ((), (1,)):
        raise ValueError(
            "num_seqs must be an int32 scalar or [1], got "
            f"{tuple(num_seqs.shape) if hasattr(num_seqs, 'shape') else type(num_seqs).__name__}"
        )
    if not jnp.issubdtype(num_seqs.dtype, jnp.integer):
        raise TypeError(f"num_seqs must be an integer, got dtype {_dtype_name(num_seqs)}")
    window_left = window_left_of(sliding_window)
    soft_cap = _scalar("logits_soft_cap", logits_soft_cap, None)
    scale = _scalar("softmax_scale", softmax_scale, head_dim**-0.5)
    args = PagedArgs(
        queries=queries, kv_pages=kv_pages,
        context_lens=jnp.asarray(context_lens, jnp.int32),
        page_table=jnp.asarray(page_table, jnp.int32),
        query_start_loc=jnp.asarray(query_start_loc, jnp.int32),
        num_seqs=jnp.asarray(num_seqs, jnp.int32).reshape(()),
        softmax_scale=scale, window_left=window_left, logits_soft_cap=soft_cap,
        sinks=_sinks(sinks, q_heads),
    )
    shape = PagedShape(
        num_tokens=num_tokens, max_seqs=max_seqs, pages_per_seq=pages_per_seq,
        page_size=page_size, num_pages=num_pages, q_heads=q_heads, kv_heads=kv_heads,
        head_dim=head_dim, dtype=_dtype_name(kv_pages),
        features=_features(window_left, soft_cap, sinks),
    )
    return args, shape


# ---- Opt-in value checks (host side, on concrete arrays) ---------------------------------


def decode_value_problems(sequence_start, sequence_end, max_len: int) -> list[str]:
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


def paged_value_problems(
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
        used_pages = -(-max(int(ctx[i]), 0) // page_size)
        row = table[i, : min(used_pages, pages_per_seq)]
        for n_page in np.flatnonzero((row < 0) | (row >= num_pages)):
            problems.append(
                f"page_table[{i}, {n_page}] = {row[n_page]} is outside [0, P = {num_pages})"
            )
    return problems
