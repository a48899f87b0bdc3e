"""ragged_paged_attention as a native CPU kernel (C++ through the XLA FFI, built on first use).

Any mix of prefill and decode rows takes the same path. A work item is ``rows_per_task``
query rows of one sequence, ``heads_per_task`` KV heads and one of ``kv_splits`` parts of
the keys those rows see; it looks each key position's page up in the page table (clamped to
the cache), streams the key and value rows once, in the cache dtype, for every query head and
row of the item that sees them, and keeps a float32 online softmax per (row, head). The cores
take items from one counter; the parts of a row are merged at the end, and rows no active
sequence owns are zeros. The library source is ``kernels/native/attention.cc``.
"""

from __future__ import annotations

import dataclasses

import jax

from ..native import build, calls
from ..tunables import (POWER_OF_TWO, KernelConfig, cdiv, int_in, next_power_of_two,
                        tunable)
from ..variant import Variant
from .inputs import PagedArgs, PagedShape


@dataclasses.dataclass(frozen=True)
class CpuNativeConfig(KernelConfig):
    kv_block_size: int = tunable(
        64, (32, 64, 128, 256), POWER_OF_TWO,
        "keys scored before one online-softmax update (the block's scores and values stay "
        "in L1/L2)")
    heads_per_task: int = tunable(
        8, (1, 2, 4, 8), POWER_OF_TWO,
        "KV heads of one sequence that one work item streams together; the cache holds a "
        "position's heads side by side, so more heads read it sequentially (about 2x the "
        "bandwidth of one head per item on a 2-core Zen 4)")
    rows_per_task: int = tunable(
        16, (1, 4, 16, 64), POWER_OF_TWO,
        "query rows of one sequence in one work item: each key row loaded is used by all "
        "of them (prefill chunks); a decode step has one row per sequence")
    threads: int = tunable(
        0, (0, 1), int_in(0, 256), "threads that take work items (0: one per core)")
    kv_splits: int = tunable(
        1, (1, 2, 4, 8), int_in(1, 64),
        "parts the keys of a work item's rows are cut into, computed as separate items "
        "and merged (parallel work for small batches)")
    prefetch_distance: int = tunable(
        32, (0, 8, 32), int_in(0, 1024),
        "key positions ahead whose rows are prefetched (0: leave it to the hardware)")

    def invalid_reason(self, shape: PagedShape) -> str | None:
        if self.kv_block_size > next_power_of_two(shape.max_len):
            return (f"kv_block_size {self.kv_block_size} exceeds the longest context "
                    f"pages_per_seq x page_size = {shape.max_len} rounded up to a power of two")
        if self.heads_per_task > next_power_of_two(shape.kv_heads):
            return (f"heads_per_task {self.heads_per_task} exceeds Hkv = {shape.kv_heads} "
                    f"rounded up to a power of two")
        if self.rows_per_task > next_power_of_two(shape.num_tokens):
            return (f"rows_per_task {self.rows_per_task} exceeds T = {shape.num_tokens} "
                    f"rounded up to a power of two")
        blocks = cdiv(shape.max_len, self.kv_block_size)
        if self.kv_splits > blocks:
            return f"kv_splits {self.kv_splits} exceeds the {blocks} KV blocks of a context"
        if self.prefetch_distance >= shape.max_len:
            return (f"prefetch_distance {self.prefetch_distance} is not below the longest "
                    f"context {shape.max_len}")
        return None

    def clamp(self, shape: PagedShape) -> CpuNativeConfig:
        block = min(self.kv_block_size, next_power_of_two(shape.max_len))
        return self.replace(
            kv_block_size=block,
            heads_per_task=min(self.heads_per_task, next_power_of_two(shape.kv_heads)),
            rows_per_task=min(self.rows_per_task, next_power_of_two(shape.num_tokens)),
            kv_splits=min(self.kv_splits, cdiv(shape.max_len, block)),
            prefetch_distance=min(self.prefetch_distance, shape.max_len - 1))


def heuristic(shape: PagedShape) -> CpuNativeConfig:
    """Key blocks of about 16 KiB of one head's keys, as the decode variant's (64 positions
    at D=128, 32 at D=256), and enough work items to balance ragged contexts over the cores.
    On decode batches (Hq=28/Hkv=4 and Hq=40/Hkv=8, D=128) the other tunables showed no gap
    above a loaded machine's noise."""
    config = CpuNativeConfig(kv_block_size=calls.heuristic_key_block(shape.head_dim,
                                                                     shape.dtype))
    items = shape.max_seqs * cdiv(shape.kv_heads, config.heads_per_task)
    splits = 1
    while items * splits < 16 and splits < 8:
        splits *= 2
    return config.replace(kv_splits=splits).clamp(shape)


def paged_attention_native(args: PagedArgs, config: CpuNativeConfig, *,
                           interpret: bool = False) -> jax.Array:
    """ragged_paged_attention in the native library. Returns f32 [T, Hq, D]."""
    del interpret  # never set: the variant has no interpreter mode
    operands = (args.queries, args.kv_pages, args.context_lens, args.page_table,
                args.query_start_loc, args.num_seqs.reshape(1))
    return calls.call("attnbench_paged", args.queries.shape, operands, args, config,
                      rows_per_task=config.rows_per_task)


VARIANT = Variant(
    name="cpu_native",
    op="paged",
    platforms=("cpu",),
    interpretable=False,
    features=frozenset({"sliding_window", "logits_soft_cap", "sinks"}),
    config_class=CpuNativeConfig,
    kernel=paged_attention_native,
    heuristic=heuristic,
    description="native C++ kernel through the XLA FFI, built on first use: pages looked "
                "up per key position, each KV row streamed once for the query rows and heads "
                "that see it, work items over (sequence, rows, KV heads, key range)",
    available=build.unavailable_reason,
)
