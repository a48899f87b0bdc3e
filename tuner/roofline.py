"""The memory floor: the least time an attention call can take on this machine.

Decode and paged attention are memory-bound: each valid key/value row must be read once.
The floor is those bytes (plus queries and outputs) over the read bandwidth, which is
measured here with a large reduction over a buffer several times the last-level cache.
"""

from __future__ import annotations

import functools
import glob
import time

import jax
import jax.numpy as jnp
import numpy as np

from attnbench.kernels.inputs import window_left_of


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


def _itemsize(array) -> int:
    return jnp.dtype(array.dtype).itemsize


def decode_bytes(args: tuple, kwargs: dict) -> int:
    """Bytes decode_attention must move: valid key/value rows, queries and outputs.

    args as decode_attention takes them (query, key, value, sequence_start, sequence_end).
    """
    query, key, _, start, end = args[:5]
    _, max_len, kv_heads, head_dim = key.shape
    end = np.clip(np.asarray(end), 0, max_len)
    low = np.clip(np.asarray(start), 0, max_len)
    window_left = window_left_of(kwargs.get("sliding_window"))
    if window_left is not None:
        low = np.maximum(low, end - 1 - window_left)
    rows = int(np.maximum(end - low, 0).sum())
    kv_bytes = rows * kv_heads * head_dim * 2 * _itemsize(key)
    return kv_bytes + 2 * query.size * _itemsize(query)


def paged_bytes(args: tuple, kwargs: dict) -> int:
    """Bytes ragged_paged_attention must move (args as the operator takes them)."""
    queries, kv_pages, context_lens, _, query_start_loc, num_seqs = args[:6]
    head_dim = kv_pages.shape[-1]
    kv_heads = kv_pages.shape[2] // 2
    contexts = np.asarray(context_lens)
    starts = np.asarray(query_start_loc)
    active = int(np.asarray(num_seqs).reshape(()))
    window_left = window_left_of(kwargs.get("sliding_window"))
    rows = 0
    for i in range(active):
        context = int(contexts[i])
        first_query = context - int(starts[i + 1] - starts[i])
        low = 0 if window_left is None else max(0, first_query - window_left)
        rows += max(context - low, 0)
    kv_bytes = rows * kv_heads * head_dim * 2 * _itemsize(kv_pages)
    return kv_bytes + 2 * queries.size * _itemsize(queries)


def bytes_moved(op: str, args: tuple, kwargs: dict) -> int:
    return {"decode": decode_bytes, "paged": paged_bytes}[op](args, kwargs)


def floor_us(num_bytes: int, bandwidth: float) -> float:
    return num_bytes / bandwidth * 1e6
