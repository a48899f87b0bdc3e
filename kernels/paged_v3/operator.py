"""ragged_paged_attention_v3: ragged paged attention that first writes the new tokens' keys
and values into a packed (optionally quantized) paged cache.

The public function and the operator object (:class:`PagedV3Operator`). The contract is
docs/semantics.md.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from ..operator import Operator
from ..paged.operator import OPERATOR as PAGED
from ..run import run_operator
from ..sharding import no_specs_without_mesh as _no_specs_without_mesh, shard_operator
from ..tunables import cdiv
from . import cache, inputs
from .inputs import PagedV3Shape
from .problem import PagedV3Problem
from .reference import dequantized_pages

_KV_CACHE = 3  # position of kv_cache among the public function's arguments


def ragged_paged_attention_v3(
    queries, keys, values, kv_cache, context_lens, page_table, query_start_loc, distribution,
    *,
    softmax_scale: float | None = None,
    sliding_window: int | tuple[int, int] | None = None,
    logits_soft_cap: float | None = None,
    sinks: jax.Array | None = None,
    k_scale: float | jax.Array | None = None,
    v_scale: float | jax.Array | None = None,
    variant: str | None = None,
    config: Mapping[str, Any] | None = None,
    interpret: bool = False,
    validate: bool = False,
    mesh: Mesh | None = None,
    in_specs: Sequence[PartitionSpec] | None = None,
    out_specs: tuple[PartitionSpec, PartitionSpec] | None = None,
    head_axis: str | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Writes the new tokens into the paged cache, then attends it. Returns (output
    [T, Hq, D] in the queries' dtype, the updated kv_cache).

    queries [T, Hq, D]; keys, values [T, Hkv, D]; kv_cache [P, page_size, ceil(2 * Hkv /
    pack), pack, D_padded] (pack = 32 / bits of its dtype; float32, bfloat16, float16,
    float8_e4m3fn or int8, the last two with per-tensor k_scale and v_scale); context_lens
    int32 [max_seqs]; page_table int32 [max_seqs, pages_per_seq] or flattened;
    query_start_loc int32 [max_seqs + 1]; distribution int32 [3], cumulative sequence
    counts of the decode, chunked-prefill and mixed bands. Donate kv_cache under jit to
    update it in place. The contract: docs/semantics.md.

    mesh= runs the call per shard inside jax.shard_map, as for decode_attention: in_specs
    name the eight array arguments in order, out_specs the output and the updated cache;
    by default heads are split over head_axis (queries, keys, values on their head axis,
    kv_cache on its packed-row axis, which needs pack to divide 2 * Hkv / shards).
    """
    arrays = (queries, keys, values, kv_cache, context_lens, page_table, query_start_loc,
              distribution)
    kwargs = dict(softmax_scale=softmax_scale, sliding_window=sliding_window,
                  logits_soft_cap=logits_soft_cap, sinks=sinks, k_scale=k_scale,
                  v_scale=v_scale)
    if mesh is not None:
        return shard_operator(
            OPERATOR, arrays, kwargs, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
            head_axis=head_axis, validate=validate, variant=variant, config=config,
            interpret=interpret)
    _no_specs_without_mesh(in_specs, out_specs, head_axis)
    return run_operator(OPERATOR, arrays, kwargs, variant=variant, config=config,
                        interpret=interpret, validate=validate, output_dtype=queries.dtype)


def _as_paged(args: tuple) -> tuple:
    """The v2 operator's positional arguments with the same rows and lengths (for the
    row-level questions, which do not read the cache)."""
    queries, _, _, kv_cache, context_lens, page_table, query_start_loc, distribution = args[:8]
    table = np.asarray(page_table).reshape(np.asarray(context_lens).shape[0], -1)
    return (queries, kv_cache, context_lens, table, query_start_loc,
            np.int32(np.asarray(distribution).reshape(-1)[2]))


