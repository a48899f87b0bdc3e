"""What both native variants pass to the library: the contract's options and the shared
tunables, as FFI attributes, and the sinks operand (zeros with a flag when there are none)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from . import build


def call(target: str, out_shape: tuple[int, ...], operands: tuple, args, config, **extra):
    """Runs the handler `target` (registering the library first) -> float32 `out_shape`.

    `args` are an operator's normalized arguments (scale, window, soft cap, sinks); `config`
    holds the tunables both variants share.
    """
    build.load()
    query = operands[0]
    q_heads = query.shape[1]
    sinks = args.sinks if args.sinks is not None else jnp.zeros((q_heads,), jnp.float32)
    attributes = dict(
        scale=np.float32(args.softmax_scale),
        window_left=np.int64(-1 if args.window_left is None else args.window_left),
        soft_cap=np.float32(0.0 if args.logits_soft_cap is None else args.logits_soft_cap),
        has_sinks=np.int64(args.sinks is not None),
        block=np.int64(config.kv_block_size),
        heads_per_task=np.int64(config.heads_per_task),
        threads=np.int64(config.threads),
        splits=np.int64(config.kv_splits),
        prefetch=np.int64(config.prefetch_distance),
        # A bfloat16 query is exact in bfloat16, so the scores may use bfloat16 dot products
        # (float32 accumulation) without rounding anything the reference does not.
        bf16_dot=np.int64(query.dtype == jnp.bfloat16),
        **{name: np.int64(value) for name, value in extra.items()},
    )
    operands = (query.astype(jnp.float32),) + tuple(operands[1:]) + (sinks.astype(jnp.float32),)
    return jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(out_shape, jnp.float32))(
        *operands, **attributes)


# Bytes of one head's keys the library scores per online-softmax update, in both variants'
# heuristics: about 16 KiB was the fastest measured (64 positions at D=128 in bfloat16).
KEY_BLOCK_BYTES = 16 << 10


def heuristic_key_block(head_dim: int, dtype: str) -> int:
    """kv_block_size of the heuristic defaults: KEY_BLOCK_BYTES of one head's keys, a power
    of two in [32, 256] (the tunable's sweep range)."""
    positions = KEY_BLOCK_BYTES // (head_dim * jnp.dtype(dtype).itemsize)
    return min(max(1 << max(positions, 1).bit_length() - 1, 32), 256)
