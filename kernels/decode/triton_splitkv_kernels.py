"""The triton.language kernels of the split-KV decode variant (imported lazily: needs triton).

The kernel bodies below are plain functions; :func:`compiled_kernels` wraps them with
``triton.jit`` once for GPUs and once for Triton's CPU interpreter
(:mod:`attnbench.kernels.triton_launch`).

Logits are kept in base 2 (scaled by log2(e)) so the softmax uses exp2, which is one
hardware instruction on NVIDIA GPUs; the running max written out by stage 1 is in base 2 too.
"""

from __future__ import annotations

import triton.language as tl

from ..triton_launch import jit_kernel

LOG2_E = tl.constexpr(1.4426950408889634)  # a constexpr: kernels read no other globals


def splitkv_partial_kernel(
    query_ptr,  # [B, Hq, D], already in the key dtype
    key_ptr,  # [B, S, Hkv, D]
    value_ptr,  # [B, S, Hkv, D]
    start_ptr,  # int32 [B]
    end_ptr,  # int32 [B]
    seq_len,  # S: a run-time value, so one compiled kernel serves every context length
    partial_out_poisoned_ptr,  # unused: jax_triton passes an aliased input as its own pointer
    partial_max_poisoned_ptr,  # unused, as above
    partial_sum_poisoned_ptr,  # unused, as above
    partial_out_ptr,  # f32 [B, Hq, splits, D]: unnormalized sum_j e^(s_j - m) v_j
    partial_max_ptr,  # f32 [B, Hq, splits]: m, the split's max logit in base 2
    partial_sum_ptr,  # f32 [B, Hq, splits]: sum_j e^(s_j - m)
    SOFTMAX_SCALE: tl.constexpr,
    WINDOW_LEFT: tl.constexpr,  # key j needs j >= p - WINDOW_LEFT; < 0: no window
    SOFT_CAP: tl.constexpr,  # <= 0: no soft cap
    Q_HEADS: tl.constexpr,
    GROUP_SIZE: tl.constexpr,  # query heads per KV head
    HEAD_DIM: tl.constexpr,  # D
    HEAD_DIM_PADDED: tl.constexpr,  # D rounded up to a power of two >= 16
    HEAD_BLOCKS_PER_KV_HEAD: tl.constexpr,  # ceil(GROUP_SIZE / BLOCK_Q_HEADS)
    BLOCK_Q_HEADS: tl.constexpr,
    KV_BLOCK_SIZE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    query_stride_b: tl.constexpr, query_stride_h: tl.constexpr,
    kv_stride_s: tl.constexpr, kv_stride_h: tl.constexpr,
):
    """Stage 1: one program = (batch row, KV head and block of its query heads, KV split)."""
    batch = tl.program_id(0)
    kv_head = tl.program_id(1) // HEAD_BLOCKS_PER_KV_HEAD
    head_block = tl.program_id(1) % HEAD_BLOCKS_PER_KV_HEAD
    split = tl.program_id(2)
    # The split count is the grid's third axis, read at run time: configs that differ only in
    # it share one compiled kernel.
    num_kv_splits = tl.num_programs(2)

    # Clamped so that no value of start/end can move a load outside the cache.
    end = tl.minimum(tl.maximum(tl.load(end_ptr + batch), 0), seq_len)
    start = tl.minimum(tl.maximum(tl.load(start_ptr + batch), 0), seq_len)
    if WINDOW_LEFT >= 0:
        start = tl.maximum(start, end - 1 - WINDOW_LEFT)
    # Blocks are aligned to multiples of KV_BLOCK_SIZE; those holding [start, end) are shared
    # out evenly among the splits, so a short row costs few blocks whatever the cache length.
    first_block = start // KV_BLOCK_SIZE
    num_blocks = tl.where(start < end, tl.cdiv(end, KV_BLOCK_SIZE) - first_block, 0)
    blocks_per_split = tl.cdiv(num_blocks, num_kv_splits)
    split_begin = first_block + split * blocks_per_split
    split_end = tl.minimum(split_begin + blocks_per_split, first_block + num_blocks)

    group_row = head_block * BLOCK_Q_HEADS + tl.arange(0, BLOCK_Q_HEADS)
    row_is_real = group_row < GROUP_SIZE  # rows past the group pad the dot to >= 16 rows
    q_head = kv_head * GROUP_SIZE + group_row
    dim = tl.arange(0, HEAD_DIM_PADDED)
    dim_is_real = dim < HEAD_DIM
    batch64 = batch.to(tl.int64)  # B * S * Hkv * D can pass 2**31

    query = tl.load(
        query_ptr + batch64 * query_stride_b + q_head[:, None] * query_stride_h + dim[None, :],
        mask=row_is_real[:, None] & dim_is_real[None, :], other=0.0)
    # The batch stride is S * kv_stride_s: a product with the constexpr stride keeps the
    # alignment Triton needs to vectorize the loads.
    kv_base = batch64 * seq_len * kv_stride_s + kv_head * kv_stride_h

    running_max = tl.full([BLOCK_Q_HEADS], float("-inf"), tl.float32)
    running_sum = tl.zeros([BLOCK_Q_HEADS], tl.float32)
    accumulator = tl.zeros([BLOCK_Q_HEADS, HEAD_DIM_PADDED], tl.float32)
    for block in range(split_begin, split_end):
        position = block * KV_BLOCK_SIZE + tl.arange(0, KV_BLOCK_SIZE)
        key_is_valid = (position >= start) & (position < end)
        offsets = kv_base + position[:, None] * kv_stride_s + dim[None, :]
        load_mask = key_is_valid[:, None] & dim_is_real[None, :]
        key = tl.load(key_ptr + offsets, mask=load_mask, other=0.0)
        value = tl.load(value_ptr + offsets, mask=load_mask, other=0.0)

        logits = tl.dot(query, tl.trans(key), input_precision=DOT_PRECISION) * SOFTMAX_SCALE
        if SOFT_CAP > 0:
            # tanh through exp(-2|x|), which neither overflows nor loses the sign.
            capped = logits / SOFT_CAP
            decay = tl.exp(-2.0 * tl.abs(capped))
            tanh = (1.0 - decay) / (1.0 + decay)
            logits = SOFT_CAP * tl.where(capped < 0, -tanh, tanh)
        logits = tl.where(key_is_valid[None, :], logits * LOG2_E, float("-inf"))

        new_max = tl.maximum(running_max, tl.max(logits, axis=1))
        # Shift by 0, not -inf, while a row has seen no valid key: -inf - -inf is NaN.
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        weights = tl.exp2(logits - shift[:, None])
        rescale = tl.exp2(running_max - shift)
        running_sum = running_sum * rescale + tl.sum(weights, axis=1)
        accumulator = accumulator * rescale[:, None] + tl.dot(
            weights.to(value.dtype), value, input_precision=DOT_PRECISION)
        running_max = new_max

    partial_row = (batch64 * Q_HEADS + q_head) * num_kv_splits + split
    tl.store(partial_out_ptr + partial_row[:, None] * HEAD_DIM + dim[None, :], accumulator,
             mask=row_is_real[:, None] & dim_is_real[None, :])
    tl.store(partial_max_ptr + partial_row, running_max, mask=row_is_real)
    tl.store(partial_sum_ptr + partial_row, running_sum, mask=row_is_real)


