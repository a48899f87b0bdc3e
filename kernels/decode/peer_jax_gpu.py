"""Peer: JAX's Pallas GPU decode kernel (``jax.experimental.pallas.ops.gpu.decode_attention.gqa``).

Split-K flash decoding written in Pallas for Triton: the cache of each (row, KV head) is cut
into `k_splits` equal parts, each scanned in `block_k` steps by one program holding
`block_h` query heads, and the parts are merged outside the kernel. Its call takes the
operator's layout as is (query [B, Hq, D], key/value [B, S, Hkv, D], start and end per
row), so nothing is converted. It has no window, soft cap or sinks, and no softmax
denominator guard beyond an epsilon (an empty row gives zeros).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from .inputs import DecodeArgs, DecodeShape
from ..peers import PeerOrigin
from ..tunables import KernelConfig, POWER_OF_TWO, Rule, floor_power_of_two, one_of, tunable
from ..variant import Variant

ORIGIN = PeerOrigin(project="jax", distribution="jax",
                    module="jax.experimental.pallas.ops.gpu.decode_attention", function="gqa")

# Triton tiles are powers of two and its dot needs at least 16 rows and columns.
MIN_BLOCK = 16
AT_LEAST_16 = Rule(lambda v: POWER_OF_TWO.check(v) and v >= MIN_BLOCK,
                   f"a power of two >= {MIN_BLOCK}")


@dataclasses.dataclass(frozen=True)
class JaxGpuDecodeConfig(KernelConfig):
    """gqa's own keyword arguments (defaults: gqa's)."""

    block_h: int = tunable(16, (16, 32), AT_LEAST_16,
                           "query heads of one KV head per program (padded up to this)")
    block_k: int = tunable(128, (64, 128, 256, 512), AT_LEAST_16,
                           "cache positions per step of a program's loop")
    k_splits: int = tunable(16, (1, 4, 8, 16, 32), POWER_OF_TWO,
                            "equal parts of the cache scanned by separate programs")
    num_warps: int = tunable(4, (2, 4, 8), one_of(1, 2, 4, 8, 16),
                             "Triton warps per program (gqa's None means 4)")
    num_stages: int = tunable(2, (1, 2, 3, 4), one_of(1, 2, 3, 4, 5),
                              "Triton software-pipelining stages")

    def invalid_reason(self, shape: DecodeShape) -> str | None:
        if shape.max_len % self.k_splits:
            return f"k_splits {self.k_splits} must divide the cache length S = {shape.max_len}"
        split = shape.max_len // self.k_splits
        if split < MIN_BLOCK:
            return (f"S / k_splits = {split} must be >= {MIN_BLOCK} (the kernel asserts it)")
        if split % min(self.block_k, split):
            return f"block_k {self.block_k} must divide S / k_splits = {split}"
        if not POWER_OF_TWO.check(shape.head_dim):
            return f"head dim {shape.head_dim} must be a power of two (a Triton tile)"
        return None

    def clamp(self, shape: DecodeShape) -> JaxGpuDecodeConfig:
        splits = self.k_splits
        while splits > 1 and (shape.max_len % splits or shape.max_len // splits < MIN_BLOCK):
            splits //= 2
        split = shape.max_len // splits
        block_k = max(MIN_BLOCK, min(self.block_k, floor_power_of_two(split)))
        return self.replace(k_splits=splits, block_k=block_k)


def heuristic(shape: DecodeShape) -> JaxGpuDecodeConfig:
    """gqa's defaults, cut to the cache length."""
    return JaxGpuDecodeConfig().clamp(shape)


def jax_gpu_decode(args: DecodeArgs, config: JaxGpuDecodeConfig, *,
                   interpret: bool = False) -> jax.Array:
    """decode_attention through gqa (interpret=True: Pallas' GPU interpreter). [B, Hq, D]."""
    gqa = ORIGIN.load()
    max_len = args.key.shape[1]
    end = jnp.clip(args.sequence_end, 0, max_len)
    start = jnp.clip(args.sequence_start, 0, end)
    return gqa(args.query, args.key, args.value, start, end, sm_scale=args.softmax_scale,
               block_h=config.block_h, block_k=config.block_k, k_splits=config.k_splits,
               num_warps=config.num_warps, num_stages=config.num_stages, interpret=interpret)


VARIANT = Variant(
    name="jax_gpu_decode_attention",
    op="decode",
    platforms=("gpu",),
    interpretable=True,
    features=frozenset(),
    config_class=JaxGpuDecodeConfig,
    kernel=jax_gpu_decode,
    heuristic=heuristic,
    description="peer: JAX's Pallas GPU split-K decode kernel (decode_attention.gqa)",
    peer=ORIGIN,
)
