"""Split-KV flash decoding in Triton for NVIDIA GPUs, launched from JAX through jax-triton.

Stage 1 (:func:`~.triton_splitkv_kernels.splitkv_partial_kernel`) runs one program per
(batch row, KV head and a block of its query heads, KV split). The KV blocks that hold the
row's valid keys (``[start, end)`` cut by the window) are shared out among the splits; each
program keeps an online softmax over its blocks and writes an unnormalized partial output with
its max logit and its sum of weights. Stage 2 merges the splits of each (row, query head) and
adds the sink to the denominator.

The same launch code (:func:`_run_two_stages`: grids, sizes, strides, constexprs) drives either
jax-triton on a GPU or, with ``interpret=True``, Triton's interpreter on torch CPU tensors
inside a ``jax.pure_callback``; only the two-line ``launch`` functions differ.

Configs are checked against the limits of the largest supported GPU (shared memory, see
:mod:`~attnbench.kernels.gpu_limits`; registers; tl.dot's minimum of 16 per block dimension),
and the heuristic default against the shared memory every supported GPU has: head dims up to
512 (256 in float32) get a default that runs anywhere, larger ones get none and the kernel
says so. Whether a config launches on one GPU is decided by compiling it for that GPU
(``attnbench check``). triton, jax_triton and torch are imported inside functions: this module
imports without them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from .. import triton_launch
from ..gpu_limits import (
    MAX_SHARED_MEMORY_BYTES, MIN_DOT_SIZE, PORTABLE_SHARED_MEMORY_BYTES, THREADS_PER_WARP,
    TILE_REGISTERS_PER_THREAD, padded_head_dim,
)
from ..inputs import FEATURES
from .inputs import DecodeArgs, DecodeShape
from ..triton_launch import Launch
from ..tunables import (
    POWER_OF_TWO, KernelConfig, Rule, cdiv, next_power_of_two, one_of, tunable,
)
from ..variant import Variant

# The merge stage moves splits x D floats per program: a fixed small launch suffices.
MERGE_NUM_WARPS = 4
# Split counts up to this share one merge kernel (its padding splits cost masked loads only).
MERGE_SPLITS_BUCKET = 16

AT_LEAST_16 = Rule(lambda v: POWER_OF_TWO.check(v) and v >= MIN_DOT_SIZE,
                   f"a power of two >= {MIN_DOT_SIZE} (tl.dot's minimum block size)")


@dataclasses.dataclass(frozen=True)
class TritonSplitKVConfig(KernelConfig):
    """Tunables of the Triton split-KV decode kernel."""

    kv_block_size: int = tunable(
        64, (16, 32, 64, 128), AT_LEAST_16, "keys per loop iteration of stage 1")
    block_q_heads: int = tunable(
        16, (16, 32, 64), AT_LEAST_16,
        "query heads of one KV head per program (the dot's rows; rows past the group are masked)")
    num_kv_splits: int = tunable(
        4, (1, 2, 4, 8, 16, 32), POWER_OF_TWO, "programs that share one row's KV blocks")
    num_warps: int = tunable(4, (2, 4, 8), one_of(1, 2, 4, 8, 16), "warps per stage-1 program")
    num_stages: int = tunable(
        2, (1, 2, 3, 4), one_of(1, 2, 3, 4, 5), "software pipeline depth of the KV loop")

    def shared_memory_bytes(self, shape: DecodeShape) -> int:
        """Estimated shared memory of stage 1, an upper bound of what Triton 3.9 allocates for
        sm_90 (checked against triton.compile on 50 configs): num_stages - 1 buffered K and V
        tiles (one tile unpipelined), Q and the softmax weights as dot operands, and f32
        scratch for the accumulator's layout conversions."""
        itemsize = jnp.dtype(shape.dtype).itemsize
        head_dim = padded_head_dim(shape.head_dim)
        kv_tiles = 2 * max(self.num_stages - 1, 1) * self.kv_block_size * head_dim
        operands = self.block_q_heads * (head_dim + self.kv_block_size)
        scratch = 4 * self.block_q_heads * head_dim
        return (kv_tiles + operands) * itemsize + scratch

    def tile_registers_per_thread(self, shape: DecodeShape) -> int:
        """Estimated 32-bit registers per thread held by stage 1's tiles: the f32 accumulator
        and logits; the K and V tiles when they pass through registers (no cp.async pipeline
        at num_stages = 1, or float32, whose dots run on FMAs); Q too for float32."""
        itemsize = jnp.dtype(shape.dtype).itemsize
        head_dim = padded_head_dim(shape.head_dim)
        words = self.block_q_heads * (head_dim + self.kv_block_size)
        if self.num_stages == 1 or itemsize == 4:
            words += 2 * self.kv_block_size * head_dim * itemsize // 4
        if itemsize == 4:
            words += self.block_q_heads * head_dim
        return cdiv(words, self.num_warps * THREADS_PER_WARP)

    def invalid_reason(self, shape: DecodeShape) -> str | None:
        group_rows = max(MIN_DOT_SIZE, next_power_of_two(shape.group_size))
        if self.block_q_heads > group_rows:
            return (f"block_q_heads = {self.block_q_heads} > {group_rows}, the padded query heads "
                    f"per KV head (G = {shape.group_size}): the extra rows would be pure padding")
        longest_block = max(MIN_DOT_SIZE, next_power_of_two(shape.max_len))
        if self.kv_block_size > longest_block:
            return (f"kv_block_size = {self.kv_block_size} > {longest_block}, the cache length "
                    f"S = {shape.max_len} rounded up to a power of two")
        max_blocks = cdiv(shape.max_len, self.kv_block_size)
        if self.num_kv_splits > next_power_of_two(max_blocks):
            return (f"num_kv_splits = {self.num_kv_splits} > {next_power_of_two(max_blocks)}: "
                    f"S = {shape.max_len} has only {max_blocks} blocks of {self.kv_block_size}")
        shared = self.shared_memory_bytes(shape)
        if shared > MAX_SHARED_MEMORY_BYTES:
            return (f"stage 1 needs about {shared} bytes of shared memory (num_stages = "
                    f"{self.num_stages}, kv_block_size = {self.kv_block_size}, head dim "
                    f"{padded_head_dim(shape.head_dim)}, {shape.dtype}) > "
                    f"{MAX_SHARED_MEMORY_BYTES}, the most any supported GPU offers")
        registers = self.tile_registers_per_thread(shape)
        if registers > TILE_REGISTERS_PER_THREAD:
            return (f"stage 1 tiles need about {registers} registers per thread (block_q_heads = "
                    f"{self.block_q_heads}, kv_block_size = {self.kv_block_size}, num_warps = "
                    f"{self.num_warps}) > {TILE_REGISTERS_PER_THREAD}: the kernel would spill")
        return None

    def clamp(self, shape: DecodeShape) -> TritonSplitKVConfig:
        """Shrinks blocks and splits that exceed a small shape; leaves resource rules alone."""
        block_q_heads = min(self.block_q_heads,
                            max(MIN_DOT_SIZE, next_power_of_two(shape.group_size)))
        kv_block_size = min(self.kv_block_size,
                            max(MIN_DOT_SIZE, next_power_of_two(shape.max_len)))
        max_blocks = cdiv(shape.max_len, kv_block_size)
        num_kv_splits = min(self.num_kv_splits, next_power_of_two(max_blocks))
        return self.replace(block_q_heads=block_q_heads, kv_block_size=kv_block_size,
                            num_kv_splits=num_kv_splits)


