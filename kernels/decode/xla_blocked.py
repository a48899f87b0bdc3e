"""decode_attention as blocked flash-decoding in plain XLA, reading only the blocks it needs.

The valid keys of every row (``[start, end)`` cut by the window) are covered by KV blocks of
``kv_block_size`` positions. All rows' needed blocks form one work list, cut into
``num_kv_splits`` independent parts; each part is a while loop with a dynamic trip count that
slices ``blocks_per_step`` blocks at a time out of the cache by (row, block), computes each
block's partial softmax ``(max, sum, out)`` and files it under (row, block). The partials of
each row are merged at the end. A batch of short rows therefore costs its blocks, not the
full cache, and the work stays balanced however ragged the lengths are.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from .. import softmax
from .inputs import DecodeArgs, DecodeShape
from ..sharding import vary_like
from ..softmax import soft_cap
from ..tunables import (
    BOOL, POWER_OF_TWO, KernelConfig, cdiv, floor_power_of_two, int_in, next_power_of_two,
    one_of, tunable,
)
from ..variant import Variant

CONTRACTIONS = ("fused_reduce", "head_major_dot", "key_major_dot", "block_diagonal_dot")
# Contractions that copy each block head-major ([Hkv, N, D]) before the products.
_HEAD_MAJOR = ("head_major_dot", "key_major_dot")


@dataclasses.dataclass(frozen=True)
class XlaBlockedConfig(KernelConfig):
    kv_block_size: int = tunable(
        1024, (64, 128, 256, 512, 1024, 2048), POWER_OF_TWO,
        "cache positions per KV block (the unit of skipping and of partial softmax)")
    blocks_per_step: int = tunable(
        1, (1, 2, 4, 8), int_in(1, 64),
        "KV blocks (of any rows) computed in one loop step; more amortizes the per-step cost")
    contraction: str = tunable(
        "key_major_dot", CONTRACTIONS, one_of(*CONTRACTIONS),
        "how q.k and p.v are written: fused_reduce multiplies and reduces over the cache "
        "layout as is; head_major_dot copies each block head-major and uses batched dots; "
        "key_major_dot copies each block head-major in float32 and writes q.k as keys x "
        "query^T (the block's keys on the dot's rows): on XLA:CPU that q.k took about 9 ms "
        "against 13 ms for head_major_dot's query x keys^T on the B=8 S=8192 Llama-3-8B "
        "decode benchmark (bfloat16 cache); "
        "block_diagonal_dot uses one dot over all heads (Hkv times the flops, no transpose)")
    num_kv_splits: int = tunable(
        2, (1, 2, 4), int_in(1, 16),
        "independent parts of the work list, each its own loop with its own partials, "
        "merged at the end (parallel work for XLA's runtime)")
    slice_as_bits: bool = tunable(
        False, (False, True), BOOL,
        "slice blocks out of the cache as same-width unsigned ints, so XLA's CPU backend "
        "copies them as 16-bit words instead of widening bfloat16/float16 to float32 first")

    def invalid_reason(self, shape: DecodeShape) -> str | None:
        if self.kv_block_size > next_power_of_two(shape.max_len):
            return (f"kv_block_size {self.kv_block_size} exceeds the cache length "
                    f"S = {shape.max_len} rounded up to a power of two")
        blocks = shape.batch * cdiv(shape.max_len, self.kv_block_size)
        if self.blocks_per_step > blocks:
            return (f"blocks_per_step {self.blocks_per_step} exceeds the {blocks} KV blocks "
                    f"of the cache")
        return None

    def clamp(self, shape: DecodeShape) -> XlaBlockedConfig:
        block = min(self.kv_block_size, next_power_of_two(shape.max_len))
        blocks = shape.batch * cdiv(shape.max_len, block)
        return self.replace(kv_block_size=block, blocks_per_step=min(self.blocks_per_step, blocks))


# Cache bytes one KV block spans over all KV heads (keys only): blocks of ~2 MiB were the
# fastest measured on a 2-core CPU whatever the head count (see heuristic).
BLOCK_BYTES = 2 << 20


def heuristic(shape: DecodeShape) -> XlaBlockedConfig:
    """Measured on a 2-core CPU (XLA:CPU, bfloat16 caches, sweeps of kv_block_size x
    blocks_per_step x contraction).

    The block's size follows the bytes it spans, not a fixed count of positions: a position
    holds Hkv x D values, and the fastest blocks spanned about 2 MiB of keys. Llama-3-8B
    (Hkv=8, D=128, B=8, S=8192): 1024 positions, 13-14 ms against 15-16 ms for 512; Gemma-2
    (Hkv=8, D=256): 512; an MHA model (Hkv=32, D=128, B=4, S=4096): 256 positions two per
    step took 79 ms against 430 ms for 1024 one per step (the previous default, 5.4x slower).
    Steps of fewer than 512 positions pay the loop's per-step cost too often, so small blocks
    go two or more per step. A sliding window caps the keys a row reads, and its winners were
    half the size (512 on Mistral's 4096 window, 256 on gpt-oss's 128); a batch with few
    blocks in all gets smaller ones so that both cores have work.

    key_major_dot was the fastest, or within about 5% of it, on the GQA and MHA shapes
    measured (group sizes 1, 4 and 6; Gemma-2's D=256 tuned to fused_reduce, 1.0x-1.3x apart
    on a loaded machine); fused_reduce was about 40x slower on MHA. MQA (one KV head): the dots of head_major_dot have all the query heads as
    rows and need no transposed copy, so they run in the cache dtype at full width: 2048-position
    blocks took 3.3 ms against 9.3 ms for the GQA default on starcoder-15b (Hq=48, B=8,
    S=4096), and 4.6 ms against 7.2 ms on gemma-2b (Hq=8, D=256, S=8192).
    """
    if shape.kv_heads == 1:
        return XlaBlockedConfig(contraction="head_major_dot", kv_block_size=2048).clamp(shape)
    position_bytes = shape.kv_heads * shape.head_dim * jnp.dtype(shape.dtype).itemsize
    block = min(max(floor_power_of_two(max(BLOCK_BYTES // position_bytes, 1)), 256), 1024)
    if "sliding_window" in shape.features:
        block = max(block // 2, 256)
    while block > 256 and shape.batch * cdiv(shape.max_len, block) < 8:
        block //= 2
    return XlaBlockedConfig(kv_block_size=block, blocks_per_step=max(1, 512 // block),
                            contraction="key_major_dot").clamp(shape)


def _scores(query, keys, contraction):
    """q.k of one block, f32: [N, Hkv, G] ([Hkv, G, N] for the head-major contractions).

    query [Hkv, G, D] (float32, or the cache dtype for head_major_dot); keys [N, Hkv, D]
    ([Hkv, N, D] for the head-major contractions).
    """
    if contraction == "fused_reduce":
        return jnp.sum(keys[:, :, None, :].astype(jnp.float32) * query[None], axis=-1)
    if contraction == "head_major_dot":
        return jnp.einsum("hgd,hnd->hgn", query, keys, preferred_element_type=jnp.float32)
    if contraction == "key_major_dot":
        scores = jnp.einsum("hnd,hdg->hng", keys.astype(jnp.float32), jnp.swapaxes(query, 1, 2),
                            preferred_element_type=jnp.float32)
        return jnp.swapaxes(scores, 1, 2)  # [Hkv, G, N]: small, the swap is cheap
    kv_heads = keys.shape[1]
    # Query laid out block-diagonally over (head, dim) so one plain dot covers all heads.
    eye = jnp.eye(kv_heads, dtype=jnp.float32)
    diagonal = query[:, :, None, :] * eye[:, None, :, None]  # [Hkv, G, Hkv', D]
    diagonal = diagonal.reshape(-1, kv_heads * keys.shape[2])
    flat = keys.reshape(keys.shape[0], -1).astype(jnp.float32)
    return jnp.einsum("nk,mk->nm", flat, diagonal).reshape(keys.shape[0], kv_heads, -1)


def _weighted_values(weights, values, contraction):
    """p.v of one block -> f32 [Hkv, G, D]. weights f32 and values laid out as in _scores."""
    if contraction == "fused_reduce":
        return jnp.sum(weights[..., None] * values[:, :, None, :].astype(jnp.float32), axis=0)
    if contraction == "head_major_dot":
        # The weights are rounded to the cache dtype so the dot runs natively in it.
        return jnp.einsum("hgn,hnd->hgd", weights.astype(values.dtype), values,
                          preferred_element_type=jnp.float32)
    if contraction == "key_major_dot":
        return jnp.einsum("hgn,hnd->hgd", weights, values.astype(jnp.float32))
    count, kv_heads, head_dim = values.shape
    flat = values.reshape(count, -1).astype(jnp.float32)
    every_pair = jnp.einsum("nm,nk->mk", weights.reshape(count, -1), flat)  # [(h,g), (h',d)]
    every_pair = every_pair.reshape(kv_heads, -1, kv_heads, head_dim)
    return jnp.einsum("hgjd,hj->hgd", every_pair, jnp.eye(kv_heads, dtype=jnp.float32))


def _slice_block(cache, row, start, block, config):
    """cache[row, start:start + block]: [N, Hkv, D], or [Hkv, N, D] if head-major."""
    dtype = cache.dtype
    if config.slice_as_bits and dtype.itemsize == 2:
        cache = jax.lax.bitcast_convert_type(cache, jnp.uint16)
    sliced = jax.lax.dynamic_slice(cache, (row, start, 0, 0), (1, block) + cache.shape[2:])[0]
    if config.contraction in _HEAD_MAJOR:
        sliced = jnp.swapaxes(sliced, 0, 1)
    return jax.lax.bitcast_convert_type(sliced, dtype) if sliced.dtype != dtype else sliced


def _block_partial(query, keys, values, valid, args, contraction) -> softmax.Partial:
    """The softmax state of one block, rows [Hkv, G].

    query [Hkv, G, D]; keys, values as from _slice_block; valid bool [N].
    """
    head_major = contraction in _HEAD_MAJOR
    scores = _scores(query, keys, contraction) * args.softmax_scale
    scores = soft_cap(scores, args.logits_soft_cap)
    # 0 * NaN is NaN: garbage in a masked value slot must be dropped, not just weighted 0.
    values = jnp.where(valid[:, None] if head_major else valid[:, None, None], values, 0)
    return softmax.block(scores, valid if head_major else valid[:, None, None],
                         lambda weights: _weighted_values(weights, values, contraction),
                         axis=-1 if head_major else 0)  # the position axis of the scores


def decode_attention_blocked(args: DecodeArgs, config: XlaBlockedConfig, *,
                             interpret: bool = False) -> jax.Array:
    """decode_attention over only the needed KV blocks. Returns f32 [B, Hq, D]."""
    del interpret  # plain XLA runs natively everywhere
    batch, q_heads, head_dim = args.query.shape
    _, max_len, kv_heads, _ = args.key.shape
    group = q_heads // kv_heads
    block = min(config.kv_block_size, max_len)
    blocks_per_row = cdiv(max_len, block)
    width = config.blocks_per_step
    query = args.query.reshape(batch, kv_heads, group, head_dim)
    native_dot = config.contraction == "head_major_dot" and query.dtype == args.key.dtype
    # The head-major dots run in the cache dtype (float32 accumulation) when the query
    # shares it, so no float32 copy of the block is made; otherwise everything is float32.
    block_query = query if native_dot else query.astype(jnp.float32)

    end = jnp.clip(args.sequence_end, 0, max_len)
    low = jnp.clip(args.sequence_start, 0, max_len)
    if args.window_left is not None:
        low = jnp.maximum(low, end - 1 - args.window_left)
    first_block = low // block
    block_count = jnp.where(end > low, cdiv(end, block) - first_block, 0)
    row_end = jnp.cumsum(block_count)  # the work items of row b are [row_end - count, row_end)
    total = row_end[-1]
    capacity = batch * blocks_per_row

    def item_partial(item, limit, key, value):
        """The partial of work item `item` (real if below `limit`) and its slot."""
        row = jnp.minimum(jnp.sum(row_end <= item), batch - 1)
        within = item - (row_end[row] - block_count[row])
        real = item < limit
        block_start = jnp.clip(first_block[row] + within, 0, blocks_per_row - 1) * block
        # The last block may hang past S: slice it from S - block instead (in bounds) and
        # mask the positions that belong to the block before it.
        slice_start = jnp.minimum(block_start, max_len - block)
        keys = _slice_block(key, row, slice_start, block, config)
        values = _slice_block(value, row, slice_start, block, config)
        position = slice_start + jnp.arange(block)
        valid = (position >= jnp.maximum(block_start, low[row])) & (position < end[row]) & real
        partial = _block_partial(block_query[row], keys, values, valid, args,
                                 config.contraction)
        slot = jnp.where(real, row * blocks_per_row + within, capacity)  # spare slot
        return slot, partial

    def run_split(first_item, limit):
        """Computes work items [first_item, limit) into fresh partial buffers."""

        def step(carry):
            t, partials, key, value = carry
            for lane in range(width):
                item = first_item + t * width + lane
                slot, partial = item_partial(item, limit, key, value)
                partials = softmax.Partial(*(
                    jax.lax.dynamic_update_index_in_dim(field, new, slot, 0)
                    for field, new in zip(partials, partial)))
            # Carrying the cache through an optimization barrier keeps XLA from hoisting a
            # float32 copy of the whole cache out of the loop (its CPU backend widens
            # bfloat16 slices to float32, and the widening of the invariant cache is
            # otherwise hoisted).
            key, value = jax.lax.optimization_barrier((key, value))
            return t + 1, partials, key, value

        num_steps = cdiv(limit - first_item, width)
        carry = (jnp.int32(0), softmax.empty((capacity + 1, kv_heads, group), head_dim),
                 args.key, args.value)
        carry = vary_like(carry, args, first_item, limit)
        return jax.lax.while_loop(lambda c: c[0] < num_steps, step, carry)[1]

    # Independent splits of the work list (separate loops XLA may run at the same time);
    # each slot is filed by exactly one split and left empty by the others, so merging the
    # splits' buffers slot by slot puts every block's state in its slot.
    per_split = cdiv(total, config.num_kv_splits)
    partials = None
    for split in range(config.num_kv_splits):
        first_item = split * per_split
        limit = jnp.minimum(first_item + per_split, total)
        split_partials = run_split(first_item, limit)
        partials = split_partials if partials is None else softmax.merge(partials, split_partials)

    per_row = (batch, blocks_per_row, kv_heads, group)
    partials = softmax.Partial(*(field[:capacity].reshape(per_row + field.shape[3:])
                                 for field in partials))
    # Unused slots of a row are empty states: merging them in adds nothing.
    row = softmax.merge_axis(partials, axis=1)
    sinks = None if args.sinks is None else args.sinks.reshape(1, kv_heads, group)
    return softmax.finalize(row, sinks).reshape(batch, q_heads, head_dim)


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
