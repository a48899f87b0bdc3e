"""ragged_paged_attention problems: batches mixing decode rows and prefill chunks over a
shuffled page table, and their random inputs."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from ..inputs import window_left_of
from ..probes import ProbedRow, draw_sinks, head_temperatures, plant
from ..random_inputs import abstract_feature_kwargs, draw_lengths, feature_kwargs, features_of
from ..tunables import cdiv
from ..schema import Fraction, NonNegativeInt, PositiveInt
from .inputs import PagedShape


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

    op: ClassVar[str] = "paged"
    # The sweep field that counts sequences (`attnbench sweep --batch` sets it).
    sequences_field: ClassVar[str] = "num_seqs"
    sweep_fields: ClassVar[dict[str, tuple[Any, Any]]] = {
        "num_seqs": (PositiveInt, 8), "page_size": (PositiveInt, 16),
        "prefill_fraction": (Fraction, 0.0), "prefill_chunk": (PositiveInt, 512),
        "padding_tokens": (NonNegativeInt, 0)}

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
        queries = rng.standard_normal((self.num_tokens, self.q_heads, self.head_dim), np.float32)
        kv_pages = rng.standard_normal(
            (num_pages, self.page_size, 2 * self.kv_heads, self.head_dim), np.float32)
        kwargs = feature_kwargs(rng, self.q_heads, self.sliding_window, self.logits_soft_cap,
                                self.sinks)
        queries *= head_temperatures(rng, self.q_heads)[None, :, None]
        log_totals = self._plant_probes(rng, queries, kv_pages, context_lens, page_table,
                                        query_start_loc)
        if self.sinks:
            kwargs["sinks"] = jnp.asarray(draw_sinks(rng, log_totals, self.q_heads,
                                                     self.kv_heads))
        args = (
            jnp.asarray(queries, self.dtype),
            jnp.asarray(kv_pages, self.dtype),
            jnp.asarray(context_lens),
            jnp.asarray(page_table),
            jnp.asarray(query_start_loc),
            jnp.asarray(self.num_seqs, jnp.int32),
        )
        return args, kwargs

    def _plant_probes(self, rng, queries, kv_pages, context_lens, page_table, query_start_loc):
        """Probe keys (kernels/probes.py) for every decode row and for the first, middle and
        last row of every prefill chunk, written into the sequences' own pages."""
        window_left = window_left_of(self.sliding_window)
        size = self.page_size
        rows = []
        for i in range(self.num_seqs):
            context = int(context_lens[i])
            first_row, end_row = int(query_start_loc[i]), int(query_start_loc[i + 1])
            q_len = end_row - first_row
            owned_end = int(cdiv(context, size)) * size
            probed = []
            for r in sorted({0, q_len // 2, q_len - 1}):
                position = context - q_len + r
                low = 0 if window_left is None else max(0, position - window_left)
                probed.append(ProbedRow(queries[first_row + r], low, position, owned_end))
            rows.append(probed)

        def read_keys(i, g):
            pages = page_table[i, : cdiv(int(context_lens[i]), size)]
            return kv_pages[pages, :, 2 * g].reshape(-1, self.head_dim)

        def write_keys(i, g, positions, keys):
            positions = np.asarray(positions)
            kv_pages[page_table[i, positions // size], positions % size, 2 * g] = keys

        return plant(rng, rows, read_keys, write_keys, kv_heads=self.kv_heads,
                     softmax_scale=self.head_dim**-0.5, soft_cap=self.logits_soft_cap,
                     page_size=size)

    def shape(self, seed: int = 0) -> PagedShape:
        """The shape descriptor of `make_inputs(seed)` (num_pages depends on the seed)."""
        *_, num_pages = self._layout(np.random.default_rng(seed))
        return PagedShape(num_tokens=self.num_tokens, max_seqs=self.max_seqs,
                          pages_per_seq=self.pages_per_seq, page_size=self.page_size,
                          num_pages=num_pages, q_heads=self.q_heads, kv_heads=self.kv_heads,
                          head_dim=self.head_dim, dtype=self.dtype, features=features_of(self))

    def _layout(self, rng: np.random.Generator):
        """Lengths and page table: (context_lens, page_table, query_start_loc, num_pages)."""
        contexts = draw_lengths(rng, self.num_seqs, max(self.min_len, 1), self.max_len,
                                self.lengths)
        is_prefill = np.zeros(self.num_seqs, bool)
        is_prefill[rng.permutation(self.num_seqs)[: self.num_prefill]] = True
        q_lens = np.where(is_prefill, np.minimum(self.prefill_chunk, contexts), 1).astype(np.int32)
        used_pages = cdiv(contexts, self.page_size)
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

    def abstract_inputs(self) -> tuple[tuple, dict[str, Any]]:
        """ShapeDtypeStructs for the arrays (no data is made) and the static keywords."""
        struct = jax.ShapeDtypeStruct
        # The page pool is sized for every sequence at its longest (an upper bound).
        num_pages = self.max_seqs * self.pages_per_seq + 4
        arrays = (struct((self.num_tokens, self.q_heads, self.head_dim), self.dtype),
                  struct((num_pages, self.page_size, 2 * self.kv_heads, self.head_dim),
                         self.dtype),
                  struct((self.max_seqs,), "int32"),
                  struct((self.max_seqs, self.pages_per_seq), "int32"),
                  struct((self.max_seqs + 1,), "int32"), struct((), "int32"))
        return arrays, abstract_feature_kwargs(self)

    def size_text(self) -> str:
        return (f"seqs={self.num_seqs} ctx={self.max_len} page={self.page_size} "
                f"prefill={self.prefill_fraction:g}")

    def record_fields(self, shape: PagedShape) -> dict[str, Any]:
        return {"num_seqs": self.num_seqs, "num_tokens": shape.num_tokens,
                "page_size": self.page_size, "prefill_fraction": self.prefill_fraction,
                "prefill_chunk": self.prefill_chunk}

    def constraint_sizes(self, shape: PagedShape) -> dict[str, Any]:
        return {"num_tokens": shape.num_tokens, "num_seqs": self.num_seqs,
                "max_seqs": shape.max_seqs, "pages_per_seq": shape.pages_per_seq,
                "page_size": shape.page_size, "num_pages": shape.num_pages,
                "prefill_fraction": self.prefill_fraction}
