"""decode_attention as blocked flash-decoding in plain XLA, reading only the blocks it needs.

The valid keys of every row (``[start, end)`` cut by the window) are covered by KV blocks of
``kv_block_size`` positions. All rows' needed blocks form one work list; a while loop with a
dynamic trip count takes ``blocks_per_step`` of them at a time (gathered from the cache by
(row, block)), computes each block's partial softmax ``(max, sum, out)`` and files it. The
partials of each row are merged at the end. A batch of short rows therefore costs its blocks,
not the full cache, and the work stays balanced however ragged the lengths are.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from ..inputs import DecodeArgs, DecodeShape
from ..reference import soft_cap
from ..tunables import POSITIVE_INT, POWER_OF_TWO, KernelConfig, one_of, tunable
from ..variant import Variant

SCORE_LAYOUTS = ("head_major", "sequence_major")
DOT_PRECISIONS = ("preferred_f32", "upcast_f32")


@dataclasses.dataclass(frozen=True)
class XlaBlockedConfig(KernelConfig):
    kv_block_size: int = tunable(
        256, (64, 128, 256, 512, 1024), POWER_OF_TWO,
        "cache positions per KV block (the unit of skipping and of partial softmax)")
    blocks_per_step: int = tunable(
        8, (2, 4, 8, 16, 32), POSITIVE_INT,
        "KV blocks (of any rows) gathered and computed together in one loop step")
    score_layout: str = tunable(
        "head_major", SCORE_LAYOUTS, one_of(*SCORE_LAYOUTS),
        "head_major: move the KV-head axis ahead of positions in each gathered block before "
        "the dots; sequence_major: contract the blocks as the cache lays them out")
    dot_precision: str = tunable(
        "preferred_f32", DOT_PRECISIONS, one_of(*DOT_PRECISIONS),
        "preferred_f32: dot the cache dtype with float32 accumulation; upcast_f32: convert "
        "the block to float32 first")

    def invalid_reason(self, shape: DecodeShape) -> str | None:
        if self.kv_block_size > _ceil_pow2(shape.max_len):
            return (f"kv_block_size {self.kv_block_size} exceeds the cache length "
                    f"S = {shape.max_len} rounded up to a power of two")
        if self.blocks_per_step > shape.batch * -(-shape.max_len // self.kv_block_size):
            return (f"blocks_per_step {self.blocks_per_step} exceeds the number of blocks in "
                    f"the cache ({shape.batch} rows x {-(-shape.max_len // self.kv_block_size)})")
        return None

    def clamp(self, shape: DecodeShape) -> XlaBlockedConfig:
        block = min(self.kv_block_size, _ceil_pow2(shape.max_len))
        total_blocks = shape.batch * -(-shape.max_len // block)
        return self.replace(kv_block_size=block,
                            blocks_per_step=min(self.blocks_per_step, total_blocks))


def _ceil_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def heuristic(shape: DecodeShape) -> XlaBlockedConfig:
    """Measured best on a 2-core CPU for B=8, S=8192, Hq=32, Hkv=8, D=128 bf16."""
    return XlaBlockedConfig().clamp(shape)


def _block_partials(query, key_blocks, value_blocks, positions, valid, args, config):
    """One step's partial softmax over `W` gathered blocks.

    query [W, Hkv, G, D]; key_blocks, value_blocks [W, N, Hkv, D] (cache dtype);
    positions, valid [W, N]. Returns max, sum [W, Hkv, G] and unnormalized out [W, Hkv, G, D],
    all float32; a block with no valid key has max -inf, sum 0 and out 0.
    """
    del positions
    if config.dot_precision == "upcast_f32":
        key_blocks = key_blocks.astype(jnp.float32)
        value_blocks = value_blocks.astype(jnp.float32)
        query = query.astype(jnp.float32)
    else:
        query = query.astype(key_blocks.dtype)
    if config.score_layout == "head_major":
        keys = jnp.swapaxes(key_blocks, 1, 2)  # [W, Hkv, N, D]
        values = jnp.swapaxes(value_blocks, 1, 2)
        scores = jnp.einsum("whgd,whnd->whgn", query, keys,
                            preferred_element_type=jnp.float32)
    else:
        scores = jnp.einsum("whgd,wnhd->whgn", query, key_blocks,
                            preferred_element_type=jnp.float32)
    scores = soft_cap(scores * args.softmax_scale, args.logits_soft_cap)
    mask = valid[:, None, None, :]
    scores = jnp.where(mask, scores, -jnp.inf)
    block_max = jnp.max(scores, axis=-1)
    # Not -inf: a block with no valid key would give exp(-inf - -inf) = NaN.
    shift = jnp.where(jnp.isfinite(block_max), block_max, 0.0)
    weights = jnp.exp(scores - shift[..., None])
    block_sum = jnp.sum(weights, axis=-1)
    weights = weights.astype(value_blocks.dtype)
    if config.score_layout == "head_major":
        out = jnp.einsum("whgn,whnd->whgd", weights, values,
                         preferred_element_type=jnp.float32)
    else:
        out = jnp.einsum("whgn,wnhd->whgd", weights, value_blocks,
                         preferred_element_type=jnp.float32)
    return block_max, block_sum, out


def decode_attention_blocked(args: DecodeArgs, config: XlaBlockedConfig, *,
                             interpret: bool = False) -> jax.Array:
    """decode_attention over only the needed KV blocks. Returns f32 [B, Hq, D]."""
    del interpret  # plain XLA runs natively everywhere
    batch, q_heads, head_dim = args.query.shape
    _, max_len, kv_heads, _ = args.key.shape
    group = q_heads // kv_heads
    block = min(config.kv_block_size, max_len)
    blocks_per_row = -(-max_len // block)
    width = config.blocks_per_step
    query = args.query.reshape(batch, kv_heads, group, head_dim)

    end = jnp.clip(args.sequence_end, 0, max_len)
    low = jnp.clip(args.sequence_start, 0, max_len)
    if args.window_left is not None:
        low = jnp.maximum(low, end - 1 - args.window_left)
    first_block = low // block
    block_count = jnp.where(end > low, -(-end // block) - first_block, 0)
    row_offset = jnp.cumsum(block_count) - block_count  # where each row's items begin
    total = jnp.sum(block_count)
    capacity = batch * blocks_per_row

    def locate(item):
        """(row, block index, slot in the partial buffers, is real) of work item `item`."""
        row = jnp.clip(jnp.searchsorted(row_offset + block_count, item, side="right"),
                       0, batch - 1)
        within = item - row_offset[row]
        real = item < total
        block_index = jnp.clip(first_block[row] + within, 0, blocks_per_row - 1)
        slot = jnp.where(real, row * blocks_per_row + within, capacity)  # spare slot
        return row, block_index, slot, real

    def gather_blocks(cache, row, slice_start):
        take = lambda r, s: jax.lax.dynamic_slice(
            cache, (r, s, 0, 0), (1, block, kv_heads, head_dim))[0]
        return jax.vmap(take)(row, slice_start)

    def step(carry):
        t, maxes, sums, outs = carry
        items = t * width + jnp.arange(width)
        row, block_index, slot, real = locate(items)
        block_start = block_index * block
        # The last block may hang past S: slice it from S - block instead (in bounds) and
        # mask the positions that belong to the previous block.
        slice_start = jnp.minimum(block_start, max_len - block)
        positions = slice_start[:, None] + jnp.arange(block)[None, :]
        valid = ((positions >= block_start[:, None]) & (positions >= low[row][:, None])
                 & (positions < end[row][:, None]) & real[:, None])
        key_blocks = gather_blocks(args.key, row, slice_start)
        value_blocks = gather_blocks(args.value, row, slice_start)
        block_max, block_sum, out = _block_partials(
            query[row], key_blocks, value_blocks, positions, valid, args, config)
        maxes = maxes.at[slot].set(block_max)
        sums = sums.at[slot].set(block_sum)
        outs = outs.at[slot].set(out)
        return t + 1, maxes, sums, outs

    num_steps = -(-total // width)
    partial = (capacity + 1, kv_heads, group)
    carry = (jnp.int32(0), jnp.full(partial, -jnp.inf, jnp.float32),
             jnp.zeros(partial, jnp.float32), jnp.zeros(partial + (head_dim,), jnp.float32))
    _, maxes, sums, outs = jax.lax.while_loop(lambda c: c[0] < num_steps, step, carry)

    shape4 = (batch, blocks_per_row, kv_heads, group)
    maxes = maxes[:capacity].reshape(shape4)
    sums = sums[:capacity].reshape(shape4)
    outs = outs[:capacity].reshape(shape4 + (head_dim,))
    row_max = jnp.max(maxes, axis=1)
    if args.sinks is not None:
        sinks = args.sinks.reshape(1, kv_heads, group)
        row_max = jnp.maximum(row_max, sinks)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    rescale = jnp.exp(maxes - row_max[:, None])  # exp(-inf) = 0 for unfilled slots
    denominator = jnp.sum(rescale * sums, axis=1)
    if args.sinks is not None:
        denominator = denominator + jnp.exp(sinks - row_max)
    numerator = jnp.sum(rescale[..., None] * outs, axis=1)
    safe = jnp.where(denominator > 0, denominator, 1.0)
    out = jnp.where(denominator[..., None] > 0, numerator / safe[..., None], 0.0)
    return out.reshape(batch, q_heads, head_dim)


VARIANT = Variant(
    name="xla_blocked",
    op="decode",
    platforms=("cpu", "gpu", "tpu"),
    interpretable=True,
    features=frozenset({"sliding_window", "logits_soft_cap", "sinks"}),
    config_class=XlaBlockedConfig,
    kernel=decode_attention_blocked,
    heuristic=heuristic,
    description="XLA flash-decoding over a work list of only the needed KV blocks "
                "(while loop, partial softmax per block, merged per row)",
)
