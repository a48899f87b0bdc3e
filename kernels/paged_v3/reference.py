"""ragged_paged_attention_v3 in float32 (variant "reference"): write the new tokens, then
the v2 operator's float32 reference on the whole cache dequantized to float32."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ..paged.inputs import PagedArgs
from ..paged.reference import ragged_paged_attention_reference
from ..reference import ALL_FEATURES
from ..tunables import NoConfig
from ..variant import Variant
from . import cache
from .inputs import PagedV3Args


def dequantized_pages(args: PagedV3Args, kv_cache: jax.Array) -> jax.Array:
    """The whole cache as float32 [P, page_size, 2 * Hkv, D], each value times its scale."""
    kv_heads, head_dim = args.keys.shape[1:]
    stored = cache.combined_view(kv_cache, kv_heads, head_dim)
    keys = cache.dequantize(stored[:, :, 0::2], args.k_scale)
    values = cache.dequantize(stored[:, :, 1::2], args.v_scale)
    return jnp.stack([keys, values], axis=3).reshape(stored.shape)


def as_paged_args(args: PagedV3Args, kv_pages: jax.Array) -> PagedArgs:
    """The v2 operator's arguments reading `kv_pages`; the active sequences are the
    distribution's last bound."""
    return PagedArgs(queries=args.queries, kv_pages=kv_pages, context_lens=args.context_lens,
                     page_table=args.page_table, query_start_loc=args.query_start_loc,
                     num_seqs=args.distribution[2], softmax_scale=args.softmax_scale,
                     window_left=args.window_left, logits_soft_cap=args.logits_soft_cap,
                     sinks=args.sinks)


def ragged_paged_attention_v3_reference(args: PagedV3Args, config: NoConfig | None = None, *,
                                        interpret: bool = False):
    """Returns (f32 [T, Hq, D], the updated cache)."""
    del config, interpret
    updated = cache.write_new_tokens(args)
    out = ragged_paged_attention_reference(as_paged_args(args, dequantized_pages(args, updated)))
    return out, updated


VARIANT = Variant(
    name="reference",
    op="paged_v3",
    platforms=("cpu", "gpu", "tpu"),
    interpretable=True,
    features=ALL_FEATURES,
    config_class=NoConfig,
    kernel=ragged_paged_attention_v3_reference,
    heuristic=lambda shape: NoConfig(),
    description="float32 XLA oracle: the write, then the paged reference on the whole "
                "cache dequantized to float32",
)
