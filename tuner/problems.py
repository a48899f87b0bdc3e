"""Problems: the shapes and length distributions a kernel is run and timed on, and their inputs.

A problem is a frozen spec; ``make_inputs(seed)`` draws fresh random inputs for it (normal
values, never zeros), with ragged lengths and, for the paged operator, shuffled page tables,
so that timings reflect serving rather than a full, tidy cache.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
import numpy as np

from attnbench.kernels.inputs import DecodeShape, PagedShape

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

    def shape(self, seed: int = 0) -> DecodeShape:
        """The shape descriptor of `make_inputs(seed)` (the same for every seed)."""
        del seed
        return DecodeShape(batch=self.batch, max_len=self.max_len, q_heads=self.q_heads,
                           kv_heads=self.kv_heads, head_dim=self.head_dim, dtype=self.dtype,
                           features=_features_of(self))


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
        context_lens, page_table, query_start_loc, num_pages = self._layout(rng)
        args = (
            _normal(rng, (self.num_tokens, self.q_heads, self.head_dim), self.dtype),
            _normal(rng, (num_pages, self.page_size, 2 * self.kv_heads, self.head_dim), self.dtype),
            jnp.asarray(context_lens),
            jnp.asarray(page_table),
            jnp.asarray(query_start_loc),
            jnp.asarray(self.num_seqs, jnp.int32),
        )
        kwargs = _feature_kwargs(rng, self.q_heads, self.sliding_window,
                                 self.logits_soft_cap, self.sinks)
        return args, kwargs

    def shape(self, seed: int = 0) -> PagedShape:
        """The shape descriptor of `make_inputs(seed)` (num_pages depends on the seed)."""
        *_, num_pages = self._layout(np.random.default_rng(seed))
        return PagedShape(num_tokens=self.num_tokens, max_seqs=self.max_seqs,
                          pages_per_seq=self.pages_per_seq, page_size=self.page_size,
                          num_pages=num_pages, q_heads=self.q_heads, kv_heads=self.kv_heads,
                          head_dim=self.head_dim, dtype=self.dtype, features=_features_of(self))

    def _layout(self, rng: np.random.Generator):
        """Lengths and page table: (context_lens, page_table, query_start_loc, num_pages)."""
        contexts = draw_lengths(rng, self.num_seqs, max(self.min_len, 1), self.max_len,
                                self.lengths)
        is_prefill = np.zeros(self.num_seqs, bool)
        is_prefill[rng.permutation(self.num_seqs)[: self.num_prefill]] = True
        q_lens = np.where(is_prefill, np.minimum(self.prefill_chunk, contexts), 1).astype(np.int32)
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
        return context_lens, page_table, query_start_loc, num_pages


def _features_of(problem: DecodeProblem | PagedProblem) -> frozenset[str]:
    used = set()
    if problem.sliding_window is not None:
        used.add("sliding_window")
    if problem.logits_soft_cap is not None:
        used.add("logits_soft_cap")
    if problem.sinks:
        used.add("sinks")
    return frozenset(used)


def rotated_input_sets(args: tuple, seed: int, count: int) -> list[tuple]:
    """`count` positional-argument tuples of identical shapes for timing with rotation.

    The first is `args` (from `make_inputs(seed)`); the others keep its lengths and page
    table (so one compiled call runs them all) and draw fresh query and cache values, so a
    problem that fits in cache is not timed on the same hot buffers every call.
    """
    sets = [tuple(args)]
    for index in range(1, count):
        rng = np.random.default_rng([seed, index])
        sets.append(tuple(
            _normal(rng, tuple(a.shape), jnp.dtype(a.dtype).name)
            if jnp.issubdtype(a.dtype, jnp.floating) else a
            for a in args
        ))
    return sets


def with_array_keywords_last(function: Callable | None, positional: int, kwargs: dict[str, Any]
                             ) -> tuple[Callable, tuple]:
    """`function` taking its array keyword arguments (sinks) as trailing positional inputs.

    A jitted call then traces them as inputs instead of baking them in as constants, so one
    compiled call serves every input set. Returns (call, trailing inputs):
    ``call(*args, *trailing) == function(*args, **kwargs)`` for `positional` args.
    """
    names = [name for name, value in kwargs.items() if hasattr(value, "shape")]
    fixed = {name: value for name, value in kwargs.items() if name not in names}

    def call(*inputs):
        arrays = dict(zip(names, inputs[positional:]))
        return function(*inputs[:positional], **fixed, **arrays)

    return call, tuple(kwargs[name] for name in names)


@dataclasses.dataclass(frozen=True)
class ModelPreset:
    """The attention geometry of a real model (one layer type), for sweep files."""

    q_heads: int
    kv_heads: int
    head_dim: int
    sliding_window: int | None = None
    logits_soft_cap: float | None = None
    sinks: bool = False
    note: str = ""


# Heads and features from the models' published configs. Models that alternate global and
# local layers get one preset per layer type.
MODEL_PRESETS: dict[str, ModelPreset] = {
    "llama-3-8b": ModelPreset(32, 8, 128, note="GQA 4"),
    "llama-3-70b": ModelPreset(64, 8, 128, note="GQA 8"),
    "qwen-2.5-7b": ModelPreset(28, 4, 128, note="GQA 7 (a group that is not a power of two)"),
    "mistral-7b": ModelPreset(32, 8, 128, sliding_window=4096, note="sliding window 4096"),
    "gemma-2-9b": ModelPreset(16, 8, 256, logits_soft_cap=50.0,
                              note="global layers: logit soft cap 50, D=256"),
    "gemma-2-9b-local": ModelPreset(16, 8, 256, sliding_window=4096, logits_soft_cap=50.0,
                                    note="local layers: window 4096 and soft cap 50"),
    "gpt-oss-20b": ModelPreset(64, 8, 64, sliding_window=128, sinks=True,
                               note="banded layers: sinks and window 128"),
    "gpt-oss-20b-full": ModelPreset(64, 8, 64, sinks=True, note="full layers: sinks"),
    "starcoder-15b": ModelPreset(48, 1, 128, note="MQA (one KV head)"),
    "gemma-2b": ModelPreset(8, 1, 256, note="MQA, D=256"),
}
