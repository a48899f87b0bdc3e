"""ragged_paged_attention_v3 on CPUs: the new tokens copied into their cache slots in place by
a native handler, then the paged operator's native kernel on the packed cache as stored.

XLA:CPU's scatter converts a 16-bit float cache to float32 and back, so the XLA variant's write
costs a pass over the whole cache per call; the native write touches only the T slots (the
cache operand is aliased to the result, in place when donated). The attention reads the packed
layout as the v2 layout [P, page_size, 2 * Hkv, D] (a free reshape when no slot or lane is
padding), so it runs the paged ``cpu_native`` kernel. That kernel reads float32, bfloat16 and
float16 caches; quantized caches take the XLA variant.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import os
from pathlib import Path

import jax
import jax.numpy as jnp

from ..native import build
from ..paged import cpu_native as paged_native
from ..variant import Variant
from . import cache
from .inputs import PagedV3Args, PagedV3Shape
from .reference import as_paged_args
from .xla import paged_shape

SOURCE = Path(__file__).parent.parent / "native" / "cache_write.cc"
KERNEL_SOURCES = (SOURCE,)  # fingerprinted with this variant
_TARGET = "attnbench_cache_write"
CACHE_DTYPES = ("float32", "bfloat16", "float16")


@functools.cache
def _load() -> ctypes.CDLL:
    """Builds (or finds) the cache-write library and registers its handler with XLA:CPU."""
    extra = tuple(os.environ.get("ATTNBENCH_NATIVE_FLAGS", "").split())
    library = ctypes.cdll.LoadLibrary(str(build.build(extra, source=SOURCE).library))
    jax.ffi.register_ffi_target(_TARGET, jax.ffi.pycapsule(getattr(library, _TARGET)),
                                platform="cpu")
    return library


@functools.cache
def unavailable_reason() -> str | None:
    """Why this variant cannot run here (a builder's message), or None."""
    reason = build.unavailable_reason()
    if reason:
        return reason
    try:
        _load()
    except (build.NativeBuildError, OSError, AttributeError) as error:
        return f"the native cache-write library is unavailable: {error}"
    return None


def shape_support(shape: PagedV3Shape) -> str | None:
    if shape.cache_dtype not in CACHE_DTYPES:
        return f"reads {', '.join(CACHE_DTYPES)} caches, not {shape.cache_dtype}"
    return None


@dataclasses.dataclass(frozen=True)
class CpuNativeV3Config(paged_native.CpuNativeConfig):
    """The paged native kernel's tunables, judged on the v2 shape the kernel sees."""

    def invalid_reason(self, shape: PagedV3Shape) -> str | None:
        return paged_native.CpuNativeConfig.invalid_reason(self, paged_shape(shape))

    def clamp(self, shape: PagedV3Shape) -> CpuNativeV3Config:
        return paged_native.CpuNativeConfig.clamp(self, paged_shape(shape))


def heuristic(shape: PagedV3Shape) -> CpuNativeV3Config:
    inner = paged_native.heuristic(paged_shape(shape))
    return CpuNativeV3Config(**inner.to_dict()).clamp(shape)


def write_new_tokens(args: PagedV3Args) -> jax.Array:
    """The cache with every new token's key and value in its slot: the slots XLA computes
    (``cache.write_slots``), the copy done by the native handler in place."""
    _load()
    slabs = cache.token_slabs(args.keys, args.values, args.kv_cache, args.k_scale, args.v_scale)
    page, row = cache.write_slots(args)
    return jax.ffi.ffi_call(
        _TARGET, jax.ShapeDtypeStruct(args.kv_cache.shape, args.kv_cache.dtype),
        input_output_aliases={0: 0},
    )(args.kv_cache, slabs, page.astype(jnp.int32), row.astype(jnp.int32))


def ragged_paged_attention_v3_native(args: PagedV3Args, config: CpuNativeV3Config, *,
                                     interpret: bool = False):
    """Returns (f32 [T, Hq, D], the updated cache)."""
    del interpret  # never set: the variant has no interpreter mode
    updated = write_new_tokens(args)
    kv_heads, head_dim = args.keys.shape[1:]
    paged = as_paged_args(args, cache.combined_view(updated, kv_heads, head_dim))
    if args.k_scale is not None:
        paged = paged._replace(softmax_scale=args.softmax_scale * args.k_scale)
    out = paged_native.paged_attention_native(paged, config, interpret=False)
    if args.v_scale is not None:
        out = out * args.v_scale
    return out, updated


VARIANT = Variant(
    name="cpu_native",
    op="paged_v3",
    platforms=("cpu",),
    interpretable=False,
    features=frozenset({"sliding_window", "logits_soft_cap", "sinks"}),
    config_class=CpuNativeV3Config,
    kernel=ragged_paged_attention_v3_native,
    heuristic=heuristic,
    description="the new tokens copied into their slots in place by a native handler, then "
                "the paged cpu_native kernel on the cache as stored; caches float32, "
                "bfloat16, float16",
    available=unavailable_reason,
    shape_support=shape_support,
)
