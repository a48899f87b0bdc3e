"""decode_attention as a Pallas TPU (Mosaic) kernel: flash decoding over KV blocks.

Grid: (batch, kv head, query-head block, KV block). Each step multiplies a block of query
heads of one KV head ([heads_per_block, D]) with one KV block ([kv_block_size, D]) and
updates an online softmax kept in VMEM scratch; the last KV block writes the output.

Ragged skipping: the valid key range of each row, [lo, hi) = [max(start, end - 1 - window),
end), is scalar-prefetched into SMEM. Blocks outside it skip their compute (`pl.when`), and
their index_map is clamped into the range so the pipeline sees an unchanged block index and
issues no DMA for them.

Layout: key/value [B, S, Hkv, D] are viewed as [B, S, Hkv * D] (a free reshape), so a block
is [kv_block_size, D] at lane-block `h` with no copy; that needs D % 128 == 0 (or Hkv == 1).
Other head dims take a transposed copy [B, Hkv, S, D] (one extra pass over the cache).

Mosaic's tiling and VMEM rules are in kernels/tpu_limits.py; the in-kernel softmax pieces it
shares with the paged kernel are in kernels/pallas_tpu_common.py.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from .inputs import DecodeArgs, DecodeShape
from ..jax_compat import tpu_compiler_params
from ..pallas_tpu_common import finish_softmax, interpret_params, online_softmax_step, scores_of
from ..sharding import out_struct, vary_like
from ..tpu_limits import (
    LANES, MiB, block_dtype, padded_tile_bytes, query_block_dtype, sublane_tile,
    vmem_budget_bytes,
)
from ..tunables import KernelConfig, POSITIVE_INT, cdiv, tunable
from ..variant import Variant

# ---- Config -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PallasTpuDecodeConfig(KernelConfig):
    """Block sizes of the TPU decode kernel."""

    kv_block_size: int = tunable(
        512, (128, 256, 512, 1024, 2048), POSITIVE_INT,
        "cache positions per grid step (rows of the K/V block; a multiple of the sublane tile)")
    heads_per_block: int = tunable(
        8, (1, 2, 4, 8, 16, 32), POSITIVE_INT,
        "query heads of one KV head per grid step (divides Hq / Hkv; the whole group or a "
        "multiple of the sublane tile)")

    def invalid_reason(self, shape: DecodeShape) -> str | None:
        tile = sublane_tile(shape.dtype)
        group = shape.group_size
        if self.kv_block_size % tile and self.kv_block_size != shape.max_len:
            return (f"kv_block_size {self.kv_block_size} must be a multiple of the {tile}-row "
                    f"sublane tile of {shape.dtype} (or the whole cache, {shape.max_len})")
        if group % self.heads_per_block:
            return (f"heads_per_block {self.heads_per_block} must divide the query heads per "
                    f"KV head ({group})")
        if self.heads_per_block != group and self.heads_per_block % tile:
            return (f"heads_per_block {self.heads_per_block} must be the whole group ({group}) "
                    f"or a multiple of the {tile}-row sublane tile of {shape.dtype}")
        need, budget = decode_vmem_bytes(self, shape), vmem_budget_bytes()
        if need > budget:
            return (f"needs ~{need / MiB:.1f} MiB of VMEM, more than the {budget / MiB:.1f} MiB "
                    "budget of this target")
        return None

    def vmem_estimate_bytes(self, shape: DecodeShape) -> int:
        """This kernel's own estimate of the VMEM it needs (what the check reports: Mosaic's
        compiled executables do not report their VMEM use)."""
        return decode_vmem_bytes(self, shape)

    def clamp(self, shape: DecodeShape) -> PallasTpuDecodeConfig:
        tile = sublane_tile(shape.dtype)
        whole_cache = cdiv(shape.max_len, tile) * tile
        heads = self.heads_per_block
        if heads > shape.group_size:
            heads = shape.group_size
        return self.replace(kv_block_size=min(self.kv_block_size, whole_cache),
                            heads_per_block=heads)


def decode_vmem_bytes(config: PallasTpuDecodeConfig, shape: DecodeShape) -> int:
    """VMEM estimate: double-buffered q/K/V/out blocks, scratch and the logits temporaries."""
    heads, kv_rows, dim = config.heads_per_block, config.kv_block_size, shape.head_dim
    blocks = (padded_tile_bytes(heads, dim, "float32")  # query (at most f32)
              + 2 * padded_tile_bytes(kv_rows, dim, block_dtype(shape.dtype))  # key, value
              + padded_tile_bytes(heads, dim, "float32")  # output
              + padded_tile_bytes(heads, 1, "float32"))  # sinks
    scratch = (padded_tile_bytes(heads, dim, "float32")
               + 2 * padded_tile_bytes(heads, 1, "float32"))
    temporaries = 3 * padded_tile_bytes(heads, kv_rows, "float32")  # scores, weights, mask
    return 2 * blocks + scratch + temporaries


def heuristic(shape: DecodeShape) -> PallasTpuDecodeConfig:
    """Whole query group per step; KV blocks of 512 rows (1024 for short head dims)."""
    kv_rows = 1024 if shape.head_dim <= 64 else 512
    config = PallasTpuDecodeConfig(kv_block_size=kv_rows, heads_per_block=shape.group_size)
    config = config.clamp(shape)
    while config.invalid_reason(shape) and config.kv_block_size > 128:
        config = config.replace(kv_block_size=config.kv_block_size // 2)
    return config


# ---- Kernel -----------------------------------------------------------------------------------


def _decode_kernel(lo_ref, hi_ref, query_ref, key_ref, value_ref, *rest, kv_block_size: int,
                   softmax_scale: float, soft_cap: float | None, has_sinks: bool):
    if has_sinks:
        sinks_ref, _poisoned, out_ref, m_ref, l_ref, acc_ref = rest
    else:
        sinks_ref = None
        _poisoned, out_ref, m_ref, l_ref, acc_ref = rest
    from jax.experimental import pallas as pl

    batch, kv_block = pl.program_id(0), pl.program_id(3)
    lo, hi = lo_ref[batch], hi_ref[batch]
    block_start = kv_block * kv_block_size

    @pl.when(kv_block == 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    @pl.when((block_start < hi) & (block_start + kv_block_size > lo))
    def _accumulate():
        scores = scores_of(query_ref[...], key_ref[...], softmax_scale, soft_cap)
        position = block_start + jax.lax.broadcasted_iota(jnp.int32, scores.shape, 1)
        valid = (position >= lo) & (position < hi)
        values = value_ref[...]
        # Positions outside [lo, hi) (and the padding past S) may hold NaN, and
        # 0 * NaN would leak into P @ V.
        rows = block_start + jax.lax.broadcasted_iota(jnp.int32, (values.shape[0], 1), 0)
        values = jnp.where((rows >= lo) & (rows < hi), values, jnp.zeros_like(values))
        online_softmax_step(scores, valid, values, m_ref, l_ref, acc_ref)

    @pl.when(kv_block == pl.num_programs(3) - 1)
    def _finish():
        sinks = None if sinks_ref is None else sinks_ref[...]
        out_ref[...] = finish_softmax(m_ref, l_ref, acc_ref, sinks).astype(out_ref.dtype)


def pallas_tpu_decode(args: DecodeArgs, config: PallasTpuDecodeConfig, *,
                      interpret: bool = False) -> jax.Array:
    """decode_attention on TPU (or in TPU interpret mode). Returns f32 [B, Hq, D]."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import tpu as pltpu

    batch, q_heads, head_dim = args.query.shape
    _, max_len, kv_heads, _ = args.key.shape
    group = q_heads // kv_heads
    heads, kv_rows = config.heads_per_block, config.kv_block_size
    num_kv_blocks = cdiv(max_len, kv_rows)

    hi = jnp.clip(args.sequence_end, 0, max_len)
    lo = jnp.clip(args.sequence_start, 0, hi)
    if args.window_left is not None:
        lo = jnp.maximum(lo, hi - 1 - args.window_left)

    def kv_block_of(b, kv_block, lo_ref, hi_ref):
        # Blocks outside [lo, hi) map to the nearest needed one: same index, no new DMA.
        first = lo_ref[b] // kv_rows
        last = jnp.maximum(hi_ref[b] - 1, lo_ref[b]) // kv_rows
        return jnp.clip(kv_block, first, jnp.minimum(last, num_kv_blocks - 1))

    key = args.key.astype(block_dtype(args.key.dtype))
    value = args.value.astype(block_dtype(args.value.dtype))
    if head_dim % LANES == 0 or kv_heads == 1:
        key = key.reshape(batch, max_len, kv_heads * head_dim)
        value = value.reshape(batch, max_len, kv_heads * head_dim)
        kv_spec = pl.BlockSpec(
            (None, kv_rows, head_dim),
            lambda b, h, hb, kb, lo_ref, hi_ref: (b, kv_block_of(b, kb, lo_ref, hi_ref), h))
    else:
        key = jnp.transpose(key, (0, 2, 1, 3))
        value = jnp.transpose(value, (0, 2, 1, 3))
        kv_spec = pl.BlockSpec(
            (None, None, kv_rows, head_dim),
            lambda b, h, hb, kb, lo_ref, hi_ref: (b, h, kv_block_of(b, kb, lo_ref, hi_ref), 0))

    query = args.query.astype(query_block_dtype(args.query.dtype, args.key.dtype))
    query = query.reshape(batch, kv_heads, group, head_dim)
    head_spec = pl.BlockSpec((None, None, heads, head_dim),
                             lambda b, h, hb, kb, lo_ref, hi_ref: (b, h, hb, 0))
    operands = [query, key, value]
    in_specs = [head_spec, kv_spec, kv_spec]
    if args.sinks is not None:
        operands.append(args.sinks.reshape(kv_heads, group, 1))
        in_specs.append(pl.BlockSpec((None, heads, 1),
                                     lambda b, h, hb, kb, lo_ref, hi_ref: (h, hb, 0)))
    # NaN-filled output buffer: any element the kernel fails to write stays NaN.
    # Per shard (shard_map), the buffer and the output vary over the axes the inputs do.
    operands.append(vary_like(jnp.full((batch, kv_heads, group, head_dim), jnp.nan,
                                       jnp.float32), lo, hi, operands))
    in_specs.append(pl.BlockSpec(memory_space=pl.ANY))

    kernel = functools.partial(
        _decode_kernel, kv_block_size=kv_rows, softmax_scale=args.softmax_scale,
        soft_cap=args.logits_soft_cap, has_sinks=args.sinks is not None)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(batch, kv_heads, group // heads, num_kv_blocks),
        in_specs=in_specs,
        out_specs=head_spec,
        scratch_shapes=[pltpu.VMEM((heads, 1), jnp.float32),
                        pltpu.VMEM((heads, 1), jnp.float32),
                        pltpu.VMEM((heads, head_dim), jnp.float32)],
    )
    out = pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=out_struct((batch, kv_heads, group, head_dim), jnp.float32, lo, hi, operands),
        # Operand indices count the two scalar-prefetch arrays first.
        input_output_aliases={2 + len(operands) - 1: 0},
        compiler_params=tpu_compiler_params(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=interpret_params(interpret),
        name="attnbench_decode_pallas_tpu",
    )(lo, hi, *operands)
    return out.reshape(batch, q_heads, head_dim)


VARIANT = Variant(
    name="pallas_tpu",
    op="decode",
    platforms=("tpu",),
    interpretable=True,
    features=frozenset({"sliding_window", "logits_soft_cap", "sinks"}),
    config_class=PallasTpuDecodeConfig,
    kernel=pallas_tpu_decode,
    heuristic=heuristic,
    description="Pallas TPU (Mosaic) flash decoding: KV blocks x query-head blocks, "
                "blocks outside [start, end) and the window skipped",
)
