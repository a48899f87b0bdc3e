"""ragged_paged_attention_v3 in Triton for NVIDIA GPUs: the one scatter of the new tokens into
the packed cache, then the paged operator's Triton kernel reading the cache as stored.

The packed layout is, under a free reshape, the v2 layout [P, page_size, slots, lanes] with
padding slots past 2 * Hkv and lanes past D, which the v2 kernel skips (its KV_SLOTS and
KV_LANES), so the attention is the v2 kernel itself: the same constexprs give the same
compiled kernel (D a multiple of 128 and no padding slots: exactly v2's). Quantized caches are read as stored (int8 as
int8, float8_e4m3fn as its uint8 bits, decoded in the kernel: see triton_paged_kernels) and
widened to the queries' dtype, which holds every such value exactly; k_scale multiplies the
logits and v_scale the output inside the kernel, from a run-time array, so one compiled kernel
serves every scale.

With ``chunk_prefill_size > 0`` the decode band (sequences ``[0, d0)``) and the chunked-prefill
and mixed bands (``[d0, d2)``) run as two launches of the kernel, the first with
``queries_per_block`` query tokens per program (and KV splits), the second with
``chunk_prefill_size`` and no splits; each launch sees the other's rows as padding.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp

from ..paged import triton_paged
from ..paged.inputs import PagedShape
from ..paged.triton_paged import TritonPagedConfig, min_queries_per_block
from ..tunables import next_power_of_two, one_of, tunable
from ..variant import Variant
from . import cache
from .bands import attend_by_band, kv_scales
from .inputs import PagedV3Args, PagedV3Shape
from .reference import as_paged_args
from .xla import paged_shape

CHUNK_PREFILL_SIZES = (0, 1, 2, 4, 8, 16, 32, 64)
# The kernel bodies and launch code this variant runs through the paged variant's module, so
# that its tuned entries go stale with them (kernels/fingerprint.py).
_KERNELS_DIR = Path(triton_paged.__file__).parent
KERNEL_SOURCES = (str(_KERNELS_DIR / "triton_paged_kernels.py"),
                  str(_KERNELS_DIR.parent / "triton_launch.py"))


def as_paged_shape(shape: PagedV3Shape | PagedShape) -> PagedShape:
    """The v2 shape the kernel sees (the v2 rules call back with it)."""
    return shape if isinstance(shape, PagedShape) else paged_shape(shape)


@dataclasses.dataclass(frozen=True)
class TritonV3Config(TritonPagedConfig):
    """The v2 Triton kernel's tunables and rules, plus the prefill bands' own query block."""

    chunk_prefill_size: int = tunable(
        0, CHUNK_PREFILL_SIZES, one_of(*CHUNK_PREFILL_SIZES),
        "query tokens per program of the chunked-prefill and mixed bands, which then run as a "
        "launch of their own without KV splits (0: one launch for every band)")

    def attention_config(self) -> TritonPagedConfig:
        """The v2 config of the decode-band launch (of the only launch, without chunks)."""
        fields = {name: getattr(self, name) for name in TritonPagedConfig.tunable_names()}
        return TritonPagedConfig(**fields)

    def prefill_config(self) -> TritonPagedConfig | None:
        """The v2 config of the prefill bands' launch, or None for one launch."""
        if self.chunk_prefill_size == 0:
            return None
        return self.attention_config().replace(queries_per_block=self.chunk_prefill_size,
                                               kv_splits=1)

    def invalid_reason(self, shape: PagedV3Shape | PagedShape) -> str | None:
        shape = as_paged_shape(shape)
        reason = self.attention_config().invalid_reason(shape)
        prefill = self.prefill_config()
        if reason is None and prefill is not None:
            reason = prefill.invalid_reason(shape)
            if reason is not None:
                reason = f"with chunk_prefill_size = {self.chunk_prefill_size}: {reason}"
        return reason

    def clamp(self, shape: PagedV3Shape | PagedShape) -> TritonV3Config:
        shape = as_paged_shape(shape)
        inner = self.attention_config().clamp(shape)
        chunk = self.chunk_prefill_size
        if chunk:
            chunk = min(chunk, max(min_queries_per_block(shape),
                                   next_power_of_two(shape.num_tokens)))
        return self.replace(chunk_prefill_size=chunk, **inner.to_dict())


def heuristic(shape: PagedV3Shape) -> TritonV3Config:
    """The v2 kernel's default. Batches that may hold prefill rows (more tokens than sequences)
    give those its prefill query block in a launch of their own, and the decode band the
    fewest query tokens that fill a dot."""
    paged = as_paged_shape(shape)
    inner = triton_paged.heuristic(paged)
    config = TritonV3Config(**inner.to_dict())
    if shape.num_tokens > shape.max_seqs:
        config = config.replace(chunk_prefill_size=inner.queries_per_block,
                                queries_per_block=min_queries_per_block(paged))
    return config


def kernel_view(kv_cache: jax.Array) -> jax.Array:
    """The cache as the kernel reads it, [P, page_size, rows * pack, D_padded] (a free reshape;
    the kernel skips padding slots and lanes), float8 as its bits (a free bitcast)."""
    num_pages, page_size, rows, pack, lanes = kv_cache.shape
    view = kv_cache.reshape(num_pages, page_size, rows * pack, lanes)
    if view.dtype == jnp.float8_e4m3fn:
        view = jax.lax.bitcast_convert_type(view, jnp.uint8)
    return view


def ragged_paged_attention_v3_triton(args: PagedV3Args, config: TritonV3Config, *,
                                     interpret: bool = False,
                                     compute_capability: int | None = None):
    """Returns ([T, Hq, D] in the queries' dtype, the updated cache)."""
    updated = cache.write_new_tokens(args)
    kv_heads = args.keys.shape[1]
    paged = as_paged_args(args, kernel_view(updated))
    scales = kv_scales(args)

    def attend(call_args, call_config):
        return triton_paged.ragged_paged_attention_triton(
            call_args, call_config, interpret=interpret, compute_capability=compute_capability,
            kv_scales=scales, kv_heads=kv_heads)

    out = attend_by_band(paged, args.distribution, attend, config.attention_config(),
                         config.prefill_config())
    return out, updated


VARIANT = Variant(
    name="triton",
    op="paged_v3",
    platforms=("gpu",),
    interpretable=True,
    features=frozenset({"sliding_window", "logits_soft_cap", "sinks"}),
    config_class=TritonV3Config,
    kernel=ragged_paged_attention_v3_triton,
    heuristic=heuristic,
    description="one scatter of the new tokens into the packed cache (in place when donated), "
                "then the paged Triton kernel on the cache as stored (float8/int8 widened in "
                "the kernel, scales on logits and output); optionally the prefill bands in a "
                "launch of their own",
)
