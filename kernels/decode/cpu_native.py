"""decode_attention as a native CPU kernel (C++ through the XLA FFI, built on first use).

Each work item is one sequence, ``heads_per_task`` KV heads and one of ``kv_splits`` parts of
the row's valid keys. It streams every key and value row of its part once, in the cache
dtype, for all the query heads that share that KV head, scoring ``kv_block_size`` keys before
each float32 online-softmax update; bfloat16 queries against a bfloat16 cache are scored with
the CPU's bfloat16 dot instructions where it has them. The cores take items from one counter
and the parts of a row are merged at the end. Only valid positions are read. The library
source is ``kernels/native/attention.cc``; :mod:`attnbench.kernels.native.build` builds it.
"""

from __future__ import annotations

import dataclasses

import jax

from ..native import build, calls
from ..tunables import POWER_OF_TWO, KernelConfig, cdiv, int_in, next_power_of_two, tunable
from ..variant import Variant
from .inputs import DecodeArgs, DecodeShape


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
    threads: int = tunable(
        0, (0, 1), int_in(0, 256), "threads that take work items (0: one per core)")
    kv_splits: int = tunable(
        1, (1, 2, 4, 8), int_in(1, 64),
        "parts each row's valid keys are cut into, computed as separate items and merged "
        "(parallel work for small batches)")
    prefetch_distance: int = tunable(
        32, (0, 8, 32), int_in(0, 1024),
        "key positions ahead whose rows are prefetched (0: leave it to the hardware)")

    def invalid_reason(self, shape: DecodeShape) -> str | None:
        if self.kv_block_size > next_power_of_two(shape.max_len):
            return (f"kv_block_size {self.kv_block_size} exceeds the cache length "
                    f"S = {shape.max_len} rounded up to a power of two")
        if self.heads_per_task > next_power_of_two(shape.kv_heads):
            return (f"heads_per_task {self.heads_per_task} exceeds Hkv = {shape.kv_heads} "
                    f"rounded up to a power of two")
        if self.kv_splits > cdiv(shape.max_len, self.kv_block_size):
            return (f"kv_splits {self.kv_splits} exceeds the {cdiv(shape.max_len, self.kv_block_size)}"
                    f" KV blocks of the cache")
        if self.prefetch_distance >= shape.max_len:
            return (f"prefetch_distance {self.prefetch_distance} is not below the cache length "
                    f"S = {shape.max_len}")
        return None

    def clamp(self, shape: DecodeShape) -> CpuNativeConfig:
        block = min(self.kv_block_size, next_power_of_two(shape.max_len))
        return self.replace(
            kv_block_size=block,
            heads_per_task=min(self.heads_per_task, next_power_of_two(shape.kv_heads)),
            kv_splits=min(self.kv_splits, cdiv(shape.max_len, block)),
            prefetch_distance=min(self.prefetch_distance, shape.max_len - 1))


def heuristic(shape: DecodeShape) -> CpuNativeConfig:
    """Measured on a 2-core CPU (bfloat16 caches; loaded machine, so only large gaps count).

    Blocks of about 16 KiB of one head's keys: 64 positions at D=128 (Llama-3-8B-like and
    MHA shapes, 8 KV heads per item), 32 at D=256 (Gemma-2-like, B=2 S=8192: 1.5x faster
    than 64 there), 128 at D=64 (gpt-oss-like: 64 and 128 tied). Eight KV heads per item
    won on every shape with 8 or more KV heads, and heads_per_task is capped at Hkv. Then
    enough work items to balance ragged rows over the cores: split the rows' keys when the
    batch has few (sequence, head group) pairs.
    """
    config = CpuNativeConfig(kv_block_size=calls.heuristic_key_block(shape.head_dim,
                                                                     shape.dtype))
    items = shape.batch * cdiv(shape.kv_heads, config.heads_per_task)
    splits = 1
    while items * splits < 16 and splits < 8:
        splits *= 2
    return config.replace(kv_splits=splits).clamp(shape)


def decode_attention_native(args: DecodeArgs, config: CpuNativeConfig, *,
                            interpret: bool = False) -> jax.Array:
    """decode_attention in the native library. Returns f32 [B, Hq, D]."""
    del interpret  # never set: the variant has no interpreter mode
    return calls.call(
        "attnbench_decode", args.query.shape,
        (args.query, args.key, args.value, args.sequence_start, args.sequence_end), args, config)


VARIANT = Variant(
    name="cpu_native",
    op="decode",
    platforms=("cpu",),
    interpretable=False,
    features=frozenset({"sliding_window", "logits_soft_cap", "sinks"}),
    config_class=CpuNativeConfig,
    kernel=decode_attention_native,
    heuristic=heuristic,
    description="native C++ kernel through the XLA FFI, built on first use: each KV row "
                "streamed once in the cache dtype for its query heads, work items over "
                "(sequence, KV heads, key range) on every core",
    available=build.unavailable_reason,
)
