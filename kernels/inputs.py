"""Argument checks shared by every operator (docs/semantics.md, "Bad input").

Each operator's package normalizes its own arguments (``kernels/<op>/inputs.py``) with these
helpers, so every error names the argument and states the expected and actual shape or
dtype the same way.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .jax_compat import is_tracer

SUPPORTED_DTYPES = ("float32", "bfloat16", "float16")
FEATURES = ("sliding_window", "logits_soft_cap", "sinks")
# Positions are int32 in every kernel: a window reaching further back than that sees every
# key already, so longer windows are that window (and never overflow a kernel's arithmetic).
MAX_WINDOW_LEFT = 2**31 - 1


def dtype_name(array: Any) -> str:
    return jnp.dtype(array.dtype).name


def check_rank(name: str, array: Any, ranks: tuple[int, ...], layout: str) -> None:
    if not hasattr(array, "shape") or not hasattr(array, "dtype"):
        raise TypeError(f"{name} must be an array {layout}, got {type(array).__name__}")
    if array.ndim not in ranks:
        raise ValueError(f"{name} must have shape {layout}, got shape {tuple(array.shape)}")


def check_float(name: str, array: Any) -> None:
    if dtype_name(array) not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{name} must have dtype in {list(SUPPORTED_DTYPES)}, got {dtype_name(array)}"
        )


def check_int(name: str, array: Any, shape: tuple[int, ...], layout: str) -> None:
    check_rank(name, array, (len(shape),), layout)
    if not jnp.issubdtype(array.dtype, jnp.integer):
        raise TypeError(f"{name} must be an integer array {layout}, got dtype {dtype_name(array)}")
    if tuple(array.shape) != shape:
        raise ValueError(f"{name} must have shape {layout} = {shape}, got {tuple(array.shape)}")


_INT32 = np.iinfo(np.int32)


def as_int32(name: str, array: Any) -> jax.Array:
    """An index array (already checked to be integer) as int32, checked before the cast.

    Casting wraps: 2**32 + 4 would silently become 4. A wider array whose values are on
    the host (numpy, or a concrete array) is checked here, whatever `validate` says, since
    the check costs nothing next to the copy to the device; a traced wider array cannot be
    checked without a device round trip, so it is refused: pass int32.
    """
    dtype = np.dtype(array.dtype)
    if dtype == np.int32 or dtype.itemsize < 4:  # every value fits
        return jnp.asarray(array, jnp.int32)
    if is_tracer(array):
        raise TypeError(f"{name} must be int32 under jit (values of {dtype.name} cannot be "
                        f"checked for int32 overflow there), got dtype {dtype.name}")
    values = np.asarray(array)
    outside = np.flatnonzero((values.reshape(-1) < _INT32.min) | (values.reshape(-1) > _INT32.max))
    if outside.size:
        where = np.unravel_index(outside[0], values.shape) if values.ndim else ()
        index = "".join(f"[{i}]" for i in where)
        raise ValueError(f"{name}{index} = {values.reshape(-1)[outside[0]]} does not fit int32 "
                         f"({outside.size} value(s) outside [{_INT32.min}, {_INT32.max}])")
    return jnp.asarray(values.astype(np.int32))


def window_left_of(sliding_window: Any) -> int | None:
    """int W -> W - 1; (left, right) -> left. None -> no window.

    The right extent never matters: in both operators a key after the query position is
    already excluded (decode: j < end = p + 1; paged: causal), so only `left` is kept.
    """
    if sliding_window is None:
        return None
    if isinstance(sliding_window, (tuple, list)):
        if len(sliding_window) != 2 or not all(
            isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 0
            for v in sliding_window
        ):
            raise ValueError(
                "sliding_window as a tuple must be (left, right) with ints >= 0, "
                f"got {sliding_window!r}"
            )
        return min(int(sliding_window[0]), MAX_WINDOW_LEFT)
    if isinstance(sliding_window, (int, np.integer)) and not isinstance(sliding_window, bool):
        if sliding_window < 1:
            raise ValueError(f"sliding_window must be an int >= 1, got {sliding_window}")
        return min(int(sliding_window) - 1, MAX_WINDOW_LEFT)
    raise TypeError(
        f"sliding_window must be an int >= 1 or a (left, right) tuple, got {sliding_window!r}"
    )


def static_scalar(name: str, value: Any, default: float | None) -> float | None:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a Python float (static), got {type(value).__name__}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return float(value)


def sinks_per_head(sinks: Any, q_heads: int, kv_heads: int) -> jax.Array | None:
    """One float32 sink logit per query head, from any form the contract accepts.

    [Hq] is taken as it is; [num_sinks] (shared by every head), [Hkv, num_sinks] (per
    key/value head, read by its G query heads) and [Hq, num_sinks] reduce to the log-sum-exp
    of each head's sinks: n sinks in one softmax add sum_k exp(s_k - m) to its denominator,
    which is what one logit logsumexp(s) adds.
    """
    if sinks is None:
        return None
    layout = "[Hq], [num_sinks], [Hkv, num_sinks] or [Hq, num_sinks]"
    check_rank("sinks", sinks, (1, 2), layout)
    if not jnp.issubdtype(sinks.dtype, jnp.floating):
        raise TypeError(f"sinks must be a float array {layout}, got dtype {dtype_name(sinks)}")
    shape = tuple(sinks.shape)
    if 0 in shape:
        raise ValueError(f"sinks must hold at least one sink per head ({layout}), got shape "
                         f"{shape}; pass sinks=None for none")
    logits = jnp.asarray(sinks, jnp.float32)
    if logits.ndim == 1:
        if shape[0] == q_heads:
            return logits
        return jnp.broadcast_to(jax.nn.logsumexp(logits), (q_heads,))
    if shape[0] == q_heads:
        return jax.nn.logsumexp(logits, axis=1)
    if shape[0] == kv_heads:
        return jnp.repeat(jax.nn.logsumexp(logits, axis=1), q_heads // kv_heads)
    raise ValueError(f"sinks of rank 2 must have shape [Hkv, num_sinks] with Hkv = {kv_heads} "
                     f"or [Hq, num_sinks] with Hq = {q_heads}, got {shape}")


def features_used(window_left: int | None, soft_cap: float | None, sinks: Any) -> frozenset[str]:
    used = set()
    if window_left is not None:
        used.add("sliding_window")
    if soft_cap is not None:
        used.add("logits_soft_cap")
    if sinks is not None:
        used.add("sinks")
    return frozenset(used)


def check_head_dim(name: str, head_dim: int) -> None:
    if head_dim < 1:
        raise ValueError(f"{name} must have a head dim D >= 1, got D = {head_dim}")


def check_heads(q_heads: int, kv_heads: int, q_name: str, kv_name: str) -> None:
    if kv_heads < 1 or q_heads % kv_heads != 0:
        raise ValueError(
            f"the query heads of {q_name} ({q_heads}) must be a multiple of the key/value "
            f"heads of {kv_name} ({kv_heads})"
        )
