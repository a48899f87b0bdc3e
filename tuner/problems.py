"""Problems: the shapes and length distributions a kernel is run and timed on, and their inputs.

A problem is a frozen spec; ``make_inputs(seed)`` draws fresh random inputs for it (normal
values, never zeros), with ragged lengths and, for the paged operator, shuffled page tables,
so that timings reflect serving rather than a full, tidy cache.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np

LENGTH_DISTRIBUTIONS = ("fixed", "uniform", "long_tail")


def draw_lengths(rng: np.random.Generator, count: int, min_len: int, max_len: int,
                 distribution: str) -> np.ndarray:
    """`count` lengths in [min_len, max_len]; uniform and long_tail include max_len once.

    long_tail: most sequences short, a few long (u**3 skews towards min_len), as in a
    serving batch where a handful of long conversations sit among many short ones.
    """
    if distribution not in LENGTH_DISTRIBUTIONS:
        raise ValueError(f"lengths must be one of {LENGTH_DISTRIBUTIONS}, got {distribution!r}")
    if not 0 <= min_len <= max_len:
        raise ValueError(f"need 0 <= min_len <= max_len, got {min_len}, {max_len}")
    if distribution == "fixed" or count == 0:
        return np.full(count, max_len, dtype=np.int32)
    u = rng.random(count)
    if distribution == "long_tail":
        u = u**3
    lengths = np.round(min_len + u * (max_len - min_len)).astype(np.int32)
    lengths[rng.integers(count)] = max_len
    return lengths


def _normal(rng: np.random.Generator, shape: tuple[int, ...], dtype: str) -> jnp.ndarray:
    return jnp.asarray(rng.standard_normal(shape, dtype=np.float32), dtype=dtype)


def _feature_kwargs(rng, q_heads, sliding_window, logits_soft_cap, sinks) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    if sliding_window is not None:
        kwargs["sliding_window"] = sliding_window
    if logits_soft_cap is not None:
        kwargs["logits_soft_cap"] = logits_soft_cap
    if sinks:
        kwargs["sinks"] = jnp.asarray(rng.standard_normal(q_heads, dtype=np.float32) * 2.0)
    return kwargs


@dataclasses.dataclass(frozen=True)
class DecodeProblem:
    """A decode_attention problem: B sequences in a cache of S positions."""

    batch: int
    max_len: int  # S
    q_heads: int
    kv_heads: int
    head_dim: int
    dtype: str = "bfloat16"
    lengths: str = "uniform"
    min_len: int = 1
    random_start: bool = False  # sequences that begin after position 0 (start > 0)
    sliding_window: int | tuple[int, int] | None = None
    logits_soft_cap: float | None = None
    sinks: bool = False

    op = "decode"

    def make_inputs(self, seed: int) -> tuple[tuple, dict[str, Any]]:
        """(positional args, keyword args) for decode_attention, drawn fresh from `seed`."""
        rng = np.random.default_rng(seed)
        end = draw_lengths(rng, self.batch, self.min_len, self.max_len, self.lengths)
        start = np.zeros_like(end)
        if self.random_start:
            start = (rng.random(self.batch) * end).astype(np.int32)
        cache = (self.batch, self.max_len, self.kv_heads, self.head_dim)
        args = (
            _normal(rng, (self.batch, self.q_heads, self.head_dim), self.dtype),
            _normal(rng, cache, self.dtype),
            _normal(rng, cache, self.dtype),
            jnp.asarray(start, jnp.int32),
            jnp.asarray(end, jnp.int32),
        )
        kwargs = _feature_kwargs(rng, self.q_heads, self.sliding_window,
                                 self.logits_soft_cap, self.sinks)
        return args, kwargs


@dataclasses.dataclass(frozen=True)
class PagedProblem:
    """A ragged_paged_attention problem: a batch mixing decode rows and prefill chunks."""

    num_seqs: int
    max_len: int  # the longest context
    q_heads: int
    kv_heads: int
    head_dim: int
    page_size: int = 16
    dtype: str = "bfloat16"
    lengths: str = "uniform"
    min_len: int = 1
    prefill_fraction: float = 0.0  # share of sequences that are prefill chunks
    prefill_chunk: int = 512  # q_len of a prefill sequence (capped by its context)
    padding_tokens: int = 0  # query rows past the last sequence (output must be zeros)
    inactive_seqs: int = 0  # page-table rows past num_seqs
    sliding_window: int | tuple[int, int] | None = None
    logits_soft_cap: float | None = None
    sinks: bool = False

    op = "paged"

    @property
    def max_seqs(self) -> int:
        return self.num_seqs + self.inactive_seqs

    @property
    def pages_per_seq(self) -> int:
        return -(-self.max_len // self.page_size)

    @property
    def num_prefill(self) -> int:
        return round(self.prefill_fraction * self.num_seqs)

    @property
    def num_tokens(self) -> int:
        """T, fixed per problem so every seed compiles to the same shapes.

        Prefill chunks shorter than `prefill_chunk` (short contexts) leave extra padding rows.
        """
        decode_rows = self.num_seqs - self.num_prefill
        return self.num_prefill * self.prefill_chunk + decode_rows + self.padding_tokens

    def make_inputs(self, seed: int) -> tuple[tuple, dict[str, Any]]:
        """(positional args, keyword args) for ragged_paged_attention, drawn from `seed`."""
        rng = np.random.default_rng(seed)
        contexts = draw_lengths(rng, self.num_seqs, max(self.min_len, 1), self.max_len,
                                self.lengths)
        is_prefill = np.zeros(self.num_seqs, bool)
        is_prefill[rng.permutation(self.num_seqs)[: self.num_prefill]] = True
        q_lens = np.where(is_prefill, np.minimum(self.prefill_chunk, contexts), 1).astype(np.int32)
        num_tokens = self.num_tokens
        used_pages = -(-contexts // self.page_size)
        # A few spare pages that no sequence owns, so an off-by-one page index reads junk.
        num_pages = int(used_pages.sum()) + 4
        owner_order = rng.permutation(num_pages)
        page_table = rng.integers(0, num_pages, (self.max_seqs, self.pages_per_seq)).astype(np.int32)
        taken = 0
        for i, count in enumerate(used_pages):
            page_table[i, :count] = owner_order[taken:taken + count]
            taken += count
        context_lens = np.zeros(self.max_seqs, np.int32)
        context_lens[: self.num_seqs] = contexts
        query_start_loc = np.zeros(self.max_seqs + 1, np.int32)
        query_start_loc[1: self.num_seqs + 1] = np.cumsum(q_lens)
        query_start_loc[self.num_seqs + 1:] = query_start_loc[self.num_seqs]
        args = (
            _normal(rng, (num_tokens, self.q_heads, self.head_dim), self.dtype),
            _normal(rng, (num_pages, self.page_size, 2 * self.kv_heads, self.head_dim), self.dtype),
            jnp.asarray(context_lens),
            jnp.asarray(page_table),
            jnp.asarray(query_start_loc),
            jnp.asarray(self.num_seqs, jnp.int32),
        )
        kwargs = _feature_kwargs(rng, self.q_heads, self.sliding_window,
                                 self.logits_soft_cap, self.sinks)
        return args, kwargs