def heuristic(shape: DecodeShape) -> TritonSplitKVConfig:
    """A reasonable untuned config: the whole GQA group in one dot, enough programs to fill
    a large GPU (~132 SMs, two programs each), smaller tiles where D or the dtype is large,
    within the shared memory every supported GPU has. Checked with ptxas (sm_90, sm_86) for
    bfloat16 D = 128, float16 D = 256, float32 D = 80: no spills."""
    block_q_heads = min(64, max(MIN_DOT_SIZE, next_power_of_two(shape.group_size)))
    head_blocks = cdiv(shape.group_size, block_q_heads)
    programs_per_split = shape.batch * shape.kv_heads * head_blocks
    num_kv_splits = min(16, next_power_of_two(max(1, 264 // max(1, programs_per_split))))
    if jnp.dtype(shape.dtype).itemsize == 4:
        kv_block_size = 16  # float32 dots run on FMAs with operands in registers: keep tiles small
    else:
        kv_block_size = 64 if padded_head_dim(shape.head_dim) <= 128 else 32
    config = TritonSplitKVConfig(kv_block_size=kv_block_size, block_q_heads=block_q_heads,
                                 num_kv_splits=num_kv_splits, num_warps=4, num_stages=2)
    return fit_resources(config.clamp(shape), shape)


def fit_resources(config: TritonSplitKVConfig, shape: DecodeShape,
                  shared_memory_budget: int = PORTABLE_SHARED_MEMORY_BYTES) -> TritonSplitKVConfig:
    """`config` made valid for `shape` and within `shared_memory_budget` (by default what every
    supported GPU offers) where it can be: fewer pipeline stages, then smaller KV blocks, more
    warps, fewer query heads per program. Where no step gets under the budget the result is
    still valid, for the GPUs with more shared memory."""

    def fits(c: TritonSplitKVConfig) -> bool:
        return (c.invalid_reason(shape) is None
                and c.shared_memory_bytes(shape) <= shared_memory_budget)

    steps = (("num_stages", lambda c: c.num_stages > 1, lambda c: c.num_stages - 1),
             ("kv_block_size", lambda c: c.kv_block_size > MIN_DOT_SIZE,
              lambda c: c.kv_block_size // 2),
             ("num_warps", lambda c: c.num_warps < 8, lambda c: c.num_warps * 2),
             ("block_q_heads", lambda c: c.block_q_heads > MIN_DOT_SIZE,
              lambda c: c.block_q_heads // 2))
    for name, can_change, change in steps:
        while not fits(config) and can_change(config):
            config = config.replace(**{name: change(config)})
    return config


# ---- Launch plan: everything both launch paths share ---------------------------------------


@dataclasses.dataclass(frozen=True)
class LaunchPlan:
    """Grids, run-time sizes, constexprs and output shapes of both stages for one shape and
    config. Sizes that vary from call to call (the cache length) are run-time arguments, so
    one compiled kernel serves every batch and context; what shapes the code (heads, head
    dim, blocks) is constexpr."""

    partial_grid: tuple[int, int, int]
    partial_sizes: tuple[int, ...]  # (S,)
    partial_constants: dict[str, Any]
    partial_shapes: tuple[tuple[tuple[int, ...], str], ...]  # (shape, dtype) per output
    merge_grid: tuple[int, int]
    merge_sizes: tuple[int, ...]  # (splits,)
    merge_constants: dict[str, Any]
    out_shape: tuple[tuple[int, ...], str]
    num_warps: int
    num_stages: int


def row_major_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Element strides of a contiguous array (JAX's layout at the custom call boundary)."""
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


def launch_plan(args: DecodeArgs, config: TritonSplitKVConfig) -> LaunchPlan:
    batch, q_heads, head_dim = args.query.shape
    _, max_len, kv_heads, _ = args.key.shape
    group_size = q_heads // kv_heads
    head_blocks = cdiv(group_size, config.block_q_heads)
    query_strides = row_major_strides(args.query.shape)
    kv_strides = row_major_strides(args.key.shape)
    splits = config.num_kv_splits
    partial_constants = dict(
        SOFTMAX_SCALE=float(args.softmax_scale),
        WINDOW_LEFT=-1 if args.window_left is None else int(args.window_left),
        SOFT_CAP=0.0 if args.logits_soft_cap is None else float(args.logits_soft_cap),
        Q_HEADS=q_heads, GROUP_SIZE=group_size, HEAD_DIM=head_dim,
        HEAD_DIM_PADDED=padded_head_dim(head_dim), HEAD_BLOCKS_PER_KV_HEAD=head_blocks,
        BLOCK_Q_HEADS=config.block_q_heads, KV_BLOCK_SIZE=config.kv_block_size,
        # float32 operands must not be rounded to tf32; 16-bit operands ignore this.
        DOT_PRECISION="ieee",
        query_stride_b=query_strides[0], query_stride_h=query_strides[1],
        kv_stride_s=kv_strides[1], kv_stride_h=kv_strides[2],
    )
    merge_constants = dict(
        HAS_SINKS=args.sinks is not None, Q_HEADS=q_heads, HEAD_DIM=head_dim,
        HEAD_DIM_PADDED=padded_head_dim(head_dim),
        # One bucket for the usual split counts, so that they share one merge kernel.
        SPLITS_PADDED=max(MERGE_SPLITS_BUCKET, next_power_of_two(splits)),
    )
    return LaunchPlan(
        partial_grid=(batch, kv_heads * head_blocks, splits),
        partial_sizes=(max_len,),
        partial_constants=partial_constants,
        partial_shapes=(((batch, q_heads, splits, head_dim), "float32"),
                        ((batch, q_heads, splits), "float32"),
                        ((batch, q_heads, splits), "float32")),
        merge_grid=(batch, q_heads),
        merge_sizes=(splits,),
        merge_constants=merge_constants,
        out_shape=((batch, q_heads, head_dim), jnp.dtype(args.query.dtype).name),
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )


def _run_two_stages(launch: Launch, plan: LaunchPlan, kernels, query, key, value, start, end,
                    sinks):
    partial_kernel, merge_kernel = kernels
    partial = launch(partial_kernel, plan.partial_grid,
                     (query, key, value, start, end, *plan.partial_sizes),
                     plan.partial_shapes, plan.partial_constants, plan.num_warps, plan.num_stages)
    (out,) = launch(merge_kernel, plan.merge_grid, (*partial, sinks, *plan.merge_sizes),
                    (plan.out_shape,),
                    plan.merge_constants, MERGE_NUM_WARPS, 1)
    return out


def _interpreted(plan: LaunchPlan, args: DecodeArgs, query, sinks) -> jax.Array:
    from .triton_splitkv_kernels import compiled_kernels

    kernels = compiled_kernels(interpret=True)

    def run(launch: Launch, *tensors):
        return _run_two_stages(launch, plan, kernels, *tensors)

    return triton_launch.call_interpreted(
        run, plan.out_shape, query, args.key, args.value, args.sequence_start,
        args.sequence_end, sinks)


def decode_attention_triton(args: DecodeArgs, config: TritonSplitKVConfig, *,
                            interpret: bool = False,
                            compute_capability: int | None = None) -> jax.Array:
    """decode_attention by the two Triton stages. Returns [B, Hq, D] in the query's dtype.

    interpret: run the kernels in Triton's CPU interpreter (through jax.pure_callback).
    compute_capability: the CUDA target (e.g. 90) when it cannot be read from a local GPU,
    as when exporting for CUDA on a host without one.
    """
    shape = DecodeShape(batch=args.query.shape[0], max_len=args.key.shape[1],
                        q_heads=args.query.shape[1], kv_heads=args.key.shape[2],
                        head_dim=args.query.shape[2], dtype=jnp.dtype(args.key.dtype).name)
    reason = config.invalid_reason(shape)
    if reason:
        raise ValueError(f"triton_splitkv: invalid config {config}: {reason}")
    plan = launch_plan(args, config)
    # One dtype for both dot operands: the cache's (a float32 query on a 16-bit cache is
    # rounded as the cache was).
    query = args.query.astype(args.key.dtype)
    # Without sinks the merge kernel reads nothing from this; it needs a buffer all the same.
    sinks = args.sinks if args.sinks is not None else jnp.zeros((shape.q_heads,), jnp.float32)
    if interpret:
        return _interpreted(plan, args, query, sinks)
    from .triton_splitkv_kernels import compiled_kernels

    gpu = triton_launch.gpu_launch(compute_capability)
    return _run_two_stages(gpu, plan, compiled_kernels(False),
                           query, args.key, args.value, args.sequence_start,
                           args.sequence_end, sinks)


def _kernel(args: DecodeArgs, config: TritonSplitKVConfig, *, interpret: bool) -> jax.Array:
    return decode_attention_triton(args, config, interpret=interpret)


VARIANT = Variant(
    name="triton_splitkv",
    op="decode",
    platforms=("gpu",),
    interpretable=True,
    features=frozenset(FEATURES),
    config_class=TritonSplitKVConfig,
    kernel=_kernel,
    heuristic=heuristic,
    description=("Triton split-KV flash decoding (jax-triton): per (row, KV head, split) "
                 "online softmax over the valid KV blocks, then a merge kernel with the sinks"),
)
