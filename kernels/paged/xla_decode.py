"""ragged_paged_attention specialized for decode steps (every sequence has one query row).

In a decode step row i belongs to sequence i alone, so attention is flash decoding over
gathered pages. The KV blocks every sequence needs (its context, cut by the window) form one
work list; a while loop with a dynamic trip count takes ``blocks_per_step`` of them at a time,
whichever sequences they belong to, gathers their pages, and merges each block's partial
softmax into its sequence's running state. Short and long contexts then cost their own pages
and every step is the same size, however ragged the batch.

The decode path runs only when every active sequence has at most one query row (checked on
the values at run time); any other batch takes the ``xla_blocked`` kernel, so the result
never depends on what the batch holds.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from .. import softmax
from .inputs import PagedArgs, PagedShape
from ..sharding import vary_like
from ..tunables import POWER_OF_TWO, KernelConfig, cdiv, floor_power_of_two, one_of, tunable
from ..variant import Variant
from . import xla_blocked
from .xla_blocked import (MAX_SCORE_BLOCK_ELEMENTS, PAGE_COPIES, Layout, block_scores,
                          block_softmax, gather_kv_block, loop_variant, sequence_layout)


@dataclasses.dataclass(frozen=True)
class XlaDecodeConfig(KernelConfig):
    kv_pages_per_block: int = tunable(
        16, (1, 2, 4, 8, 16, 32, 64, 128), POWER_OF_TWO,
        "pages per KV block, the unit of the work list")
    blocks_per_step: int = tunable(
        4, (1, 2, 4, 8, 16), POWER_OF_TWO,
        "KV blocks (of any sequences) gathered and computed together in one loop step")
    prefill_queries_per_block: int = tunable(
        64, (8, 32, 64, 128), POWER_OF_TWO,
        "queries_per_block of the xla_blocked kernel that batches with prefill rows take")
    page_copy: str = tunable(
        "pages", PAGE_COPIES, one_of(*PAGE_COPIES),
        "how a KV block leaves the cache: whole pages then a transpose, or per-head slabs")

    def invalid_reason(self, shape: PagedShape) -> str | None:
        if self.kv_pages_per_block > floor_power_of_two(shape.pages_per_seq):
            return (f"kv_pages_per_block {self.kv_pages_per_block} exceeds pages_per_seq "
                    f"{shape.pages_per_seq} (rounded down to a power of two)")
        total_blocks = shape.max_seqs * cdiv(shape.pages_per_seq, self.kv_pages_per_block)
        if self.blocks_per_step > floor_power_of_two(total_blocks):
            return (f"blocks_per_step {self.blocks_per_step} exceeds the KV blocks of the whole "
                    f"page table ({total_blocks}, rounded down to a power of two)")
        elements = (shape.q_heads * self.blocks_per_step
                    * self.kv_pages_per_block * shape.page_size)
        if elements > MAX_SCORE_BLOCK_ELEMENTS:
            return (f"a score block of Hq x blocks_per_step x kv_pages_per_block x page_size "
                    f"= {elements} elements exceeds {MAX_SCORE_BLOCK_ELEMENTS}")
        return self._fallback(shape).invalid_reason(shape)

    def clamp(self, shape: PagedShape) -> XlaDecodeConfig:
        def too_big(rows: int, pages: int) -> bool:
            return shape.q_heads * rows * pages * shape.page_size > MAX_SCORE_BLOCK_ELEMENTS

        pages = min(self.kv_pages_per_block, floor_power_of_two(shape.pages_per_seq))
        total_blocks = shape.max_seqs * cdiv(shape.pages_per_seq, pages)
        steps = min(self.blocks_per_step, floor_power_of_two(total_blocks))
        while steps > 1 and too_big(steps, pages):
            steps //= 2
        while pages > 1 and too_big(steps, pages):
            pages //= 2
        queries = self.prefill_queries_per_block
        while queries > 1 and too_big(queries, pages):
            queries //= 2
        return self.replace(kv_pages_per_block=pages, blocks_per_step=steps,
                            prefill_queries_per_block=queries)

    def _fallback(self, shape: PagedShape) -> xla_blocked.XlaBlockedConfig:
        return fallback_config(self, shape.num_tokens)


def fallback_config(config: XlaDecodeConfig, num_tokens: int) -> xla_blocked.XlaBlockedConfig:
    """The xla_blocked config that batches with prefill rows run with."""
    return xla_blocked.XlaBlockedConfig(
        kv_pages_per_block=config.kv_pages_per_block,
        queries_per_block=min(config.prefill_queries_per_block, floor_power_of_two(num_tokens)),
        page_copy=config.page_copy)


def heuristic(shape: PagedShape) -> XlaDecodeConfig:
    """Blocks of 16 pages (at most 512 positions), 512 positions per step.

    Measured on a 2-core CPU (bfloat16 caches, decode batches): with 16-position pages, 16
    pages two per step won on Llama-3-8B (8 x 8K contexts), gpt-oss (16 long-tail 4K
    contexts) and a Qwen-2.5-7B-like group of 7 (4 x 4K), where the previous default (four
    256-position blocks per step) was 1.8x slower; with 32-position pages (Hq=40, Hkv=8, 12 x
    3K contexts) 16 pages one per step and 8 pages two per step were the two fastest (their
    order swapped between two runs on a loaded machine). Steps of 1024 positions or more,
    and blocks of 2048, were 1.5x-3x slower: the last block of a context computes masked
    positions, and a step waits for its slowest block.
    """
    pages = min(16, max(1, floor_power_of_two(max(512 // shape.page_size, 1))))
    return XlaDecodeConfig(
        kv_pages_per_block=pages,
        blocks_per_step=max(1, 512 // (pages * shape.page_size)),
        prefill_queries_per_block=64,
        page_copy="pages",
    ).clamp(shape)


def _merge(state: softmax.Partial, seq: jax.Array, part: softmax.Partial) -> softmax.Partial:
    """Merges the states `part` ([W, ...]) of W blocks into rows `seq` [W] of `state`.

    One block at a time, so two blocks of one sequence in a step merge in turn; each
    touches only its own row (not the whole state, whose size grows with max_seqs).
    """
    for index in range(seq.shape[0]):
        row = seq[index]
        old = softmax.Partial(*(jax.lax.dynamic_index_in_dim(field, row, keepdims=False)
                                for field in state))
        new = softmax.merge(old, softmax.Partial(*(field[index] for field in part)))
        state = softmax.Partial(*(jax.lax.dynamic_update_index_in_dim(field, value, row, 0)
                                  for field, value in zip(state, new)))
    return state


def _decode_step(args: PagedArgs, config: XlaDecodeConfig, layout: Layout) -> jax.Array:
    """Attention of a batch whose sequences have at most one query row. f32 [T, Hq, D]."""
    num_tokens, q_heads, head_dim = args.queries.shape
    num_pages, page_size, combined_heads, _ = args.kv_pages.shape
    kv_heads = combined_heads // 2
    group = q_heads // kv_heads
    max_seqs, pages_per_seq = args.page_table.shape
    pages_per_block = config.kv_pages_per_block
    width = config.blocks_per_step
    block_len = pages_per_block * page_size

    has_row = (layout.q_len == 1) & (layout.context > 0)
    position = layout.context - 1  # the one query row sits at the last key
    first_key = jnp.zeros_like(position)
    if args.window_left is not None:
        first_key = jnp.maximum(position - args.window_left, 0)
    first_page = first_key // page_size
    last_page = jnp.maximum(position, 0) // page_size
    blocks = jnp.where(has_row, cdiv(last_page - first_page + 1, pages_per_block), 0)
    ends = jnp.cumsum(blocks)
    begins = ends - blocks
    total_blocks = ends[-1]

    query_rows = jnp.minimum(layout.row_start, num_tokens - 1)
    queries = args.queries[query_rows].reshape(max_seqs, kv_heads, group, head_dim)

    def body(carry):
        step, state = carry
        kv_pages, step = loop_variant(args.kv_pages, step)
        item = step * width + jnp.arange(width)
        # Items past the list get sequence max_seqs: a scratch row of the state.
        seq = jnp.sum(ends[None, :] <= item[:, None], axis=1)
        safe_seq = jnp.minimum(seq, max_seqs - 1)
        block_first_page = first_page[safe_seq] + (item - begins[safe_seq]) * pages_per_block
        logical = block_first_page[:, None] + jnp.arange(pages_per_block)
        # Pages past a sequence's last one re-read that page (masked) instead of reading on.
        logical = jnp.clip(jnp.minimum(logical, last_page[safe_seq][:, None]), 0,
                           pages_per_seq - 1)
        page_ids = jnp.clip(args.page_table[safe_seq[:, None], logical], 0, num_pages - 1)
        keys, values = gather_kv_block(kv_pages, page_ids, config.page_copy)
        scores = block_scores(args, queries[safe_seq], keys)  # [W, Hkv, G, block_len]
        key_position = block_first_page[:, None] * page_size + jnp.arange(block_len)
        valid = ((key_position < layout.context[safe_seq][:, None])
                 & (key_position >= first_key[safe_seq][:, None])
                 & (seq < max_seqs)[:, None])
        part = block_softmax(scores, valid[:, None, None, :], values)
        return step + 1, _merge(state, seq, part)

    _, state = jax.lax.while_loop(
        lambda carry: carry[0] * width < total_blocks, body,
        vary_like((jnp.int32(0), softmax.empty((max_seqs + 1, kv_heads, group), head_dim)), args))
    state = softmax.Partial(*(field[:max_seqs] for field in state))
    sinks = None if args.sinks is None else args.sinks.reshape(kv_heads, group)
    out = softmax.finalize(state, sinks).reshape(max_seqs, q_heads, head_dim)
    rows = jnp.where(has_row, layout.row_start, num_tokens)  # num_tokens: dropped
    return jnp.zeros((num_tokens, q_heads, head_dim), jnp.float32).at[rows].set(
        out, mode="drop")


def ragged_paged_attention_decode(args: PagedArgs, config: XlaDecodeConfig, *,
                                  interpret: bool = False) -> jax.Array:
    """The xla_decode kernel. Returns f32 [T, Hq, D]; rows no sequence owns are zeros."""
    num_tokens, q_heads, head_dim = args.queries.shape
    if num_tokens == 0 or args.kv_pages.shape[0] == 0 or args.page_table.shape[1] == 0:
        return jnp.zeros((num_tokens, q_heads, head_dim), jnp.float32)
    fallback = fallback_config(config, num_tokens)
    layout = sequence_layout(args)
    return jax.lax.cond(
        jnp.all(layout.q_len <= 1),
        lambda: _decode_step(args, config, layout),
        lambda: xla_blocked.ragged_paged_attention_blocked(args, fallback, interpret=interpret))


VARIANT = Variant(
    name="xla_decode",
    op="paged",
    platforms=("cpu", "gpu", "tpu"),
    interpretable=True,
    features=frozenset({"sliding_window", "logits_soft_cap", "sinks"}),
    config_class=XlaDecodeConfig,
    kernel=ragged_paged_attention_decode,
    heuristic=heuristic,
    description="XLA flash decoding over one work list of (sequence, page block) for "
                "decode steps; batches with prefill rows take xla_blocked",
)
