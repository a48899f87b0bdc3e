"""The triton.language kernels of the Triton ragged paged attention variant (imported lazily).

The kernel bodies are plain functions; :func:`compiled_kernels` wraps them once with
``triton.jit`` for GPUs and once for Triton's CPU interpreter
(:mod:`attnbench.kernels.triton_launch`).

Work split: one attention program per (query block, KV head[, KV split]). A query block is up
to QUERIES_PER_BLOCK consecutive query tokens of ONE sequence; its tile rows are
(token, query head of the GQA group) pairs, so that tl.dot sees >= 16 rows even for decode.
Program ids are mapped to blocks without any host-side preprocessing: "virtual sequence" v
owns program ids starting at ``query_start_loc[v] // QUERIES_PER_BLOCK + v + 1`` (v >= 0) and
at 0 for v = -1, which stands for the rows before ``query_start_loc[0]``; v = num_seqs owns
the padding rows after ``query_start_loc[num_seqs]``. That start is an upper bound on the
blocks used before v, so the grid ``cdiv(T, QUERIES_PER_BLOCK) + max_seqs + 2`` always
suffices, and a binary search over ``query_start_loc`` finds a program's sequence.

Logits are kept in base 2 (scaled by log2(e)) so the softmax uses exp2.
"""

from __future__ import annotations

import triton.language as tl

from ..triton_launch import jit_kernel

# log2(e) as a constexpr: Triton kernels may only read globals that are constexprs.
LOG2_E = tl.constexpr(1.4426950408889634)
# float8_e4m3fn caches arrive as their uint8 bits and are decoded with integer ops, which every
# GPU generation and the interpreter run (Triton's own fp8 type needs sm_89 or later):
# exponent bias 7 (float32's 127 - 120), 3 mantissa bits (float32's 23 - 20), subnormals
# mantissa * 2^-9, and all-ones exponent and mantissa NaN (the format has no infinity).
E4M3_TO_F32_EXPONENT = tl.constexpr(120)
E4M3_SUBNORMAL_UNIT = tl.constexpr(0.001953125)


