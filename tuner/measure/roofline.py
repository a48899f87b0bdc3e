"""The floors: the least time an attention call can take on this machine.

Decode and paged decode are memory-bound: each valid key/value row must be read once. The
memory floor is those bytes (plus queries and outputs; each operator object counts them)
over the read bandwidth, which is measured here with a large reduction over a buffer several
times the last-level cache. Batches with prefill chunks are compute-bound: their compute
floor is the time an XLA matmul of the same flops takes (each operator object counts the
flops of the valid logits and weighted values).
"""

from __future__ import annotations

import functools
import glob
import time

import jax
import jax.numpy as jnp


def last_level_cache_bytes() -> int:
    """The largest CPU cache reported by sysfs (32 MiB when none is reported)."""
    sizes = []
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        text = open(path).read().strip()
        multiplier = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1], 1)
        sizes.append(int(text.rstrip("KMG")) * multiplier)
    return max(sizes, default=32 << 20)


@functools.lru_cache(maxsize=1)
def read_bandwidth() -> float:
    """Bytes per second that one reduction reads from memory on the default device.

    The buffer is at least 8x the last-level cache (and at least 512 MiB) so the figure is
    DRAM bandwidth, not cache bandwidth; the best of several runs is kept, as the floor
    must be a bound that a kernel could reach.
    """
    size = max(8 * last_level_cache_bytes(), 512 << 20)
    buffer = jnp.ones((size // 4,), jnp.float32)
    total = jax.jit(jnp.sum).lower(buffer).compile()
    jax.block_until_ready(total(buffer))
    best = float("inf")
    for _ in range(5):
        began = time.perf_counter()
        jax.block_until_ready(total(buffer))
        best = min(best, time.perf_counter() - began)
    del buffer
    return size / best


def bytes_moved(op: str, args: tuple, kwargs: dict) -> int:
    """Bytes a call of `op` must move at least (its operator object counts them)."""
    from attnbench.kernels.registry import get_operator

    return get_operator(op).bytes_moved(args, kwargs)


def flops(op: str, args: tuple, kwargs: dict) -> int:
    """Flops of the valid logits and weighted values of a call of `op` (its operator object
    counts them)."""
    from attnbench.kernels.registry import get_operator

    return get_operator(op).flops(args, kwargs)


def floor_us(num_bytes: int, bandwidth: float) -> float:
    return num_bytes / bandwidth * 1e6


# The largest square matmul timed for the compute floor (three 4096^2 operands: 128 MiB in
# float32); bigger calls are scaled from its rate.
_MATMUL_SIDE_LIMIT = 4096


@functools.lru_cache(maxsize=16)
def matmul_rate(flop_count: int, dtype: str) -> float:
    """Flops per second of an XLA matmul of about `flop_count` on the default device: square,
    in `dtype` and in float32 (float32 sums), the faster of the two and the best of five runs,
    as the floor must be a rate a kernel could reach (any kernel may widen to float32)."""
    side = round((max(flop_count, 1) / 2) ** (1 / 3) / 64) * 64
    side = min(max(side, 64), _MATMUL_SIDE_LIMIT)
    product = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=jnp.float32))
    best = 0.0
    for name in dict.fromkeys((dtype, "float32")):
        a = jnp.ones((side, side), name)
        compiled = product.lower(a, a).compile()
        jax.block_until_ready(compiled(a, a))
        for _ in range(5):
            began = time.perf_counter()
            jax.block_until_ready(compiled(a, a))
            best = max(best, 2 * side**3 / (time.perf_counter() - began))
    return best


def compute_floor_us(flop_count: int, dtype: str) -> float:
    """Microseconds an XLA matmul of `flop_count` takes here (see matmul_rate)."""
    return flop_count / matmul_rate(flop_count, dtype) * 1e6
