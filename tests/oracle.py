"""An independent float64 NumPy statement of docs/semantics.md, written loop by loop.

It shares no code with attnbench.kernels.reference, so the two can only agree by both
following the contract.
"""

from __future__ import annotations

import numpy as np


def _attend(q, keys, values, scale, cap, sink):
    """One query row against its valid keys (rows of keys/values). Returns [D] float64."""
    if len(keys) == 0 and sink is None:
        return np.zeros(q.shape[-1])
    logits = keys @ q * scale
    if cap is not None:
        logits = cap * np.tanh(logits / cap)
    top = max(logits.max(initial=-np.inf), -np.inf if sink is None else sink)
    weights = np.exp(logits - top)
    total = weights.sum() + (0.0 if sink is None else np.exp(sink - top))
    if len(keys) == 0:
        return np.zeros(q.shape[-1])
    return weights @ values / total


def _window_left(window):
    if window is None:
        return None
    if isinstance(window, tuple):
        return window[0]
    return window - 1


def decode(query, key, value, start, end, *, softmax_scale=None, sliding_window=None,
           logits_soft_cap=None, sinks=None):
    q = np.asarray(query, np.float64)
    if q.ndim == 4:
        q = q[:, 0]
    k = np.asarray(key, np.float64)
    v = np.asarray(value, np.float64)
    batch, q_heads, dim = q.shape
    kv_heads = k.shape[2]
    group = q_heads // kv_heads
    scale = dim**-0.5 if softmax_scale is None else softmax_scale
    left = _window_left(sliding_window)
    out = np.zeros((batch, q_heads, dim))
    for b in range(batch):
        p = int(end[b]) - 1
        keep = [j for j in range(int(start[b]), int(end[b])) if left is None or j >= p - left]
        for h in range(q_heads):
            sink = None if sinks is None else float(np.asarray(sinks, np.float64)[h])
            out[b, h] = _attend(q[b, h], k[b, keep, h // group], v[b, keep, h // group],
                                scale, logits_soft_cap, sink)
    return out


def paged(queries, kv_pages, context_lens, page_table, query_start_loc, num_seqs, *,
          softmax_scale=None, sliding_window=None, logits_soft_cap=None, sinks=None):
    q = np.asarray(queries, np.float64)
    pages = np.asarray(kv_pages, np.float64)
    table = np.asarray(page_table)
    qsl = np.asarray(query_start_loc)
    ctx = np.asarray(context_lens)
    num_tokens, q_heads, dim = q.shape
    page_size = pages.shape[1]
    kv_heads = pages.shape[2] // 2
    group = q_heads // kv_heads
    scale = dim**-0.5 if softmax_scale is None else softmax_scale
    left = _window_left(sliding_window)
    out = np.zeros((num_tokens, q_heads, dim))
    for i in range(int(np.asarray(num_seqs).reshape(()))):
        q_len = int(qsl[i + 1] - qsl[i])
        context = int(ctx[i])
        rows = [pages[table[i, j // page_size], j % page_size] for j in range(context)]
        for r in range(q_len):
            t = int(qsl[i]) + r
            p = context - q_len + r
            keep = [j for j in range(context) if j <= p and (left is None or j >= p - left)]
            for h in range(q_heads):
                g = h // group
                keys = np.array([rows[j][2 * g] for j in keep]).reshape(len(keep), dim)
                values = np.array([rows[j][2 * g + 1] for j in keep]).reshape(len(keep), dim)
                sink = None if sinks is None else float(np.asarray(sinks, np.float64)[h])
                out[t, h] = _attend(q[t, h], keys, values, scale, logits_soft_cap, sink)
    return out
