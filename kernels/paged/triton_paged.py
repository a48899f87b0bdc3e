"""Ragged paged attention in Triton for NVIDIA GPUs, launched from JAX through jax-triton.

One program per (query block of one sequence, KV head[, KV split]) walks that sequence's pages
through the page table, ``kv_pages_per_block`` pages per step, with an online softmax
(:func:`~.triton_paged_kernels.paged_attention_kernel`). A query block holds up to
``queries_per_block`` tokens; its tile rows are (token, query head of the GQA group) pairs, so
decode rows of a GQA group fill one tl.dot together. Blocks past a sequence's context and
before its window are never loaded. Programs find their sequence from ``query_start_loc``
inside the kernel, so the grid is sized from static bounds (T and max_seqs) and programs with
nothing to do write zeros (padding rows) or nothing. With ``kv_splits > 1`` each block's KV
range is shared out among that many programs and a second kernel merges their partial
softmaxes, which fills the GPU on decode batches with few sequences.

The same launch code (:func:`_run`: grids, constexprs, output buffers) drives jax-triton on
a GPU or, with ``interpret=True``, Triton's interpreter on torch CPU tensors inside a
``jax.pure_callback``; only the small ``launch`` functions differ.

triton, jax_triton and torch are imported inside functions: this module imports without them.
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
from .inputs import PagedArgs, PagedShape
from ..triton_launch import Launch
from ..tunables import (
    POWER_OF_TWO, KernelConfig, cdiv, floor_power_of_two, next_power_of_two, one_of, tunable,
)
from ..variant import Variant

# Past these, tiles only add padding and register pressure for no gain in reuse.
MAX_TILE_ROWS = 128
MAX_KV_BLOCK = 256
# The merge kernel moves kv_splits x D floats per program: a fixed small launch suffices.
COMBINE_NUM_WARPS = 4
# Programs that fill an H100 (132 SMs) about twice; the heuristic splits KV to reach it.
TARGET_PROGRAMS = 264


def padded_group(shape: PagedShape) -> int:
    return next_power_of_two(shape.group_size)


def min_queries_per_block(shape: PagedShape) -> int:
    """Fewest query tokens per block that give tl.dot its 16 rows."""
    return max(1, MIN_DOT_SIZE // padded_group(shape))


def min_kv_pages_per_block(shape: PagedShape) -> int:
    """Fewest pages per step that give tl.dot its 16 keys (small pages)."""
    return next_power_of_two(cdiv(MIN_DOT_SIZE, shape.page_size))


@dataclasses.dataclass(frozen=True)
class TritonPagedConfig(KernelConfig):
    """Tunables of the Triton ragged paged attention kernel."""

    kv_pages_per_block: int = tunable(
        4, (1, 2, 4, 8, 16, 32, 64), POWER_OF_TWO,
        "pages of one sequence per KV step; their tokens (padded to a power of two) are the "
        "dot's key block")
    queries_per_block: int = tunable(
        4, (1, 2, 4, 8, 16, 32, 64), POWER_OF_TWO,
        "query tokens of one sequence per program; times the padded GQA group = the dot's rows")
    sub_page_blocks: int = tunable(
        1, (1, 2, 4, 8), POWER_OF_TWO,
        "key blocks per page, with kv_pages_per_block = 1: smaller dot blocks for large pages")
    kv_splits: int = tunable(
        1, (1, 2, 4, 8, 16), POWER_OF_TWO,
        "programs sharing one query block's KV range (> 1 adds a merge kernel)")
    num_warps: int = tunable(4, (2, 4, 8), one_of(1, 2, 4, 8, 16), "warps per program")
    num_stages: int = tunable(
        2, (1, 2, 3, 4), one_of(1, 2, 3, 4, 5), "software pipeline depth of the KV loop")

    def tile_rows(self, shape: PagedShape) -> int:
        return self.queries_per_block * padded_group(shape)

    def kv_tokens_per_block(self, shape: PagedShape) -> int:
        return self.kv_pages_per_block * shape.page_size // self.sub_page_blocks

    def kv_block(self, shape: PagedShape) -> int:
        return next_power_of_two(self.kv_tokens_per_block(shape))

    def shared_memory_bytes(self, shape: PagedShape) -> int:
        """Estimated shared memory: K and V tiles per buffer, plus Q and the softmax weights,
        which pass through shared memory as dot operands.

        K and V are gathered through the page table (pointer tensors, not contiguous blocks),
        and triton 3.9 gives such loads at most two buffers whatever num_stages says: compiled
        for sm_90, num_stages 3 and 4 took within 512 bytes of num_stages 2.
        """
        itemsize = jnp.dtype(shape.dtype).itemsize
        head_dim = padded_head_dim(shape.head_dim)
        kv_block, rows = self.kv_block(shape), self.tile_rows(shape)
        kv_tiles = 2 * kv_block * head_dim * itemsize * min(self.num_stages, 2)
        return kv_tiles + (rows * head_dim + rows * kv_block) * itemsize

    def tile_registers_per_thread(self, shape: PagedShape) -> int:
        """f32 registers per thread held by the accumulator and the logits tile."""
        elements = self.tile_rows(shape) * (padded_head_dim(shape.head_dim) + self.kv_block(shape))
        return cdiv(elements, self.num_warps * THREADS_PER_WARP)

    def invalid_reason(self, shape: PagedShape) -> str | None:
        rows, kv_block = self.tile_rows(shape), self.kv_block(shape)
        group = padded_group(shape)
        if rows < MIN_DOT_SIZE:
            return (f"queries_per_block = {self.queries_per_block} x padded GQA group {group} = "
                    f"{rows} tile rows < {MIN_DOT_SIZE}, tl.dot's minimum; use queries_per_block "
                    f">= {min_queries_per_block(shape)}")
        if rows > MAX_TILE_ROWS and self.queries_per_block > 1:
            return (f"queries_per_block = {self.queries_per_block} x padded GQA group {group} = "
                    f"{rows} tile rows > {MAX_TILE_ROWS}")
        most_queries = max(min_queries_per_block(shape), next_power_of_two(shape.num_tokens))
        if self.queries_per_block > most_queries:
            return (f"queries_per_block = {self.queries_per_block} > {most_queries}: T = "
                    f"{shape.num_tokens} query tokens, the extra rows would be pure padding")
        if self.sub_page_blocks > 1 and (self.kv_pages_per_block > 1
                                         or shape.page_size % self.sub_page_blocks):
            return (f"sub_page_blocks = {self.sub_page_blocks} needs kv_pages_per_block = 1 "
                    f"and a page_size it divides (got kv_pages_per_block = "
                    f"{self.kv_pages_per_block}, page_size = {shape.page_size})")
        if kv_block < MIN_DOT_SIZE and self.sub_page_blocks > 1:
            return (f"page_size = {shape.page_size} / sub_page_blocks = {self.sub_page_blocks} "
                    f"gives a key block of {kv_block} < {MIN_DOT_SIZE}, tl.dot's minimum")
        if kv_block < MIN_DOT_SIZE:
            return (f"kv_pages_per_block = {self.kv_pages_per_block} x page_size = "
                    f"{shape.page_size} gives a key block of {kv_block} < {MIN_DOT_SIZE}, "
                    f"tl.dot's minimum; use kv_pages_per_block >= {min_kv_pages_per_block(shape)}")
        if kv_block > MAX_KV_BLOCK and self.kv_pages_per_block > 1:
            return (f"kv_pages_per_block = {self.kv_pages_per_block} x page_size = "
                    f"{shape.page_size} gives a key block of {kv_block} > {MAX_KV_BLOCK}")
        most_pages = max(min_kv_pages_per_block(shape), next_power_of_two(shape.pages_per_seq))
        if self.kv_pages_per_block > most_pages:
            return (f"kv_pages_per_block = {self.kv_pages_per_block} > {most_pages}: a sequence "
                    f"has at most {shape.pages_per_seq} pages")
        max_blocks = cdiv(shape.max_len, self.kv_tokens_per_block(shape))
        if self.kv_splits > next_power_of_two(max_blocks):
            return (f"kv_splits = {self.kv_splits} > {next_power_of_two(max_blocks)}: a sequence "
                    f"has at most {max_blocks} key blocks of {self.kv_tokens_per_block(shape)} "
                    "tokens")
        shared = self.shared_memory_bytes(shape)
        if shared > MAX_SHARED_MEMORY_BYTES:
            return (f"needs about {shared} bytes of shared memory (num_stages = "
                    f"{self.num_stages}, key block {kv_block}, {rows} tile rows, head dim "
                    f"{padded_head_dim(shape.head_dim)}, {shape.dtype}) > "
                    f"{MAX_SHARED_MEMORY_BYTES}, the most any supported GPU offers")
        registers = self.tile_registers_per_thread(shape)
        if registers > TILE_REGISTERS_PER_THREAD:
            return (f"tiles need about {registers} registers per thread ({rows} tile rows, key "
                    f"block {kv_block}, num_warps = {self.num_warps}) > "
                    f"{TILE_REGISTERS_PER_THREAD}: the kernel would spill")
        return None

    def clamp(self, shape: PagedShape) -> TritonPagedConfig:
        """Shrinks blocks and splits that exceed a small shape; leaves resource rules alone."""
        queries = min(self.queries_per_block,
                      max(min_queries_per_block(shape), next_power_of_two(shape.num_tokens)))
        pages = min(self.kv_pages_per_block,
                    max(min_kv_pages_per_block(shape), next_power_of_two(shape.pages_per_seq)))
        max_blocks = cdiv(shape.max_len, max(1, pages * shape.page_size // self.sub_page_blocks))
        splits = min(self.kv_splits, next_power_of_two(max_blocks))
        return self.replace(queries_per_block=queries, kv_pages_per_block=pages, kv_splits=splits)


def heuristic(shape: PagedShape) -> TritonPagedConfig:
    """A reasonable untuned config. Decode-like batches (T <= max_seqs) take the fewest query
    tokens that fill 16 dot rows and split KV until ~2 programs per H100 SM; prefill-heavy
    ones take ~64 rows per tile. Key blocks of ~64 tokens (32 for D > 128). Kept within the
    shared memory every supported GPU has where possible; a float32 D = 256 group of 64 query
    heads is not (its queries alone take 64 KiB) and gets a config for the larger GPUs."""
    decode_like = shape.num_tokens <= shape.max_seqs
    group = padded_group(shape)
    queries = min_queries_per_block(shape)
    if not decode_like:
        queries = max(queries, 64 // group)
    kv_tokens = 64 if padded_head_dim(shape.head_dim) <= 128 else 32
    pages = floor_power_of_two(kv_tokens // shape.page_size)
    splits = 1
    if decode_like:
        # Every decode sequence is a query block of its own.
        programs = max(1, shape.num_tokens * shape.kv_heads)
        splits = min(16, next_power_of_two(max(1, TARGET_PROGRAMS // programs)))
    config = TritonPagedConfig(kv_pages_per_block=pages, queries_per_block=queries,
                               kv_splits=splits, num_warps=4, num_stages=2)
    return fit_resources(config.clamp(shape), shape)


def fit_resources(config: TritonPagedConfig, shape: PagedShape,
                  shared_memory_budget: int = PORTABLE_SHARED_MEMORY_BYTES) -> TritonPagedConfig:
    """`config` made valid for `shape` and within `shared_memory_budget` (by default what every
    supported GPU offers) where it can be: fewer pipeline stages, more warps, smaller key
    blocks (fewer pages, then parts of a page), fewer query tokens per block. Where no step
    gets under the budget the result is still valid, for the GPUs with more shared memory."""

    def fits(c: TritonPagedConfig) -> bool:
        return (c.invalid_reason(shape) is None
                and c.shared_memory_bytes(shape) <= shared_memory_budget)

    smallest_pages = min_kv_pages_per_block(shape)
    smallest_queries = min_queries_per_block(shape)
    steps = (
        (lambda c: c.num_stages > 1, lambda c: c.replace(num_stages=c.num_stages - 1)),
        (lambda c: c.num_warps < 8, lambda c: c.replace(num_warps=c.num_warps * 2)),
        (lambda c: c.kv_pages_per_block > smallest_pages,
         lambda c: c.replace(kv_pages_per_block=c.kv_pages_per_block // 2)),
        (lambda c: (c.kv_pages_per_block == 1 and shape.page_size % (2 * c.sub_page_blocks) == 0
                    and shape.page_size // (2 * c.sub_page_blocks) >= MIN_DOT_SIZE),
         lambda c: c.replace(sub_page_blocks=c.sub_page_blocks * 2)),
        (lambda c: c.queries_per_block > smallest_queries,
         lambda c: c.replace(queries_per_block=c.queries_per_block // 2)),
    )
    for can_change, change in steps:
        while not fits(config) and can_change(config):
            config = change(config).clamp(shape)
    return config


# ---- Launch plan: everything both launch paths share ---------------------------------------


@dataclasses.dataclass(frozen=True)
class LaunchPlan:
    """Grids, constexprs and output shapes of the kernel launches for one shape and config."""

    attention_grid: tuple[int, int, int]
    # Sizes that vary from batch to batch are run-time arguments, so one compiled kernel
    # serves every batch; what shapes the code (heads, head dim, page size, blocks) is constexpr.
    attention_sizes: tuple[int, ...]  # (T, max_seqs, pages_per_seq, P)
    attention_constants: dict[str, Any]
    attention_outputs: tuple[tuple[tuple[int, ...], str], ...]  # (shape, dtype) per output
    combine_grid: tuple[int, int] | None  # None: one kernel (kv_splits == 1)
    combine_sizes: tuple[int, ...]  # (T, max_seqs)
    combine_constants: dict[str, Any]
    out_shape: tuple[tuple[int, ...], str]
    num_warps: int
    num_stages: int


def launch_plan(args: PagedArgs, config: TritonPagedConfig, has_kv_scales: bool = False,
                kv_heads: int | None = None) -> LaunchPlan:
    num_tokens, q_heads, head_dim = args.queries.shape
    num_pages, page_size, kv_slots, kv_lanes = args.kv_pages.shape
    kv_heads = kv_slots // 2 if kv_heads is None else kv_heads
    max_seqs, pages_per_seq = args.page_table.shape
    group_size = q_heads // kv_heads
    queries = config.queries_per_block
    splits = config.kv_splits
    kv_tokens = config.kv_pages_per_block * page_size // config.sub_page_blocks
    out_shape = ((num_tokens, q_heads, head_dim), jnp.dtype(args.queries.dtype).name)
    has_sinks = args.sinks is not None
    attention_constants = dict(
        SOFTMAX_SCALE=float(args.softmax_scale),
        HAS_WINDOW=args.window_left is not None,
        WINDOW_LEFT=0 if args.window_left is None else int(args.window_left),
        HAS_SOFT_CAP=args.logits_soft_cap is not None,
        SOFT_CAP=1.0 if args.logits_soft_cap is None else float(args.logits_soft_cap),
        HAS_SINKS=has_sinks,
        HAS_KV_SCALES=has_kv_scales,
        PAGE_SIZE=page_size, Q_HEADS=q_heads, GROUP_SIZE=group_size,
        GROUP_PADDED=next_power_of_two(group_size), HEAD_DIM=head_dim,
        HEAD_DIM_PADDED=padded_head_dim(head_dim), KV_SLOTS=kv_slots, KV_LANES=kv_lanes,
        QUERIES_PER_BLOCK=queries,
        KV_TOKENS_PER_BLOCK=kv_tokens,
        KV_BLOCK=next_power_of_two(kv_tokens),
        SPLIT_PARTIALS=splits > 1,
        # float32 operands must not be rounded to tf32; 16-bit operands ignore this.
        DOT_PRECISION="ieee",
    )
    # Virtual sequences -1 .. max_seqs each start at most one block early (module docstring
    # of triton_paged_kernels): this many programs cover every block of every sequence.
    query_programs = cdiv(num_tokens, queries) + max_seqs + 2
    if splits == 1:
        attention_outputs = (out_shape, ((1,), "float32"))
    else:
        attention_outputs = (((splits, num_tokens, q_heads, head_dim), "float32"),
                             ((splits, num_tokens, q_heads, 2), "float32"))
    combine_constants = dict(
        HAS_SINKS=has_sinks, Q_HEADS=q_heads,
        HEAD_DIM=head_dim, HEAD_DIM_PADDED=padded_head_dim(head_dim), KV_SPLITS=splits,
        SPLITS_PADDED=next_power_of_two(splits),
    )
    return LaunchPlan(
        attention_grid=(query_programs, kv_heads, splits),
        attention_sizes=(num_tokens, max_seqs, pages_per_seq, num_pages),
        attention_constants=attention_constants,
        attention_outputs=attention_outputs,
        combine_grid=None if splits == 1 else (num_tokens, q_heads),
        combine_sizes=(num_tokens, max_seqs),
        combine_constants=combine_constants,
        out_shape=out_shape,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )


def _run(launch: Launch, plan: LaunchPlan, kernels, queries, kv_pages, context_lens, page_table,
         query_start_loc, num_seqs, sinks, kv_scales):
    attention_kernel, combine_kernel = kernels
    outputs = launch(attention_kernel, plan.attention_grid,
                     (queries, kv_pages, context_lens, page_table, query_start_loc, num_seqs,
                      sinks, kv_scales, *plan.attention_sizes),
                     plan.attention_outputs, plan.attention_constants, plan.num_warps,
                     plan.num_stages)
    if plan.combine_grid is None:
        return outputs[0]
    (out,) = launch(combine_kernel, plan.combine_grid,
                    (*outputs, query_start_loc, num_seqs, sinks, *plan.combine_sizes),
                    (plan.out_shape,),
                    plan.combine_constants, COMBINE_NUM_WARPS, 1)
    return out


def ragged_paged_attention_triton(args: PagedArgs, config: TritonPagedConfig, *,
                                  interpret: bool = False,
                                  compute_capability: int | None = None,
                                  kv_scales: jax.Array | None = None,
                                  kv_heads: int | None = None) -> jax.Array:
    """Triton ragged paged attention. Returns [T, Hq, D] in the queries' dtype.

    kv_scales: f32 [2], (key scale, value scale) of a quantized cache; the kernel multiplies
    the logits by the first and the output by the second.
    kv_heads: Hkv when `args.kv_pages` has padding slots (more than 2 * Hkv) or lanes (more
    than D) past the ones it reads; None: none.

    interpret: run the same kernels under Triton's CPU interpreter (through a pure_callback).
    compute_capability: the GPU to compile for (e.g. 90); None asks the local GPU. Giving it
    lets a CPU-only host lower the kernel for CUDA (jax.export with platforms=["cuda"]).
    """
    plan = launch_plan(args, config, has_kv_scales=kv_scales is not None, kv_heads=kv_heads)
    sinks = args.sinks if args.sinks is not None else jnp.zeros((1,), jnp.float32)
    if kv_scales is None:
        kv_scales = jnp.ones((2,), jnp.float32)
    arrays = (args.queries, args.kv_pages, args.context_lens, args.page_table,
              args.query_start_loc, args.num_seqs.reshape(1), sinks,
              jnp.asarray(kv_scales, jnp.float32).reshape(2))
    from .triton_paged_kernels import compiled_kernels

    if not interpret:
        gpu = triton_launch.gpu_launch(compute_capability)
        return _run(gpu, plan, compiled_kernels(interpret=False), *arrays)

    kernels = compiled_kernels(interpret=True)

    def run(launch: Launch, *tensors):
        return _run(launch, plan, kernels, *tensors)

    return triton_launch.call_interpreted(run, plan.out_shape, *arrays)


VARIANT = Variant(
    name="triton",
    op="paged",
    platforms=("gpu",),
    interpretable=True,
    features=frozenset(FEATURES),
    config_class=TritonPagedConfig,
    kernel=ragged_paged_attention_triton,
    heuristic=heuristic,
    description=("Triton (jax-triton): a program per (query block of one sequence, KV head), "
                 "pages gathered through the page table with an online softmax; optional KV "
                 "splits with a merge kernel for decode batches"),
)
