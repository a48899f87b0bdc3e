"""The packed paged cache of ragged_paged_attention_v3: layout, quantization, the write.

Layout ``[P, page_size, ceil(2 * Hkv / pack), pack, D_padded]``: one cache position holds
the key and value of every KV head, combined index 2g (key of head g) and 2g + 1 (value),
laid out row-major over the (row, pack) axes; ``pack = 32 / bits`` of the cache dtype, so a
32-bit word holds `pack` heads' elements; ``D_padded`` is D rounded up to 128 (the TPU lane
count). Combined slots past 2 * Hkv and lanes past D are padding.

Values are stored as ``cast(x / scale)`` (round to nearest; saturating for float8 and int8)
and read as ``stored * scale``; a float cache without a scale stores ``cast(x)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ..tunables import cdiv

LANES = 128
# Cache dtypes and their packing (elements per 32-bit word).
CACHE_PACKING = {"float32": 1, "bfloat16": 2, "float16": 2, "float8_e4m3fn": 4, "int8": 4}
QUANTIZED = ("float8_e4m3fn", "int8")


def packing(cache_dtype: str) -> int:
    return CACHE_PACKING[cache_dtype]


def padded_head_dim(head_dim: int) -> int:
    return cdiv(head_dim, LANES) * LANES


def cache_shape(num_pages: int, page_size: int, kv_heads: int, head_dim: int,
                cache_dtype: str) -> tuple[int, int, int, int, int]:
    """The cache shape for these sizes and this dtype."""
    pack = packing(cache_dtype)
    return (num_pages, page_size, cdiv(2 * kv_heads, pack), pack, padded_head_dim(head_dim))


def quantize(x: jax.Array, scale, cache_dtype) -> jax.Array:
    """`x` (any float dtype) as stored in a cache of `cache_dtype`, divided by `scale`
    (None: no division). Rounds to nearest; float8 and int8 saturate at their range."""
    dtype = jnp.dtype(cache_dtype)
    if scale is None and dtype.name not in QUANTIZED:
        return x.astype(dtype)
    x = x.astype(jnp.float32)
    if scale is not None:
        x = x / scale
    if dtype.name == "int8":
        return jnp.clip(jnp.round(x), -128, 127).astype(dtype)
    if dtype.name == "float8_e4m3fn":
        top = float(jnp.finfo(dtype).max)
        return jnp.clip(x, -top, top).astype(dtype)  # clip keeps NaN, so NaN is stored
    return x.astype(dtype)


def dequantize(stored: jax.Array, scale) -> jax.Array:
    """Stored values in float32, times `scale` (None: 1)."""
    values = stored.astype(jnp.float32)
    return values if scale is None else values * scale


def token_slabs(keys: jax.Array, values: jax.Array, kv_cache: jax.Array, k_scale, v_scale
                ) -> jax.Array:
    """The new tokens as cache positions: [T, rows, pack, D_padded] in the cache dtype,
    K of head g at combined slot 2g and V at 2g + 1, padding slots and lanes zero."""
    num_tokens, kv_heads, head_dim = keys.shape
    _, _, rows, pack, lanes = kv_cache.shape
    stored_k = quantize(keys, k_scale, kv_cache.dtype)
    stored_v = quantize(values, v_scale, kv_cache.dtype)
    combined = jnp.stack([stored_k, stored_v], axis=2).reshape(num_tokens, 2 * kv_heads, head_dim)
    combined = jnp.pad(combined, ((0, 0), (0, rows * pack - 2 * kv_heads), (0, lanes - head_dim)))
    return combined.reshape(num_tokens, rows, pack, lanes)


def write_slots(args) -> tuple[jax.Array, jax.Array]:
    """(page, row) of the cache each new token is written to; page = P (dropped) for
    padding rows and for positions outside the sequence's pages or the cache."""
    num_tokens = args.queries.shape[0]
    num_pages, page_size = args.kv_cache.shape[:2]
    max_seqs, pages_per_seq = args.page_table.shape
    active = jnp.clip(args.distribution[2], 0, max_seqs)
    starts = jnp.clip(args.query_start_loc, 0, num_tokens)
    t = jnp.arange(num_tokens)
    is_active = jnp.arange(max_seqs) < active
    seq = jnp.sum((starts[None, 1:] <= t[:, None]) & is_active[None, :], axis=1)
    real = (seq < active) & (t >= starts[0]) & (t < starts[active])
    seq = jnp.minimum(seq, max_seqs - 1)
    q_len = starts[seq + 1] - starts[seq]
    position = args.context_lens[seq] - q_len + (t - starts[seq])
    logical = position // page_size
    inside = real & (position >= 0) & (logical < pages_per_seq)
    page = args.page_table[seq, jnp.clip(logical, 0, pages_per_seq - 1)]
    inside &= (page >= 0) & (page < num_pages)
    return jnp.where(inside, page, num_pages), jnp.where(inside, position % page_size, 0)


def write_new_tokens(args) -> jax.Array:
    """The cache with every new token's key and value written into its slot (in place
    under jit with the cache donated: one scatter of T positions, no copy)."""
    slabs = token_slabs(args.keys, args.values, args.kv_cache, args.k_scale, args.v_scale)
    page, row = write_slots(args)
    dtype = args.kv_cache.dtype
    if dtype.itemsize < 4 and jnp.issubdtype(dtype, jnp.floating):
        # XLA:CPU scatters 16- and 8-bit floats by converting the whole cache to float32
        # and back (0.8 s for a 170 MB cache); as same-width integers it writes T slots.
        bits = jnp.dtype(f"uint{8 * dtype.itemsize}")
        stored = jax.lax.bitcast_convert_type(args.kv_cache, bits)
        stored = stored.at[page, row].set(jax.lax.bitcast_convert_type(slabs, bits), mode="drop")
        return jax.lax.bitcast_convert_type(stored, dtype)
    return args.kv_cache.at[page, row].set(slabs, mode="drop")


def combined_view(kv_cache: jax.Array, kv_heads: int, head_dim: int) -> jax.Array:
    """The cache as [P, page_size, 2 * Hkv, D] (the v2 layout) in its stored dtype.

    Free (a reshape) when there are no padding slots or lanes; otherwise a slice, which
    copies the cache."""
    num_pages, page_size, rows, pack, lanes = kv_cache.shape
    flat = kv_cache.reshape(num_pages, page_size, rows * pack, lanes)
    if rows * pack != 2 * kv_heads or lanes != head_dim:
        flat = flat[:, :, : 2 * kv_heads, :head_dim]
    return flat


def numpy_cache(kv_pages: np.ndarray, cache_dtype: str, k_scale, v_scale) -> jax.Array:
    """A v2-layout float array [P, page_size, 2 * Hkv, D] stored in the packed layout."""
    num_pages, page_size, combined, head_dim = kv_pages.shape
    kv_heads = combined // 2
    pages = jnp.asarray(kv_pages, jnp.float32).reshape(num_pages * page_size, kv_heads, 2, head_dim)
    empty = jnp.zeros(cache_shape(num_pages * page_size, 1, kv_heads, head_dim, cache_dtype),
                      cache_dtype)
    slabs = token_slabs(pages[:, :, 0], pages[:, :, 1], empty, k_scale, v_scale)
    return slabs.reshape(cache_shape(num_pages, page_size, kv_heads, head_dim, cache_dtype))