class PagedV3Operator(Operator):
    name = "paged_v3"
    function_name = "ragged_paged_attention_v3"
    size_axes = ("tokens", "max_len")
    constraint_sizes_names = ("num_tokens", "num_seqs", "max_seqs", "pages_per_seq",
                              "page_size", "num_pages", "packing", "prefill_fraction",
                              "mixed_fraction")
    problem_class = PagedV3Problem
    donated_args = (_KV_CACHE,)

    @property
    def function(self):
        return ragged_paged_attention_v3

    def prepare(self, *args, **kwargs):
        return inputs.prepare(*args, **kwargs)

    def split_result(self, result):
        output, kv_cache = result
        return output, (kv_cache,)

    def join_result(self, output, extras):
        return output, *extras

    def extra_names(self):
        return ("kv_cache",)

    def plain_attention_inputs(self, args, kwargs):
        """The v2 operator's call on the cache after the write, dequantized to float32."""
        prepared, _ = self.prepare(*args, **kwargs)
        pages = dequantized_pages(prepared, cache.write_new_tokens(prepared))
        paged_kwargs = {k: v for k, v in kwargs.items() if k not in ("k_scale", "v_scale")}
        return PAGED.name, (prepared.queries, pages, prepared.context_lens, prepared.page_table,
                            prepared.query_start_loc, prepared.distribution[2]), paged_kwargs

    array_names = ("queries", "keys", "values", "kv_cache", "context_lens", "page_table",
                   "query_start_loc", "distribution")

    split_notes = {"kv_cache": "its axis 2 holds pack = 32 / bits combined key/value slots "
                               "per row, so a head split needs pack to divide 2 * Hkv / shards"}

    def shard_specs(self, axis, arrays):
        # A contiguous split of the packed rows gives each shard the combined slots 2g, 2g + 1
        # of its own key/value heads, laid out as a cache of Hkv / shards heads would be,
        # whenever the split divides the rows (then no row mixes two shards' heads). The
        # updated cache comes back split the same way.
        heads = PartitionSpec(None, axis, None)
        cache_spec = PartitionSpec(None, None, axis, None, None)
        indices = (PartitionSpec(),) * 4
        return (heads, heads, heads, cache_spec) + indices, (heads, cache_spec)

    def output_shape(self, shape):
        return (shape.num_tokens, shape.q_heads, shape.head_dim)

    def has_no_work(self, shape):
        # With no token or no page, nothing is written and nothing can be attended.
        return 0 in (shape.num_tokens, shape.q_heads, shape.max_seqs, shape.pages_per_seq,
                     shape.page_size, shape.num_pages)

    def no_work_result(self, args, shape, output_dtype):
        return (jnp.zeros(self.output_shape(shape), output_dtype), args.kv_cache)

    def attention_rows(self, args, kwargs):
        _, plain_args, plain_kwargs = self.plain_attention_inputs(args, kwargs)
        return PAGED.attention_rows(plain_args, plain_kwargs)

    def value_arrays(self, args):
        return (args.context_lens, args.page_table, args.query_start_loc, args.distribution)

    def value_problems(self, shape, context_lens, page_table, query_start_loc, distribution):
        return inputs.value_problems(context_lens, page_table, query_start_loc, distribution,
                                     num_pages=shape.num_pages, page_size=shape.page_size,
                                     num_tokens=shape.num_tokens)

    def zero_rows(self, args):
        return PAGED.zero_rows(_as_paged(args))

    def key_ranges(self, args, kwargs):
        return PAGED.key_ranges(_as_paged(args), kwargs)

    def key_fields(self, shape):
        return {"page_size": shape.page_size, "cache_dtype": shape.cache_dtype,
                "packing": shape.packing}

    def key_sizes(self, shape):
        return {"tokens": shape.num_tokens, "max_len": shape.max_len}

    def key_field_problems(self, key, where):
        problems = PAGED.key_field_problems(key, where)
        cache_dtype = key.get("cache_dtype")
        if cache_dtype not in cache.CACHE_PACKING:
            problems.append(f"{where}.cache_dtype: must be one of {list(cache.CACHE_PACKING)} "
                            f"for op paged_v3, got {cache_dtype!r}")
        elif key.get("packing") != cache.packing(cache_dtype):
            problems.append(f"{where}.packing: must be {cache.packing(cache_dtype)} for "
                            f"cache_dtype {cache_dtype}, got {key.get('packing')!r}")
        return problems

    def lookup_shape(self, *, q_heads, kv_heads, head_dim, dtype, features, sizes):
        page_size = sizes.get("page_size") or 16
        tokens = sizes.get("tokens") or 1
        pages_per_seq = cdiv(sizes["max_len"], page_size)
        seqs = sizes.get("max_seqs") or tokens
        cache_dtype = sizes.get("cache_dtype") or dtype
        if cache_dtype not in cache.CACHE_PACKING:
            raise ValueError(f"cache_dtype must be one of {list(cache.CACHE_PACKING)}, got "
                             f"{cache_dtype!r}")
        return PagedV3Shape(num_tokens=tokens, max_seqs=seqs, pages_per_seq=pages_per_seq,
                            page_size=page_size, num_pages=seqs * pages_per_seq,
                            q_heads=q_heads, kv_heads=kv_heads, head_dim=head_dim, dtype=dtype,
                            cache_dtype=cache_dtype, features=features)

    def bytes_moved(self, args, kwargs):
        """The v2 floor over the cache's stored bytes (valid K/V rows read once, queries and
        outputs), plus the new tokens' keys and values read and their cache slots written."""
        queries, keys, _, kv_cache = args[:4]
        rows, _ = PAGED._rows(_as_paged(args), kwargs)
        slot = int(np.prod(kv_cache.shape[2:])) * np.dtype(kv_cache.dtype).itemsize
        read = rows * slot
        real_tokens = int(np.asarray(args[6])[int(np.asarray(args[7]).reshape(-1)[2])])
        new = 2 * keys[0].size * np.dtype(keys.dtype).itemsize * real_tokens
        return read + new + real_tokens * slot + 2 * queries.size * np.dtype(queries.dtype).itemsize

    def flops(self, args, kwargs):
        return PAGED.flops(_as_paged(args), kwargs)


OPERATOR = PagedV3Operator()