def paged_attention_kernel(
    queries_ptr,  # [T, Hq, D]
    kv_pages_ptr,  # [P, page_size, KV_SLOTS, KV_LANES]: key of head g at slot 2g, value at
    # 2g + 1, lanes 0..D-1 (slots and lanes past those are padding, never read); a float
    # dtype, int8, or uint8 holding float8_e4m3fn bits (decoded here, see E4M3_*)
    context_lens_ptr,  # int32 [max_seqs]
    page_table_ptr,  # int32 [max_seqs, pages_per_seq]
    query_start_loc_ptr,  # int32 [max_seqs + 1]
    num_seqs_ptr,  # int32 [1]
    sinks_ptr,  # f32 [Hq] (a dummy [1] without sinks)
    kv_scales_ptr,  # f32 [2]: (key scale, value scale) of a quantized cache (a dummy without)
    # Run-time sizes: one compiled kernel serves every batch of tokens, sequences and pages.
    num_tokens,  # T
    max_seqs,
    pages_per_seq,
    num_pages,  # P
    poisoned_output_ptr,  # unused: jax_triton passes each aliased NaN-filled input as a pointer
    poisoned_stats_ptr,  # unused, as above
    output_ptr,  # one split: [T, Hq, D] final output; else f32 [splits, T, Hq, D] partials
    partial_stats_ptr,  # several splits: f32 [splits, T, Hq, 2] (max in base 2, sum); else [1]
    SOFTMAX_SCALE: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    WINDOW_LEFT: tl.constexpr,  # key j needs j >= p - WINDOW_LEFT
    HAS_SOFT_CAP: tl.constexpr,
    SOFT_CAP: tl.constexpr,
    HAS_SINKS: tl.constexpr,
    HAS_KV_SCALES: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    Q_HEADS: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    GROUP_PADDED: tl.constexpr,  # GROUP_SIZE rounded up to a power of two
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PADDED: tl.constexpr,  # power of two >= 16
    KV_SLOTS: tl.constexpr,  # 2 * Hkv, or more in a cache with padding slots
    KV_LANES: tl.constexpr,  # D, or more in a cache with padding lanes
    QUERIES_PER_BLOCK: tl.constexpr,
    KV_TOKENS_PER_BLOCK: tl.constexpr,  # kv_pages_per_block * PAGE_SIZE / sub_page_blocks
    KV_BLOCK: tl.constexpr,  # KV_TOKENS_PER_BLOCK rounded up to a power of two
    SPLIT_PARTIALS: tl.constexpr,  # more than one KV split: write partials for the combine
    DOT_PRECISION: tl.constexpr,
):
    """One program: a query block of one sequence (or padding rows) for one KV head."""
    program = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    ROWS: tl.constexpr = QUERIES_PER_BLOCK * GROUP_PADDED
    max_len = pages_per_seq * PAGE_SIZE
    q_stride_t: tl.constexpr = Q_HEADS * HEAD_DIM
    kv_stride_head: tl.constexpr = KV_LANES
    kv_stride_slot: tl.constexpr = KV_SLOTS * KV_LANES
    kv_stride_page: tl.constexpr = PAGE_SIZE * kv_stride_slot

    num_seqs = tl.minimum(tl.maximum(tl.load(num_seqs_ptr), 0), max_seqs)

    # First virtual sequence whose first program id is past this one (over 0..num_seqs).
    # A loop on the data, not a constexpr step count, so that every batch size shares a kernel.
    low = num_seqs * 0
    high = num_seqs + 1
    while low < high:
        middle = (low + high) // 2
        middle_start = tl.load(query_start_loc_ptr + tl.minimum(middle, max_seqs))
        middle_start = tl.minimum(tl.maximum(middle_start, 0), num_tokens)
        go_right = middle_start // QUERIES_PER_BLOCK + middle + 1 <= program
        low = tl.where(go_right, middle + 1, low)
        high = tl.where(go_right, high, middle)
    seq = low - 1  # in [-1, num_seqs]

    begin_index = tl.minimum(tl.maximum(seq, 0), max_seqs)
    end_index = tl.minimum(seq + 1, max_seqs)
    begin = tl.minimum(tl.maximum(tl.load(query_start_loc_ptr + begin_index), 0), num_tokens)
    end = tl.minimum(tl.maximum(tl.load(query_start_loc_ptr + end_index), 0), num_tokens)
    begin = tl.where(seq < 0, 0, begin)
    end = tl.where(seq >= num_seqs, num_tokens, end)
    end = tl.maximum(end, begin)
    first_program = tl.where(seq < 0, 0, begin // QUERIES_PER_BLOCK + seq + 1)
    row0 = begin + (program - first_program) * QUERIES_PER_BLOCK

    tile_row = tl.arange(0, ROWS)
    token = row0 + tile_row // GROUP_PADDED
    group_member = tile_row % GROUP_PADDED
    q_head = kv_head * GROUP_SIZE + group_member
    token_is_mine = (token >= begin) & (token < end)
    row_is_real = token_is_mine & (group_member < GROUP_SIZE)
    dim = tl.arange(0, HEAD_DIM_PADDED)
    dim_is_real = dim < HEAD_DIM
    row_offset = token.to(tl.int64) * q_stride_t + q_head * HEAD_DIM
    store_mask = row_is_real[:, None] & dim_is_real[None, :]

    is_padding = (seq < 0) | (seq >= num_seqs)
    if is_padding:
        # Rows no sequence owns are zeros (they never join a split partial, see the combine).
        if not SPLIT_PARTIALS:
            zeros = tl.zeros([ROWS, HEAD_DIM_PADDED], dtype=output_ptr.dtype.element_ty)
            tl.store(output_ptr + row_offset[:, None] + dim[None, :], zeros, mask=store_mask)
    else:
        seq_index = tl.minimum(seq, max_seqs - 1)
        context = tl.load(context_lens_ptr + seq_index)
        context = tl.minimum(tl.maximum(context, 0), max_len)
        # Query row r of the sequence sits at context - q_len + r.
        first_position = context - (end - begin)
        position = first_position + (token - begin)

        # Products run in the cache's dtype; 8-bit stored values are widened to the queries'
        # dtype, which holds each of them exactly.
        compute_dtype = kv_pages_ptr.dtype.element_ty
        if compute_dtype.primitive_bitwidth == 8:
            compute_dtype = queries_ptr.dtype.element_ty
        query = tl.load(queries_ptr + row_offset[:, None] + dim[None, :], mask=store_mask,
                        other=0.0)
        query = query.to(compute_dtype)
        # Scales are linear in the logits and the output: applied there, not per element.
        logit_scale = SOFTMAX_SCALE
        if HAS_KV_SCALES:
            logit_scale = tl.load(kv_scales_ptr) * SOFTMAX_SCALE

        # Keys this block can see: up to its last row's position, from its first row's window.
        last_token = tl.minimum(row0 + QUERIES_PER_BLOCK, end) - 1
        key_end = tl.minimum(first_position + (last_token - begin) + 1, context)
        key_begin = 0
        if HAS_WINDOW:
            key_begin = tl.maximum(first_position + (row0 - begin) - WINDOW_LEFT, 0)
        block_begin = key_begin // KV_TOKENS_PER_BLOCK
        # A program past its sequence's rows (the spare one a sequence may get, or one of a
        # sequence with no rows) has nothing to compute.
        num_blocks = tl.where((key_begin < key_end) & (row0 < end),
                              tl.cdiv(key_end, KV_TOKENS_PER_BLOCK) - block_begin, 0)
        if SPLIT_PARTIALS:
            # The split count is the grid's third axis, read at run time: configs that differ
            # only in it share one compiled kernel.
            blocks_per_split = tl.cdiv(num_blocks, tl.num_programs(2))
            block_begin = block_begin + split * blocks_per_split
            num_blocks = tl.maximum(tl.minimum(num_blocks - split * blocks_per_split,
                                               blocks_per_split), 0)

        if HAS_SINKS and not SPLIT_PARTIALS:
            # The sink starts the running softmax: max = sink, sum = e^(sink - sink) = 1.
            sink = tl.load(sinks_ptr + q_head, mask=row_is_real, other=0.0)
            running_max = sink.to(tl.float32) * LOG2_E
            running_sum = tl.full([ROWS], 1.0, dtype=tl.float32)
        else:
            running_max = tl.full([ROWS], float("-inf"), dtype=tl.float32)
            running_sum = tl.zeros([ROWS], dtype=tl.float32)
        accumulator = tl.zeros([ROWS, HEAD_DIM_PADDED], dtype=tl.float32)

        slot = tl.arange(0, KV_BLOCK)
        kv_head_offset = 2 * kv_head * kv_stride_head
        page_row_base = seq_index * pages_per_seq
        for block in range(block_begin, block_begin + num_blocks):
            key_position = block * KV_TOKENS_PER_BLOCK + slot
            key_is_real = ((slot < KV_TOKENS_PER_BLOCK) & (key_position >= key_begin)
                           & (key_position < key_end))
            logical_page = tl.minimum(key_position // PAGE_SIZE, pages_per_seq - 1)
            page = tl.load(page_table_ptr + page_row_base + logical_page, mask=key_is_real,
                           other=0)
            page = tl.minimum(tl.maximum(page, 0), num_pages - 1).to(tl.int64)
            slot_offset = (page * kv_stride_page + (key_position % PAGE_SIZE) * kv_stride_slot
                           + kv_head_offset)
            kv_mask = key_is_real[:, None] & dim_is_real[None, :]
            key = tl.load(kv_pages_ptr + slot_offset[:, None] + dim[None, :], mask=kv_mask,
                          other=0)
            value = tl.load(kv_pages_ptr + slot_offset[:, None] + kv_stride_head + dim[None, :],
                            mask=kv_mask, other=0)
            if kv_pages_ptr.dtype.element_ty == tl.uint8:
                key_bits = key.to(tl.int32)
                key_exponent = (key_bits >> 3) & 15
                key_mantissa = key_bits & 7
                key_normal = (((key_bits >> 7) << 31) | ((key_exponent + E4M3_TO_F32_EXPONENT) << 23)
                              | (key_mantissa << 20)).to(tl.float32, bitcast=True)
                key_small = key_mantissa.to(tl.float32) * E4M3_SUBNORMAL_UNIT
                key_small = tl.where((key_bits >> 7) == 1, -key_small, key_small)
                key = tl.where(key_exponent == 0, key_small, key_normal)
                key = tl.where((key_exponent == 15) & (key_mantissa == 7), float("nan"), key)
                value_bits = value.to(tl.int32)
                value_exponent = (value_bits >> 3) & 15
                value_mantissa = value_bits & 7
                value_normal = (((value_bits >> 7) << 31)
                                | ((value_exponent + E4M3_TO_F32_EXPONENT) << 23)
                                | (value_mantissa << 20)).to(tl.float32, bitcast=True)
                value_small = value_mantissa.to(tl.float32) * E4M3_SUBNORMAL_UNIT
                value_small = tl.where((value_bits >> 7) == 1, -value_small, value_small)
                value = tl.where(value_exponent == 0, value_small, value_normal)
                value = tl.where((value_exponent == 15) & (value_mantissa == 7), float("nan"),
                                 value)
            elif kv_pages_ptr.dtype.element_ty == tl.int8:
                # Through float32: the interpreter's int8 -> bfloat16 cast is wrong.
                key = key.to(tl.float32)
                value = value.to(tl.float32)
            key = key.to(compute_dtype)
            value = value.to(compute_dtype)

            logits = tl.dot(query, tl.trans(key), input_precision=DOT_PRECISION)
            logits = logits * logit_scale
            if HAS_SOFT_CAP:
                # cap * tanh(x / cap), with tanh(y) = 1 - 2 / (e^(2y) + 1): exact limits at +-inf.
                logits = SOFT_CAP * (1.0 - 2.0 / (tl.exp2(logits * (2.0 * LOG2_E / SOFT_CAP)) + 1.0))
            logits = logits * LOG2_E
            visible = (row_is_real[:, None] & key_is_real[None, :]
                       & (key_position[None, :] <= position[:, None]))
            if HAS_WINDOW:
                visible = visible & (key_position[None, :] >= position[:, None] - WINDOW_LEFT)
            logits = tl.where(visible, logits, float("-inf"))

            new_max = tl.maximum(running_max, tl.max(logits, axis=1))
            # Not -inf: a row with nothing visible yet would give exp2(-inf - -inf) = NaN.
            shift = tl.where(new_max == float("-inf"), 0.0, new_max)
            weights = tl.exp2(logits - shift[:, None])
            rescale = tl.exp2(running_max - shift)
            running_sum = running_sum * rescale + tl.sum(weights, axis=1)
            accumulator = accumulator * rescale[:, None] + tl.dot(
                weights.to(value.dtype), value, input_precision=DOT_PRECISION)
            running_max = new_max

        if HAS_KV_SCALES:
            accumulator = accumulator * tl.load(kv_scales_ptr + 1)
        if not SPLIT_PARTIALS:
            safe_sum = tl.where(running_sum == 0.0, 1.0, running_sum)
            result = tl.where(running_sum[:, None] == 0.0, 0.0, accumulator / safe_sum[:, None])
            tl.store(output_ptr + row_offset[:, None] + dim[None, :],
                     result.to(output_ptr.dtype.element_ty), mask=store_mask)
        else:
            split_rows = num_tokens * Q_HEADS
            split_base = split.to(tl.int64) * split_rows
            tl.store(output_ptr + split_base * HEAD_DIM + row_offset[:, None] + dim[None, :],
                     accumulator, mask=store_mask)
            stats_offset = (split_base + token.to(tl.int64) * Q_HEADS + q_head) * 2
            tl.store(partial_stats_ptr + stats_offset, running_max, mask=row_is_real)
            tl.store(partial_stats_ptr + stats_offset + 1, running_sum, mask=row_is_real)


def combine_splits_kernel(
    partial_output_ptr,  # f32 [KV_SPLITS, T, Hq, D]: unnormalized sums of e^(s - m) v
    partial_stats_ptr,  # f32 [KV_SPLITS, T, Hq, 2]: (m in base 2, sum e^(s - m))
    query_start_loc_ptr,  # int32 [max_seqs + 1]
    num_seqs_ptr,  # int32 [1]
    sinks_ptr,  # f32 [Hq] (a dummy [1] without sinks)
    num_tokens,  # T, at run time like the attention kernel's sizes
    max_seqs,
    poisoned_output_ptr,  # unused, aliased as output
    output_ptr,  # [T, Hq, D]
    HAS_SINKS: tl.constexpr,
    Q_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PADDED: tl.constexpr,
    KV_SPLITS: tl.constexpr,
    SPLITS_PADDED: tl.constexpr,  # KV_SPLITS rounded up to a power of two
):
    """One program: one (token row, query head); merges the KV splits' partial softmaxes."""
    token = tl.program_id(0)
    q_head = tl.program_id(1)
    num_seqs = tl.minimum(tl.maximum(tl.load(num_seqs_ptr), 0), max_seqs)
    first_real = tl.minimum(tl.maximum(tl.load(query_start_loc_ptr), 0), num_tokens)
    past_real = tl.load(query_start_loc_ptr + num_seqs)
    past_real = tl.minimum(tl.maximum(past_real, 0), num_tokens)
    dim = tl.arange(0, HEAD_DIM_PADDED)
    dim_is_real = dim < HEAD_DIM
    row = token.to(tl.int64) * Q_HEADS + q_head
    # Padding rows were never written by the attention kernel (their partials are poison).
    if (token >= first_real) & (token < past_real):
        split = tl.arange(0, SPLITS_PADDED)
        split_is_real = split < KV_SPLITS
        split_row = split.to(tl.int64) * (num_tokens * Q_HEADS) + row
        split_max = tl.load(partial_stats_ptr + split_row * 2, mask=split_is_real,
                            other=float("-inf"))
        split_sum = tl.load(partial_stats_ptr + split_row * 2 + 1, mask=split_is_real, other=0.0)
        total_max = tl.max(split_max, axis=0)
        if HAS_SINKS:
            sink = tl.load(sinks_ptr + q_head).to(tl.float32) * LOG2_E
            total_max = tl.maximum(total_max, sink)
        shift = tl.where(total_max == float("-inf"), 0.0, total_max)
        scale = tl.exp2(split_max - shift)
        total_sum = tl.sum(split_sum * scale, axis=0)
        if HAS_SINKS:
            total_sum = total_sum + tl.exp2(sink - shift)
        parts = tl.load(partial_output_ptr + split_row[:, None] * HEAD_DIM + dim[None, :],
                        mask=split_is_real[:, None] & dim_is_real[None, :], other=0.0)
        merged = tl.sum(parts * scale[:, None], axis=0)
        safe_sum = tl.where(total_sum == 0.0, 1.0, total_sum)
        result = tl.where(total_sum == 0.0, 0.0, merged / safe_sum)
    else:
        result = tl.zeros([HEAD_DIM_PADDED], dtype=tl.float32)
    tl.store(output_ptr + row * HEAD_DIM + dim, result.to(output_ptr.dtype.element_ty),
             mask=dim_is_real)


def compiled_kernels(interpret: bool):
    """(attention kernel, split combine kernel), for GPUs or for Triton's CPU interpreter.

    Launch interpreted kernels inside
    :func:`attnbench.kernels.triton_launch.interpreter_scope`.
    """
    return (jit_kernel(paged_attention_kernel, interpret),
            jit_kernel(combine_splits_kernel, interpret))
