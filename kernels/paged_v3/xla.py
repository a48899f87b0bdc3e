"""ragged_paged_attention_v3 in XLA: one scatter of the new tokens into the cache, then the
paged operator's XLA kernels reading the packed cache in place.

The packed layout [P, page_size, rows, pack, D_padded] is, when no slot or lane is
padding, the v2 layout [P, page_size, 2 * Hkv, D] under a free reshape, so the attention
is the ``xla_decode`` kernel (flash decoding over one work list of page blocks; batches
with prefill rows take ``xla_blocked``). A quantized cache is read as stored (every
float8/int8 value is exact in the queries' dtype); its scales are folded in exactly where
they act linearly: k_scale into the logit scale, v_scale onto the output.
"""

from __future__ import annotations

import dataclasses

from ..paged import xla_decode
from ..paged.inputs import PagedShape
from ..tunables import POWER_OF_TWO, KernelConfig, one_of, tunable
from ..variant import Variant
from ..paged.xla_blocked import PAGE_COPIES
from . import cache
from .inputs import PagedV3Args, PagedV3Shape
from .reference import as_paged_args


def paged_shape(shape: PagedV3Shape) -> PagedShape:
    """The v2 shape the attention kernels see."""
    return PagedShape(num_tokens=shape.num_tokens, max_seqs=shape.max_seqs,
                      pages_per_seq=shape.pages_per_seq, page_size=shape.page_size,
                      num_pages=shape.num_pages, q_heads=shape.q_heads,
                      kv_heads=shape.kv_heads, head_dim=shape.head_dim, dtype=shape.dtype,
                      features=shape.features)


@dataclasses.dataclass(frozen=True)
class XlaV3Config(KernelConfig):
    kv_pages_per_block: int = tunable(
        16, (1, 2, 4, 8, 16, 32, 64, 128), POWER_OF_TWO,
        "KV pages per block, the unit of the decode work list and of a prefill KV step")
    blocks_per_step: int = tunable(
        4, (1, 2, 4, 8, 16), POWER_OF_TWO,
        "KV blocks (of any sequences) gathered and computed together in one decode step")
    queries_per_block: int = tunable(
        64, (8, 32, 64, 128), POWER_OF_TWO,
        "query rows of one sequence computed together when the batch holds prefill rows")
    page_copy: str = tunable(
        "pages", PAGE_COPIES, one_of(*PAGE_COPIES),
        "how a KV block leaves the cache: whole pages then a transpose, or per-head slabs")

    def inner(self) -> xla_decode.XlaDecodeConfig:
        return xla_decode.XlaDecodeConfig(
            kv_pages_per_block=self.kv_pages_per_block, blocks_per_step=self.blocks_per_step,
            prefill_queries_per_block=self.queries_per_block, page_copy=self.page_copy)

    def invalid_reason(self, shape: PagedV3Shape) -> str | None:
        return self.inner().invalid_reason(paged_shape(shape))

    def clamp(self, shape: PagedV3Shape) -> XlaV3Config:
        inner = self.inner().clamp(paged_shape(shape))
        return self.replace(kv_pages_per_block=inner.kv_pages_per_block,
                            blocks_per_step=inner.blocks_per_step,
                            queries_per_block=inner.prefill_queries_per_block)


def heuristic(shape: PagedV3Shape) -> XlaV3Config:
    """The paged decode kernel's measured default (about 256 positions per block)."""
    inner = xla_decode.heuristic(paged_shape(shape))
    return XlaV3Config(kv_pages_per_block=inner.kv_pages_per_block,
                       blocks_per_step=inner.blocks_per_step,
                       queries_per_block=inner.prefill_queries_per_block,
                       page_copy=inner.page_copy).clamp(shape)


def ragged_paged_attention_v3_xla(args: PagedV3Args, config: XlaV3Config, *,
                                  interpret: bool = False):
    """Returns (f32 [T, Hq, D], the updated cache)."""
    updated = cache.write_new_tokens(args)
    kv_heads, head_dim = args.keys.shape[1:]
    paged = as_paged_args(args, cache.combined_view(updated, kv_heads, head_dim))
    if args.k_scale is not None:
        paged = paged._replace(softmax_scale=args.softmax_scale * args.k_scale)
    out = xla_decode.ragged_paged_attention_decode(paged, config.inner(), interpret=interpret)
    if args.v_scale is not None:
        out = out * args.v_scale
    return out, updated


VARIANT = Variant(
    name="xla",
    op="paged_v3",
    platforms=("cpu", "gpu", "tpu"),
    interpretable=True,
    features=frozenset({"sliding_window", "logits_soft_cap", "sinks"}),
    config_class=XlaV3Config,
    kernel=ragged_paged_attention_v3_xla,
    heuristic=heuristic,
    description="one scatter of the new tokens into the packed cache (in place when "
                "donated), then the paged XLA kernels on the cache as stored; caches float32, "
                "bfloat16, float16, float8_e4m3fn, int8",
)
