"""ragged_paged_attention_v3 as a Pallas TPU (Mosaic) kernel: the one scatter of the new
tokens into the packed cache, then the paged operator's Pallas kernel reading the cache as
stored.

The packed cache [P, page_size, rows, pack, D_padded] is, under a reshape, the v2 kernel's
[P, page_size, slots * D_padded] view: the key of KV head g is lane block 2g, its value 2g + 1,
each D_padded (a multiple of 128) wide, so each page's block is one BlockSpec fetch; the
queries are padded to D_padded lanes with zeros and the cache's padding lanes are zeroed in
the kernel. float8_e4m3fn and int8 blocks are fetched as stored and widened in the kernel to
the queries' dtype (exact); k_scale multiplies the logits and v_scale the output there, read
from SMEM, so one compiled kernel serves every scale.

With ``chunk_prefill_size > 0`` the decode band and the chunked-prefill and mixed bands run as
two launches (``query_rows_per_block`` and ``chunk_prefill_size`` query rows per block).
``vmem_limit_mib`` raises Mosaic's scoped VMEM limit, and with it the budget the config's
blocks are planned against.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..paged import pallas_tpu as paged_pallas_tpu
from ..paged.inputs import PagedShape
from ..paged.pallas_tpu import PallasTpuPagedConfig, heuristic as paged_heuristic, pallas_tpu_paged
from ..tpu_limits import MiB, VMEM_SAFETY_FRACTION, block_dtype, sublane_tile
from ..tunables import cdiv, one_of, tunable
from ..variant import Variant
from . import cache
from .bands import attend_by_band, kv_scales
from .inputs import PagedV3Args, PagedV3Shape
from .reference import as_paged_args

CHUNK_PREFILL_SIZES = (0, 16, 32, 64, 128, 256)
# The in-kernel pieces this variant runs through the paged variant's module, so that its tuned
# entries go stale with them (kernels/fingerprint.py).
KERNEL_SOURCES = (str(Path(paged_pallas_tpu.__file__).parent.parent / "pallas_tpu_common.py"),)
# v5e and v6e have 128 MiB of VMEM; the compiler grants 16 (v5e) or 32 (v6e) by default.
VMEM_LIMITS_MIB = (0, 32, 64, 96)


def kernel_shape(shape: PagedV3Shape | PagedShape) -> PagedShape:
    """The v2 shape the kernel's blocks have: D_padded lanes, and the dtype its queries enter
    in (the queries' own beside an 8-bit or equal cache, else float32)."""
    if isinstance(shape, PagedShape):
        return shape
    same = shape.cache_dtype == shape.dtype or shape.cache_dtype in cache.QUANTIZED
    return PagedShape(num_tokens=shape.num_tokens, max_seqs=shape.max_seqs,
                      pages_per_seq=shape.pages_per_seq, page_size=shape.page_size,
                      num_pages=shape.num_pages, q_heads=shape.q_heads,
                      kv_heads=shape.kv_heads, head_dim=cache.padded_head_dim(shape.head_dim),
                      dtype=shape.dtype if same else "float32", features=shape.features)


@dataclasses.dataclass(frozen=True)
class PallasTpuV3Config(PallasTpuPagedConfig):
    """The v2 Pallas kernel's tunables and rules, plus the prefill bands' own query block and
    the VMEM limit."""

    chunk_prefill_size: int = tunable(
        0, CHUNK_PREFILL_SIZES, one_of(*CHUNK_PREFILL_SIZES),
        "query rows per block of the chunked-prefill and mixed bands, which then run as a "
        "launch of their own (0: one launch for every band)")
    vmem_limit_mib: int = tunable(
        0, VMEM_LIMITS_MIB, one_of(*VMEM_LIMITS_MIB),
        "Mosaic's scoped VMEM limit in MiB (0: the compiler's default for the chip)")

    def attention_config(self) -> PallasTpuPagedConfig:
        """The v2 config of the decode-band launch (of the only launch, without chunks)."""
        fields = {name: getattr(self, name) for name in PallasTpuPagedConfig.tunable_names()}
        return PallasTpuPagedConfig(**fields)

    def prefill_config(self) -> PallasTpuPagedConfig | None:
        """The v2 config of the prefill bands' launch, or None for one launch."""
        if self.chunk_prefill_size == 0:
            return None
        return self.attention_config().replace(query_rows_per_block=self.chunk_prefill_size)

    def vmem_limit_bytes(self) -> int | None:
        """The scoped VMEM limit this config compiles with; None: the compiler's default."""
        return self.vmem_limit_mib * MiB if self.vmem_limit_mib else None

    def vmem_budget_bytes(self) -> int:
        limit = self.vmem_limit_bytes()
        return super().vmem_budget_bytes() if limit is None else int(limit * VMEM_SAFETY_FRACTION)

    def launch_configs(self) -> list[PallasTpuV3Config]:
        """This config as each launch runs it (one launch, or decode then prefill bands)."""
        launches = [self.replace(chunk_prefill_size=0)]
        if self.chunk_prefill_size:
            launches.append(launches[0].replace(query_rows_per_block=self.chunk_prefill_size))
        return launches

    def invalid_reason(self, shape: PagedV3Shape | PagedShape) -> str | None:
        if isinstance(shape, PagedV3Shape) and self.pages_per_block > 1:
            stored = block_dtype(shape.cache_dtype)
            if stored.itemsize > 1 and shape.page_size % sublane_tile(stored):
                # 16- and 32-bit pages are stacked as stored; 8-bit ones once widened.
                return (f"pages_per_block {self.pages_per_block} > 1 needs page_size "
                        f"({shape.page_size}) to be a multiple of the {sublane_tile(stored)}-row "
                        f"sublane tile of the {shape.cache_dtype} cache")
        for launch in self.launch_configs():
            reason = super(PallasTpuV3Config, launch).invalid_reason(kernel_shape(shape))
            if reason is not None:
                if launch.query_rows_per_block != self.query_rows_per_block:
                    reason = f"with chunk_prefill_size = {self.chunk_prefill_size}: {reason}"
                return reason
        return None

    def vmem_estimate_bytes(self, shape: PagedV3Shape | PagedShape) -> int:
        return max(super(PallasTpuV3Config, launch).vmem_estimate_bytes(kernel_shape(shape))
                   for launch in self.launch_configs())

    def clamp(self, shape: PagedV3Shape | PagedShape) -> PallasTpuV3Config:
        shape = kernel_shape(shape)
        inner = self.attention_config().clamp(shape)
        chunk = self.chunk_prefill_size
        if chunk:
            tile = sublane_tile(shape.dtype)
            all_rows = max(tile, cdiv(shape.num_tokens, tile) * tile)
            chunk = min(chunk, max(CHUNK_PREFILL_SIZES[1], all_rows))
        return self.replace(chunk_prefill_size=chunk, **inner.to_dict())


def heuristic(shape: PagedV3Shape) -> PallasTpuV3Config:
    """The v2 kernel's default (one launch: a query block holds rows of any sequences, so
    decode rows fill it without a band of their own) under the default VMEM limit."""
    config = PallasTpuV3Config(**paged_heuristic(kernel_shape(shape)).to_dict())
    # A 16-bit cache beside 32-bit queries stacks pages by its own, taller tile.
    while config.invalid_reason(shape) and config.pages_per_block > 1:
        config = config.replace(pages_per_block=config.pages_per_block // 2)
    return config


def ragged_paged_attention_v3_pallas_tpu(args: PagedV3Args, config: PallasTpuV3Config, *,
                                         interpret: bool = False):
    """Returns ([T, Hq, D] in the queries' dtype, the updated cache)."""
    updated = cache.write_new_tokens(args)
    num_pages, page_size, rows, pack, lanes = updated.shape
    paged = as_paged_args(args, updated.reshape(num_pages, page_size, rows * pack, lanes))
    scales = kv_scales(args)
    kv_heads = args.keys.shape[1]

    def attend(call_args, call_config):
        return pallas_tpu_paged(call_args, call_config, interpret=interpret, kv_scales=scales,
                                kv_heads=kv_heads, vmem_limit_bytes=config.vmem_limit_bytes())

    out = attend_by_band(paged, args.distribution, attend, config.attention_config(),
                         config.prefill_config())
    return out, updated


VARIANT = Variant(
    name="pallas_tpu",
    op="paged_v3",
    platforms=("tpu",),
    interpretable=True,
    features=frozenset({"sliding_window", "logits_soft_cap", "sinks"}),
    config_class=PallasTpuV3Config,
    kernel=ragged_paged_attention_v3_pallas_tpu,
    heuristic=heuristic,
    description="one scatter of the new tokens into the packed cache (in place when donated), "
                "then the paged Pallas TPU kernel on the cache as stored (float8/int8 widened "
                "in the kernel, scales from SMEM); optionally the prefill bands in a launch of "
                "their own; a tunable VMEM limit",
)