def splitkv_merge_kernel(
    partial_out_ptr,  # f32 [B, Hq, splits, D]
    partial_max_ptr,  # f32 [B, Hq, splits]
    partial_sum_ptr,  # f32 [B, Hq, splits]
    sinks_ptr,  # f32 [Hq] (read only when HAS_SINKS)
    num_kv_splits,  # a run-time value: every split count up to SPLITS_PADDED shares a kernel
    out_poisoned_ptr,  # unused: jax_triton passes an aliased input as its own pointer
    out_ptr,  # [B, Hq, D]
    HAS_SINKS: tl.constexpr,
    Q_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PADDED: tl.constexpr,
    SPLITS_PADDED: tl.constexpr,  # a power of two >= the split count
):
    """Stage 2: one program = (batch row, query head); merges the splits and the sink."""
    batch = tl.program_id(0).to(tl.int64)
    q_head = tl.program_id(1)
    row = batch * Q_HEADS + q_head
    split = tl.arange(0, SPLITS_PADDED)
    split_is_real = split < num_kv_splits
    dim = tl.arange(0, HEAD_DIM_PADDED)
    dim_is_real = dim < HEAD_DIM

    # Padding splits read as empty ones: max -inf (weight 0) and sum 0.
    split_max = tl.load(partial_max_ptr + row * num_kv_splits + split, mask=split_is_real,
                        other=float("-inf"))
    split_sum = tl.load(partial_sum_ptr + row * num_kv_splits + split, mask=split_is_real,
                        other=0.0)
    split_out = tl.load(
        partial_out_ptr + (row * num_kv_splits + split)[:, None] * HEAD_DIM + dim[None, :],
        mask=split_is_real[:, None] & dim_is_real[None, :], other=0.0)

    row_max = tl.max(split_max, axis=0)
    if HAS_SINKS:
        sink = tl.load(sinks_ptr + q_head) * LOG2_E
        row_max = tl.maximum(row_max, sink)
    # A row with no valid key and no sink has max -inf; shift by 0 so exp2 gives 0, not NaN.
    shift = tl.where(row_max == float("-inf"), 0.0, row_max)
    split_weight = tl.exp2(split_max - shift)
    numerator = tl.sum(split_out * split_weight[:, None], axis=0)
    denominator = tl.sum(split_sum * split_weight, axis=0)
    if HAS_SINKS:
        denominator += tl.exp2(sink - shift)
    # Only an exact 0 is an empty row: a NaN from a valid input must reach the output.
    safe_denominator = tl.where(denominator == 0, 1.0, denominator)
    out = tl.where(denominator == 0, 0.0, numerator / safe_denominator)
    tl.store(out_ptr + row * HEAD_DIM + dim, out, mask=dim_is_real)


def compiled_kernels(interpret: bool):
    """(stage 1, stage 2) wrapped by triton.jit: for GPUs, or for the CPU interpreter (launch
    those inside :func:`attnbench.kernels.triton_launch.interpreter_scope`)."""
    return (jit_kernel(splitkv_partial_kernel, interpret),
            jit_kernel(splitkv_merge_kernel, interpret))
