"""ragged_paged_attention: any mix of prefill and decode tokens against a paged KV cache.

The public function and the operator object (:class:`PagedOperator`). The contract is
docs/semantics.md.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from ..inputs import window_left_of
from ..operator import AttentionRow, Operator
from ..run import run_operator
from ..sharding import no_specs_without_mesh as _no_specs_without_mesh, shard_operator
from ..tunables import cdiv
from . import inputs
from .inputs import PagedShape
from .problem import PagedProblem


def ragged_paged_attention(
    queries, kv_pages, context_lens, page_table, query_start_loc, num_seqs, *,
    softmax_scale: float | None = None,
    sliding_window: int | tuple[int, int] | None = None,
    logits_soft_cap: float | None = None,
    sinks: jax.Array | None = None,
    variant: str | None = None,
    config: Mapping[str, Any] | None = None,
    interpret: bool = False,
    validate: bool = False,
    mesh: Mesh | None = None,
    in_specs: Sequence[PartitionSpec] | None = None,
    out_specs: PartitionSpec | None = None,
    head_axis: str | None = None,
) -> jax.Array:
    """Attention for a ragged mix of prefill and decode tokens against a paged KV cache.

    queries [T, Hq, D]; kv_pages [P, page_size, 2 * Hkv, D] (key of head g at 2g, value at
    2g + 1); context_lens int32 [max_seqs]; page_table int32 [max_seqs, pages_per_seq];
    query_start_loc int32 [max_seqs + 1]; num_seqs int32 scalar or [1]. Returns [T, Hq, D]
    in the queries' dtype; rows past query_start_loc[num_seqs] are zeros. The contract:
    docs/semantics.md. The other keywords are decode_attention's; with mesh=, in_specs name
    queries, kv_pages, context_lens, page_table, query_start_loc and num_seqs.
    """
    if mesh is not None:
        return shard_operator(
            OPERATOR, (queries, kv_pages, context_lens, page_table, query_start_loc, num_seqs),
            dict(softmax_scale=softmax_scale, sliding_window=sliding_window,
                 logits_soft_cap=logits_soft_cap, sinks=sinks),
            mesh=mesh, in_specs=in_specs, out_specs=out_specs, head_axis=head_axis,
            validate=validate, variant=variant, config=config, interpret=interpret)
    _no_specs_without_mesh(in_specs, out_specs, head_axis)
    return run_operator(
        OPERATOR, (queries, kv_pages, context_lens, page_table, query_start_loc, num_seqs),
        dict(softmax_scale=softmax_scale, sliding_window=sliding_window,
             logits_soft_cap=logits_soft_cap, sinks=sinks),
        variant=variant, config=config, interpret=interpret, validate=validate,
        output_dtype=queries.dtype)


class PagedOperator(Operator):
    name = "paged"
    function_name = "ragged_paged_attention"
    size_axes = ("tokens", "max_len")
    constraint_sizes_names = ("num_tokens", "num_seqs", "max_seqs", "pages_per_seq",
                              "page_size", "num_pages", "prefill_fraction")
    problem_class = PagedProblem
    array_names = ("queries", "kv_pages", "context_lens", "page_table", "query_start_loc",
                   "num_seqs")

    @property
    def function(self):
        return ragged_paged_attention

    def prepare(self, *args, **kwargs):
        return inputs.prepare(*args, **kwargs)

    def output_shape(self, shape):
        return (shape.num_tokens, shape.q_heads, shape.head_dim)

    def has_no_work(self, shape):
        return 0 in (shape.num_tokens, shape.q_heads, shape.max_seqs, shape.pages_per_seq,
                     shape.page_size, shape.num_pages)

    def value_arrays(self, args):
        return (args.context_lens, args.page_table, args.query_start_loc, args.num_seqs)

    def shard_specs(self, axis, arrays):
        # kv_pages interleaves key and value per head (2g, 2g + 1): a contiguous split of
        # that axis gives each shard whole pairs, matching its query heads.
        heads = PartitionSpec(None, axis, None)
        indices = (PartitionSpec(),) * 4
        return (heads, PartitionSpec(None, None, axis, None)) + indices, heads

    def value_problems(self, shape, context_lens, page_table, query_start_loc, num_seqs):
        return inputs.value_problems(context_lens, page_table, query_start_loc, num_seqs,
                                     num_pages=shape.num_pages, page_size=shape.page_size,
                                     num_tokens=shape.num_tokens)

    def zero_rows(self, args):
        num_tokens = args[0].shape[0]
        real_rows = int(np.asarray(args[4])[int(np.asarray(args[5]).reshape(()))])
        return np.arange(num_tokens) >= real_rows

    def key_ranges(self, args, kwargs):
        num_tokens = args[0].shape[0]
        contexts = np.asarray(args[2])
        starts = np.asarray(args[4])
        active = int(np.asarray(args[5]).reshape(()))
        window_left = window_left_of(kwargs.get("sliding_window"))
        ranges = np.zeros((num_tokens, 2), np.int64)
        for i in range(active):
            rows = np.arange(starts[i], min(starts[i + 1], num_tokens))
            position = contexts[i] - (starts[i + 1] - starts[i]) + (rows - starts[i])
            low = np.zeros_like(position) if window_left is None else np.maximum(
                position - window_left, 0)
            ranges[rows] = np.stack([low, position + 1], axis=1)
        return ranges

    def attention_rows(self, args, kwargs):
        queries, kv_pages, context_lens, page_table, starts, num_seqs = (
            np.asarray(a) for a in args[:6])
        window_left = window_left_of(kwargs.get("sliding_window"))
        rows = []
        for i in range(int(num_seqs.reshape(()))):
            first, q_len, context = int(starts[i]), int(starts[i + 1] - starts[i]), int(context_lens[i])
            cache = kv_pages[np.clip(page_table[i], 0, len(kv_pages) - 1)].reshape(
                -1, kv_pages.shape[2], kv_pages.shape[3])
            for r in sorted({0, q_len - 1}):
                position = context - q_len + r
                low = 0 if window_left is None else max(0, position - window_left)
                rows.append(AttentionRow(first + r, queries[first + r], cache[:, 0::2],
                                         cache[:, 1::2], low, position, sequence=i,
                                         first_of_chunk=q_len > 1 and r == 0))
        return rows

    def boundary_sizes(self, args):
        return {args[1].shape[1]: "page"}

    def with_page_moved(self, args, sequence, logical_page):
        table = np.asarray(args[3]).copy()
        table[sequence, logical_page] = (table[sequence, logical_page] + 1) % args[1].shape[0]
        return (*args[:3], jnp.asarray(table), *args[4:])

    def key_fields(self, shape):
        return {"page_size": shape.page_size}

    def key_sizes(self, shape):
        return {"tokens": shape.num_tokens, "max_len": shape.max_len}

    def key_field_problems(self, key, where):
        page_size = key.get("page_size")
        if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 1:
            return [f"{where}.page_size: must be a positive int for op paged, got {page_size!r}"]
        return []

    def lookup_shape(self, *, q_heads, kv_heads, head_dim, dtype, features, sizes):
        page_size = sizes.get("page_size") or 16
        tokens = sizes.get("tokens") or 1
        pages_per_seq = cdiv(sizes["max_len"], page_size)
        seqs = sizes.get("max_seqs") or tokens
        return PagedShape(num_tokens=tokens, max_seqs=seqs, pages_per_seq=pages_per_seq,
                          page_size=page_size, num_pages=seqs * pages_per_seq, q_heads=q_heads,
                          kv_heads=kv_heads, head_dim=head_dim, dtype=dtype, features=features)

    def _rows(self, args, kwargs) -> tuple[int, int]:
        """(valid key rows over all sequences, valid (query, key) pairs)."""
        _, _, context_lens, _, query_start_loc, num_seqs = args[:6]
        contexts = np.asarray(context_lens)
        starts = np.asarray(query_start_loc)
        active = int(np.asarray(num_seqs).reshape(()))
        window_left = window_left_of(kwargs.get("sliding_window"))
        rows = pairs = 0
        for i in range(active):
            context = int(contexts[i])
            q_len = int(starts[i + 1] - starts[i])
            first_query = context - q_len
            low = 0 if window_left is None else max(0, first_query - window_left)
            rows += max(context - low, 0)
            for p in range(first_query, context):
                seen = p + 1 if window_left is None else min(p + 1, window_left + 1)
                pairs += max(seen, 0)
        return rows, pairs

    def bytes_moved(self, args, kwargs):
        queries, kv_pages = args[0], args[1]
        head_dim = kv_pages.shape[-1]
        kv_heads = kv_pages.shape[2] // 2
        rows, _ = self._rows(args, kwargs)
        kv_bytes = rows * kv_heads * head_dim * 2 * np.dtype(kv_pages.dtype).itemsize
        return kv_bytes + 2 * queries.size * np.dtype(queries.dtype).itemsize

    def flops(self, args, kwargs):
        queries = args[0]
        _, pairs = self._rows(args, kwargs)
        return pairs * queries.shape[1] * queries.shape[2] * 2 * 2


OPERATOR = PagedOperator()
