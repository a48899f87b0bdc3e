"""Random inputs shared by every operator's problem generator.

Values are normal (never zeros, so a kernel that skips work cannot look right by accident);
lengths are ragged, drawn from a distribution named in the sweep file.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

LENGTH_DISTRIBUTIONS = ("fixed", "uniform", "long_tail")


def draw_lengths(rng: np.random.Generator, count: int, min_len: int, max_len: int,
                 distribution: str) -> np.ndarray:
    """`count` lengths in [min_len, max_len]; uniform and long_tail include max_len once.

    long_tail: most sequences short, a few long (u**3 skews towards min_len), as in a
    serving batch where a handful of long conversations sit among many short ones.
    """
    if distribution not in LENGTH_DISTRIBUTIONS:
        raise ValueError(f"lengths must be one of {LENGTH_DISTRIBUTIONS}, got {distribution!r}")
    if not 0 <= min_len <= max_len:
        raise ValueError(f"need 0 <= min_len <= max_len, got {min_len}, {max_len}")
    if distribution == "fixed" or count == 0:
        return np.full(count, max_len, dtype=np.int32)
    u = rng.random(count)
    if distribution == "long_tail":
        u = u**3
    lengths = np.round(min_len + u * (max_len - min_len)).astype(np.int32)
    lengths[rng.integers(count)] = max_len
    return lengths


def normal(rng: np.random.Generator, shape: tuple[int, ...], dtype: str) -> jnp.ndarray:
    return jnp.asarray(rng.standard_normal(shape, dtype=np.float32), dtype=dtype)


def feature_kwargs(rng: np.random.Generator, q_heads: int, sliding_window, logits_soft_cap,
                   sinks: bool) -> dict[str, Any]:
    """The feature keywords of an operator call, sinks drawn from `rng`."""
    kwargs: dict[str, Any] = {}
    if sliding_window is not None:
        kwargs["sliding_window"] = sliding_window
    if logits_soft_cap is not None:
        kwargs["logits_soft_cap"] = logits_soft_cap
    if sinks:
        kwargs["sinks"] = jnp.asarray(rng.standard_normal(q_heads, dtype=np.float32) * 2.0)
    return kwargs


def features_of(problem: Any) -> frozenset[str]:
    """The features a problem spec uses (its sliding_window, logits_soft_cap, sinks)."""
    used = set()
    if problem.sliding_window is not None:
        used.add("sliding_window")
    if problem.logits_soft_cap is not None:
        used.add("logits_soft_cap")
    if problem.sinks:
        used.add("sinks")
    return frozenset(used)


def abstract_feature_kwargs(problem: Any) -> dict[str, Any]:
    """The feature keywords of a problem with arrays as shape/dtype structs (cross-compiling)."""
    import jax

    kwargs: dict[str, Any] = {}
    if problem.sliding_window is not None:
        kwargs["sliding_window"] = problem.sliding_window
    if problem.logits_soft_cap is not None:
        kwargs["logits_soft_cap"] = problem.logits_soft_cap
    if problem.sinks:
        kwargs["sinks"] = jax.ShapeDtypeStruct((problem.q_heads,), "float32")
    return kwargs
