"""decode_attention: one new token per sequence against a contiguous KV cache.

The public function and the operator object (:class:`DecodeOperator`) that the rest of
attnbench asks about this op. The contract is docs/semantics.md.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from ..inputs import window_left_of
from ..operator import AttentionRow, Operator
from ..run import run_operator
from ..sharding import no_specs_without_mesh as _no_specs_without_mesh, shard_operator
from . import inputs
from .inputs import DecodeShape
from .problem import DecodeProblem


def decode_attention(
    query, key, value, sequence_start, sequence_end, *,
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
    """Attention of one new token per sequence against a contiguous KV cache.

    query [B, Hq, D] or [B, 1, Hq, D]; key, value [B, S, Hkv, D]; sequence_start,
    sequence_end int32 [B]. Row b attends keys start_b <= j < end_b (and the window), with
    the query at p = end_b - 1. Returns the query's rank and dtype. The contract:
    docs/semantics.md.

    variant / config: force a variant and/or config instead of the tuned-table choice.
    interpret: run a GPU/TPU variant on CPU through its interpreter.
    validate: also check lengths against S (host side), raising ValueError when wrong.
    mesh: run per shard inside jax.shard_map over this mesh. in_specs (one PartitionSpec per
    array: query, key, value, sequence_start, sequence_end) and out_specs default to the
    heads split over head_axis (default: the mesh's only axis, or "tp"); sinks, in any form,
    are split like the query heads. The tuned config is looked up for the per-shard shape.
    """
    if mesh is not None:
        return shard_operator(
            OPERATOR, (query, key, value, sequence_start, sequence_end),
            dict(softmax_scale=softmax_scale, sliding_window=sliding_window,
                 logits_soft_cap=logits_soft_cap, sinks=sinks),
            mesh=mesh, in_specs=in_specs, out_specs=out_specs, head_axis=head_axis,
            validate=validate, variant=variant, config=config, interpret=interpret)
    _no_specs_without_mesh(in_specs, out_specs, head_axis)
    rank4 = getattr(query, "ndim", None) == 4
    out = run_operator(
        OPERATOR, (query, key, value, sequence_start, sequence_end),
        dict(softmax_scale=softmax_scale, sliding_window=sliding_window,
             logits_soft_cap=logits_soft_cap, sinks=sinks),
        variant=variant, config=config, interpret=interpret, validate=validate,
        output_dtype=query.dtype)
    return out[:, None] if rank4 else out


class DecodeOperator(Operator):
    name = "decode"
    function_name = "decode_attention"
    size_axes = ("batch", "max_len")
    constraint_sizes_names = ("batch",)
    problem_class = DecodeProblem
    array_names = ("query", "key", "value", "sequence_start", "sequence_end")

    @property
    def function(self):
        return decode_attention

    def prepare(self, *args, **kwargs):
        prepared, shape, _ = inputs.prepare(*args, **kwargs)
        return prepared, shape

    def output_shape(self, shape):
        return (shape.batch, shape.q_heads, shape.head_dim)

    def has_no_work(self, shape):
        return shape.batch == 0 or shape.max_len == 0 or shape.q_heads == 0

    def value_arrays(self, args):
        return (args.sequence_start, args.sequence_end)

    def shard_specs(self, axis, arrays):
        heads = PartitionSpec(*(None,) * (arrays[0].ndim - 2), axis, None)
        cache = PartitionSpec(None, None, axis, None)
        return (heads, cache, cache, PartitionSpec(), PartitionSpec()), heads

    def value_problems(self, shape, sequence_start, sequence_end):
        return inputs.value_problems(sequence_start, sequence_end, shape.max_len)

    def attention_rows(self, args, kwargs):
        query, key, value, start, end = (np.asarray(a) for a in args[:5])
        window_left = window_left_of(kwargs.get("sliding_window"))
        rows = []
        for b in range(query.shape[0]):
            low = int(start[b]) if window_left is None else max(int(start[b]),
                                                                int(end[b]) - 1 - window_left)
            if end[b] > low:
                rows.append(AttentionRow(b, query[b], key[b], value[b], low, int(end[b]) - 1,
                                         sequence=b))
        return rows

    def key_fields(self, shape):
        # Decode has no pages; the field stays in the key so every op's keys share fields.
        return {"page_size": None}

    def key_sizes(self, shape):
        return {"batch": shape.batch, "max_len": shape.max_len}

    def key_field_problems(self, key, where):
        if key.get("page_size") is not None:
            return [f"{where}.page_size: must be null for op decode, got {key['page_size']!r}"]
        return []

    def lookup_shape(self, *, q_heads, kv_heads, head_dim, dtype, features, sizes):
        return DecodeShape(batch=sizes.get("batch") or 1, max_len=sizes["max_len"],
                           q_heads=q_heads, kv_heads=kv_heads, head_dim=head_dim, dtype=dtype,
                           features=features)

    def key_ranges(self, args, kwargs):
        key, start, end = args[1], args[3], args[4]
        max_len = key.shape[1]
        end = np.clip(np.asarray(end), 0, max_len)
        low = np.clip(np.asarray(start), 0, max_len)
        window_left = window_left_of(kwargs.get("sliding_window"))
        if window_left is not None:
            low = np.maximum(low, end - 1 - window_left)
        return np.stack([low, np.maximum(low, end)], axis=1)

    def _valid_rows(self, args, kwargs) -> int:
        query, key, _, start, end = args[:5]
        max_len = key.shape[1]
        end = np.clip(np.asarray(end), 0, max_len)
        low = np.clip(np.asarray(start), 0, max_len)
        window_left = window_left_of(kwargs.get("sliding_window"))
        if window_left is not None:
            low = np.maximum(low, end - 1 - window_left)
        return int(np.maximum(end - low, 0).sum())

    def bytes_moved(self, args, kwargs):
        query, key = args[0], args[1]
        _, _, kv_heads, head_dim = key.shape
        itemsize = np.dtype(key.dtype).itemsize
        kv_bytes = self._valid_rows(args, kwargs) * kv_heads * head_dim * 2 * itemsize
        return kv_bytes + 2 * query.size * np.dtype(query.dtype).itemsize

    def flops(self, args, kwargs):
        query, key = args[0], args[1]
        group = query.shape[-2] // key.shape[2]
        head_dim = key.shape[-1]
        # Per valid key row and KV head: q.k and p.v for each of the group's query heads.
        return self._valid_rows(args, kwargs) * key.shape[2] * group * head_dim * 2 * 2


OPERATOR = DecodeOperator()
