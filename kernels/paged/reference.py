"""ragged_paged_attention in float32: the contract as plainly as possible (variant
"reference")."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ..reference import ALL_FEATURES, masked_softmax_attention
from ..softmax import soft_cap
from ..tunables import NoConfig
from ..variant import Variant
from .inputs import PagedArgs


def paged_token_positions(args: PagedArgs) -> tuple[jax.Array, jax.Array, jax.Array]:
    """For each query row t: (sequence id, absolute position p, is a real row).

    Sequence ids are clamped into [0, max_seqs) so they are always safe to index with.
    """
    num_tokens = args.queries.shape[0]
    max_seqs = args.page_table.shape[0]
    num_seqs = jnp.clip(args.num_seqs, 0, max_seqs)
    starts = jnp.clip(args.query_start_loc, 0, num_tokens)
    t = jnp.arange(num_tokens)
    active = jnp.arange(max_seqs) < num_seqs
    # Row t belongs to the first active sequence whose query range ends after t.
    ends_at_or_before = (starts[None, 1:] <= t[:, None]) & active[None, :]
    seq = jnp.sum(ends_at_or_before, axis=1)
    # Rows before query_start_loc[0] belong to no sequence, like those past the last one.
    is_real = (seq < num_seqs) & (t < starts[num_seqs]) & (t >= starts[0])
    seq = jnp.minimum(seq, max_seqs - 1)
    q_len = starts[seq + 1] - starts[seq]
    context = jnp.clip(args.context_lens[seq], 0, args.page_table.shape[1] * args.kv_pages.shape[1])
    position = context - q_len + (t - starts[seq])
    return seq, position, is_real


def ragged_paged_attention_reference(args: PagedArgs, config: NoConfig | None = None, *,
                                     interpret: bool = False) -> jax.Array:
    """ragged_paged_attention in float32. Returns f32 [T, Hq, D]; padding rows are zero."""
    del config, interpret
    num_tokens, q_heads, head_dim = args.queries.shape
    num_pages, page_size, combined_heads, _ = args.kv_pages.shape
    kv_heads = combined_heads // 2
    group = q_heads // kv_heads
    max_seqs, pages_per_seq = args.page_table.shape
    max_len = pages_per_seq * page_size

    # Each sequence's whole cache in logical order: [max_seqs, L, 2 * Hkv, D].
    pages = jnp.clip(args.page_table, 0, num_pages - 1)
    cache = args.kv_pages[pages].reshape(max_seqs, max_len, combined_heads, head_dim)
    cache = cache.astype(jnp.float32)
    seq, position, is_real = paged_token_positions(args)
    context = jnp.clip(args.context_lens, 0, max_len)
    queries = args.queries.astype(jnp.float32).reshape(num_tokens, kv_heads, group, head_dim)
    sinks = None if args.sinks is None else args.sinks.reshape(kv_heads, group)
    j = jnp.arange(max_len)

    def one_row(row):
        query, seq_id, p, real = row
        keys = cache[seq_id, :, 0::2]  # [L, Hkv, D]
        values = cache[seq_id, :, 1::2]
        scores = jnp.einsum("hgd,lhd->hgl", query, keys) * args.softmax_scale
        scores = soft_cap(scores, args.logits_soft_cap)
        valid = (j <= p) & (j < context[seq_id]) & real
        if args.window_left is not None:
            valid &= j >= p - args.window_left
        valid = jnp.broadcast_to(valid, scores.shape)
        values = jnp.transpose(values, (1, 0, 2))[:, None]  # [Hkv, 1, L, D]
        return masked_softmax_attention(scores, valid, values, sinks)

    # One row at a time (in small batches) keeps memory at one sequence's cache per row.
    out = jax.lax.map(one_row, (queries, seq, position, is_real), batch_size=8)
    return out.reshape(num_tokens, q_heads, head_dim)


VARIANT = Variant(
    name="reference",
    op="paged",
    platforms=("cpu", "gpu", "tpu"),
    interpretable=True,
    features=ALL_FEATURES,
    config_class=NoConfig,
    kernel=ragged_paged_attention_reference,
    heuristic=lambda shape: NoConfig(),
    description="float32 XLA oracle: gathers each sequence's pages, one query row at a time",
)
