"""Mosaic's rules for the Pallas TPU variants: VMEM tiles, block dtypes and the VMEM budget.

A config's validity rule (``invalid_reason``) uses these to refuse blocks that break the
(sublanes x 128 lanes) tiling or that need more VMEM than the target grants by default, so
the tuner never compiles them. Compiling a config for v5e/v6e with libtpu is the final word
(tests/test_pallas_tpu.py does so for both kernels).
"""

from __future__ import annotations

import jax.numpy as jnp

from .tunables import cdiv

LANES = 128
MiB = 1024 * 1024

# The scoped VMEM a kernel may use without raising `vmem_limit_bytes`: the compiler's default
# per generation (physical VMEM is 128 MiB on v5e/v6e, but only this much is granted by
# default). Off a TPU the target is unknown, so the smallest of these is assumed.
SCOPED_VMEM_BYTES = {
    "tpu-v4": 16 * MiB,
    "tpu-v5e": 16 * MiB,
    "tpu-v5p": 16 * MiB,
    "tpu-v6e": 32 * MiB,
}
# Headroom for what the kernels' VMEM estimates leave out (Mosaic's internal scratch, spills).
VMEM_SAFETY_FRACTION = 0.75


def block_dtype(dtype) -> jnp.dtype:
    """The dtype K/V blocks have inside a kernel: float16 is widened to float32 first.

    Mosaic cannot load float16 vectors on v5e or v6e (compiling for them with libtpu fails
    with "Invalid vector type for load ... xf16"), so float16 caches are converted by XLA
    before the call: correct, but an extra pass over the cache.
    """
    return jnp.dtype(jnp.float32) if jnp.dtype(dtype) == jnp.float16 else jnp.dtype(dtype)


def sublane_tile(dtype) -> int:
    """Rows of one (sublanes x 128 lanes) VMEM tile of `dtype`'s blocks: 8 for 32-bit, 16 for
    bfloat16 (float16 blocks are float32, see block_dtype)."""
    return 8 if block_dtype(dtype).itemsize >= 4 else 16


def padded_tile_bytes(rows: int, cols: int, dtype: str) -> int:
    """VMEM bytes of a [rows, cols] block once padded to whole tiles."""
    tile = sublane_tile(dtype)
    return (cdiv(rows, tile) * tile) * (cdiv(cols, LANES) * LANES) * jnp.dtype(dtype).itemsize


def vmem_budget_bytes() -> int:
    """The VMEM a config may plan for on this target (see SCOPED_VMEM_BYTES).

    The target is the one `platform.lowering_for` names, else this process's backend if it
    already has one. It never creates a backend: the sweep's parent plans configs with this
    and must not take a TPU its workers need (it plans under `lowering_for` the probed kind).
    """
    from .jax_compat import backends_initialized
    from .platform import current_device_kind, current_platform, lowering_target

    budget = min(SCOPED_VMEM_BYTES.values())
    if lowering_target() is not None or backends_initialized():
        if current_platform() == "tpu":
            budget = SCOPED_VMEM_BYTES.get(current_device_kind(), budget)
    return int(budget * VMEM_SAFETY_FRACTION)


def query_block_dtype(query_dtype, kv_dtype) -> jnp.dtype:
    """The dtype queries enter a kernel in: that of the K/V blocks when they match, else f32.

    Matching bfloat16 keeps the MXU's native path; a mixed pair is promoted so no precision
    is lost (float32 tiles are never taller than 16-bit ones, so the tile rules derived from
    the K/V blocks stay sufficient).
    """
    kv_block = block_dtype(kv_dtype)
    return kv_block if jnp.dtype(query_dtype) == kv_block else jnp.dtype(jnp.float32)
