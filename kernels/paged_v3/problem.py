"""ragged_paged_attention_v3 problems: decode, chunked-prefill and mixed sequences in the
distribution's order, new tokens written by the call, and their random inputs."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from ..paged.problem import PagedProblem
from ..probes import draw_sinks, head_temperatures
from ..random_inputs import abstract_feature_kwargs, draw_lengths, feature_kwargs, features_of
from ..schema import Fraction, NonNegativeInt, PositiveInt, one_of
from ..tunables import cdiv
from . import cache
from .inputs import PagedV3Shape

# Largest magnitude a quantized dtype stores; the per-tensor scale maps the largest value
# of the cache onto it.
_QUANTIZED_MAX = {"float8_e4m3fn": 448.0, "int8": 127.0}


@dataclasses.dataclass(frozen=True)
class PagedV3Problem:
    """A ragged_paged_attention_v3 problem. Sequences are ordered as the distribution says:
    decode (q_len 1), then chunked prefill (q_len prefill_chunk), then mixed (q_len drawn
    in 1..prefill_chunk)."""

    num_seqs: int
    max_len: int
    q_heads: int
    kv_heads: int
    head_dim: int
    page_size: int = 16
    dtype: str = "bfloat16"  # queries, keys and values
    cache_dtype: str = "auto"  # "auto": the dtype
    lengths: str = "uniform"
    min_len: int = 1
    prefill_fraction: float = 0.0  # share of sequences that are chunked prefill
    mixed_fraction: float = 0.0  # share of sequences in the mixed band
    prefill_chunk: int = 512
    padding_tokens: int = 0
    inactive_seqs: int = 0
    sliding_window: int | tuple[int, int] | None = None
    logits_soft_cap: float | None = None
    sinks: bool = False

    op: ClassVar[str] = "paged_v3"
    # The sweep field that counts sequences (`attnbench sweep --batch` sets it).
    sequences_field: ClassVar[str] = "num_seqs"
    sweep_fields: ClassVar[dict[str, tuple[Any, Any]]] = {
        "num_seqs": (PositiveInt, 8), "page_size": (PositiveInt, 16),
        "cache_dtype": (one_of("auto", *cache.CACHE_PACKING), "auto"),
        "prefill_fraction": (Fraction, 0.0), "mixed_fraction": (Fraction, 0.0),
        "prefill_chunk": (PositiveInt, 512), "padding_tokens": (NonNegativeInt, 0)}

    def __post_init__(self) -> None:
        if self.num_prefill + self.num_mixed > self.num_seqs:
            raise ValueError(f"prefill_fraction + mixed_fraction must be <= 1, got "
                             f"{self.prefill_fraction} + {self.mixed_fraction}")

    @property
    def stored_dtype(self) -> str:
        return self.dtype if self.cache_dtype == "auto" else self.cache_dtype

    @property
    def sequences(self) -> int:
        return self.num_seqs

    @property
    def max_seqs(self) -> int:
        return self.num_seqs + self.inactive_seqs

    @property
    def pages_per_seq(self) -> int:
        return cdiv(self.max_len, self.page_size)

    @property
    def num_prefill(self) -> int:
        return round(self.prefill_fraction * self.num_seqs)

    @property
    def num_mixed(self) -> int:
        return round(self.mixed_fraction * self.num_seqs)

    @property
    def distribution(self) -> np.ndarray:
        decode = self.num_seqs - self.num_prefill - self.num_mixed
        return np.array([decode, decode + self.num_prefill, self.num_seqs], np.int32)

    @property
    def num_tokens(self) -> int:
        decode = self.num_seqs - self.num_prefill - self.num_mixed
        return (decode + (self.num_prefill + self.num_mixed) * self.prefill_chunk
                + self.padding_tokens)

    def _probe_planter(self) -> PagedProblem:
        return PagedProblem(num_seqs=self.num_seqs, max_len=self.max_len, q_heads=self.q_heads,
                            kv_heads=self.kv_heads, head_dim=self.head_dim,
                            page_size=self.page_size, sliding_window=self.sliding_window,
                            logits_soft_cap=self.logits_soft_cap)

    def _layout(self, rng: np.random.Generator):
        """(context_lens, page_table, query_start_loc, num_pages)."""
        contexts = draw_lengths(rng, self.num_seqs, max(self.min_len, 1), self.max_len,
                                self.lengths)
        d0, d1, _ = self.distribution
        q_lens = np.ones(self.num_seqs, np.int32)
        q_lens[d0:d1] = self.prefill_chunk
        q_lens[d1:] = rng.integers(1, self.prefill_chunk + 1, self.num_seqs - d1)
        q_lens = np.minimum(q_lens, contexts).astype(np.int32)
        used_pages = cdiv(contexts, self.page_size)
        num_pages = int(used_pages.sum()) + 4  # spare pages no sequence owns
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

    def make_inputs(self, seed: int) -> tuple[tuple, dict[str, Any]]:
        """(positional args, keyword args) for ragged_paged_attention_v3, drawn from `seed`.

        Probe keys (kernels/probes.py) are planted in float32 over each sequence's whole
        context; those at the new tokens' positions travel in `keys`, and their cache slots
        hold unrelated stale values, so a kernel that reads before it writes is wrong."""
        rng = np.random.default_rng(seed)
        context_lens, page_table, query_start_loc, num_pages = self._layout(rng)
        queries = rng.standard_normal((self.num_tokens, self.q_heads, self.head_dim), np.float32)
        pages = rng.standard_normal(
            (num_pages, self.page_size, 2 * self.kv_heads, self.head_dim), np.float32)
        kwargs = feature_kwargs(rng, self.q_heads, self.sliding_window, self.logits_soft_cap,
                                self.sinks)
        queries *= head_temperatures(rng, self.q_heads)[None, :, None]
        log_totals = self._probe_planter()._plant_probes(rng, queries, pages, context_lens,
                                                         page_table, query_start_loc)
        if self.sinks:
            kwargs["sinks"] = jnp.asarray(draw_sinks(rng, log_totals, self.q_heads,
                                                     self.kv_heads))
        new = rng.standard_normal((self.num_tokens, 2 * self.kv_heads, self.head_dim), np.float32)
        for i in range(self.num_seqs):
            first, end = int(query_start_loc[i]), int(query_start_loc[i + 1])
            positions = int(context_lens[i]) - (end - first) + np.arange(end - first)
            slots = page_table[i, positions // self.page_size], positions % self.page_size
            new[first:end] = pages[slots]
            pages[slots] = rng.standard_normal(pages[slots].shape, np.float32)
        stored = self.stored_dtype
        if stored in _QUANTIZED_MAX:
            k_scale = float(np.abs(pages[:, :, 0::2]).max() / _QUANTIZED_MAX[stored])
            v_scale = float(np.abs(pages[:, :, 1::2]).max() / _QUANTIZED_MAX[stored])
            kwargs.update(k_scale=k_scale, v_scale=v_scale)
        kv_cache = cache.numpy_cache(pages, stored, kwargs.get("k_scale"), kwargs.get("v_scale"))
        new = new.reshape(self.num_tokens, self.kv_heads, 2, self.head_dim)
        args = (
            jnp.asarray(queries, self.dtype),
            jnp.asarray(new[:, :, 0], self.dtype),
            jnp.asarray(new[:, :, 1], self.dtype),
            kv_cache,
            jnp.asarray(context_lens),
            jnp.asarray(page_table),
            jnp.asarray(query_start_loc),
            jnp.asarray(self.distribution),
        )
        return args, kwargs

    def shape(self, seed: int = 0) -> PagedV3Shape:
        *_, num_pages = self._layout(np.random.default_rng(seed))
        return PagedV3Shape(num_tokens=self.num_tokens, max_seqs=self.max_seqs,
                            pages_per_seq=self.pages_per_seq, page_size=self.page_size,
                            num_pages=num_pages, q_heads=self.q_heads, kv_heads=self.kv_heads,
                            head_dim=self.head_dim, dtype=self.dtype,
                            cache_dtype=self.stored_dtype, features=features_of(self))

    def abstract_inputs(self) -> tuple[tuple, dict[str, Any]]:
        struct = jax.ShapeDtypeStruct
        num_pages = self.max_seqs * self.pages_per_seq + 4
        new = struct((self.num_tokens, self.kv_heads, self.head_dim), self.dtype)
        arrays = (struct((self.num_tokens, self.q_heads, self.head_dim), self.dtype), new, new,
                  struct(cache.cache_shape(num_pages, self.page_size, self.kv_heads,
                                           self.head_dim, self.stored_dtype), self.stored_dtype),
                  struct((self.max_seqs,), "int32"),
                  struct((self.max_seqs, self.pages_per_seq), "int32"),
                  struct((self.max_seqs + 1,), "int32"), struct((3,), "int32"))
        kwargs = abstract_feature_kwargs(self)
        if self.stored_dtype in _QUANTIZED_MAX:
            kwargs.update(k_scale=1.0, v_scale=1.0)
        return arrays, kwargs

    def size_text(self) -> str:
        return (f"seqs={self.num_seqs} ctx={self.max_len} page={self.page_size} "
                f"cache={self.stored_dtype} prefill={self.prefill_fraction:g} "
                f"mixed={self.mixed_fraction:g}")

    def record_fields(self, shape: PagedV3Shape) -> dict[str, Any]:
        return {"num_seqs": self.num_seqs, "num_tokens": shape.num_tokens,
                "page_size": self.page_size, "cache_dtype": shape.cache_dtype,
                "prefill_fraction": self.prefill_fraction,
                "mixed_fraction": self.mixed_fraction, "prefill_chunk": self.prefill_chunk}

    def constraint_sizes(self, shape: PagedV3Shape) -> dict[str, Any]:
        return {"num_tokens": shape.num_tokens, "num_seqs": self.num_seqs,
                "max_seqs": shape.max_seqs, "pages_per_seq": shape.pages_per_seq,
                "page_size": shape.page_size, "num_pages": shape.num_pages,
                "packing": shape.packing, "prefill_fraction": self.prefill_fraction,
                "mixed_fraction": self.mixed_fraction}
