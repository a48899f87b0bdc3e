"""Probe keys: inputs in which every key at a structurally risky position counts.

With unit-normal queries and keys, logits stay near +-3 and one key among L holds ~1/L of a
row's softmax, so a kernel that drops or adds one key moves that row by ~1/sqrt(L): inside a
bfloat16 rounding bound at serving lengths. Kernels go wrong at known places, so the problem
generators plant keys there whose logits hold a real share of the row's softmax:

- the row's first and last valid key and their inner neighbours; the first key before the
  range (sequence start or window edge) and the first after it (end, the causal future),
  which a correct kernel must leave out;
- both sides of the last and the first boundary inside the range of every block size a
  sweep can pick (powers of two 16..2048, and the page size), counted from position 0 and
  from the range's first key (kernels that block the window rather than the cache).

Each probe key is solved (least squares over the row's query heads of its KV head) to give
a chosen logit; the component of the key orthogonal to those queries stays random, so the
key looks like any other. Probes inside the range together hold PROBE_SHARE of the softmax,
so one of K probes moves the row by about 1/sqrt(K) of its scale (0.15 at K = 40), far past
the gate's bound, and the bulk still holds the rest (a kernel wrong on ordinary keys still
shows). Logits follow real models: a heavy-tailed temperature per query head, and with a
soft cap a shared key component that lifts logits to where tanh bends (30-60% of the cap).
Sink logits are drawn so that the sink holds 15-50% of a typical row's softmax.
"""

from __future__ import annotations

import dataclasses

import numpy as np

# The block sizes (keys per block, split or step) sweeps can pick, besides the page size.
BLOCK_SIZES = tuple(2**k for k in range(4, 12))
PROBE_SHARE = 0.5  # of each probed row's softmax, over all its inside probes
MAX_TEMPERATURE = 3.0


def head_temperatures(rng: np.random.Generator, q_heads: int) -> np.ndarray:
    """Per query head logit scale, heavy-tailed: most near 1, a few up to 3."""
    return np.minimum(np.exp(0.6 * np.abs(rng.standard_normal(q_heads))), MAX_TEMPERATURE)


def probe_positions(low: int, position: int, memory_end: int, page_size: int | None = None
                    ) -> tuple[list[int], list[int]]:
    """(inside, outside) probe positions of a row attending keys low..position, whose own
    memory holds keys 0..memory_end-1. Inside positions lie in [low, position]; outside are
    low - 1 and position + 1 where they exist."""
    inside = {low, low + 1, position - 1, position}
    sizes = BLOCK_SIZES + ((page_size,) if page_size else ())
    for size in sizes:
        for origin in (0, low):
            first = origin + ((low - origin) // size + 1) * size
            last = origin + ((position - origin) // size) * size
            for boundary in (first, last):
                if low < boundary <= position:
                    inside.update((boundary - 1, boundary))
    inside = sorted(j for j in inside if low <= j <= position)
    outside = [j for j in (low - 1, position + 1) if 0 <= j < memory_end]
    return inside, outside


@dataclasses.dataclass
class ProbedRow:
    """One row to plant probes for: its queries [Hq, D] and the positions it attends."""

    queries: np.ndarray
    low: int
    position: int
    memory_end: int


def _soft_cap(logits, cap):
    return logits if cap is None else cap * np.tanh(logits / cap)


def _uncap(logits, cap):
    if cap is None:
        return logits
    return cap * np.arctanh(np.clip(logits / cap, -0.95, 0.95))


def _solve_keys(rng, queries: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Keys k [n, D] with queries @ k = targets [n, rows] exactly (least norm) plus a random
    component orthogonal to the queries, so each key's norm is that of a normal key."""
    pinv = np.linalg.pinv(queries)  # [D, rows]
    noise = rng.standard_normal((targets.shape[0], queries.shape[1])).astype(np.float32)
    noise -= (noise @ queries.T) @ pinv.T
    return (targets @ pinv.T + noise).astype(np.float32)


def plant(rng: np.random.Generator, rows_of_sequence: list[list[ProbedRow]], read_keys,
          write_keys, *, kv_heads: int, softmax_scale: float, soft_cap: float | None,
          page_size: int | None = None) -> list[tuple[int, int, np.ndarray]]:
    """Plants probe keys for every listed row; returns (sequence, KV head, log of the row's
    softmax denominator per head of the group) for each probed row (for drawing sinks).

    rows_of_sequence: per sequence, the rows to probe (rows of one sequence share its keys).
    read_keys(seq, g) -> float32 [L, D] keys of KV head g in logical order (a view or copy);
    write_keys(seq, g, positions, keys) stores keys at those positions.
    """
    log_totals = []
    for seq, rows in enumerate(rows_of_sequence):
        if not rows:
            continue
        q_heads = rows[0].queries.shape[0]
        group = q_heads // kv_heads
        for g in range(kv_heads):
            heads = slice(g * group, (g + 1) * group)
            keys = read_keys(seq, g)
            if soft_cap is not None:
                # Lift every logit of the last probed row to 30-60% of the cap, where tanh bends.
                last = rows[-1].queries[heads] * softmax_scale
                lift = rng.uniform(0.3, 0.6, group) * soft_cap
                keys = keys + (np.linalg.pinv(last) @ lift)[None].astype(np.float32)
                write_keys(seq, g, np.arange(len(keys)), keys)
            constraints: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
            for row in rows:
                queries = row.queries[heads] * softmax_scale  # [G, D]
                inside, outside = probe_positions(row.low, row.position, row.memory_end,
                                                  page_size)
                bulk = np.ones(row.position + 1 - row.low, bool)
                bulk[np.asarray(inside) - row.low] = False
                logits = _soft_cap(keys[row.low:row.position + 1] @ queries.T, soft_cap)
                logits = logits[bulk] if bulk.any() else logits
                peak = logits.max(axis=0)
                log_bulk = peak + np.log(np.exp(logits - peak).sum(axis=0))  # [G]
                # K inside probes share PROBE_SHARE: each one e^t = Z_bulk * share / (1-share) / K.
                target = log_bulk + np.log(PROBE_SHARE / (1 - PROBE_SHARE) / len(inside))
                log_totals.append((seq, g, log_bulk - np.log(1 - PROBE_SHARE)))
                for j in inside + outside:
                    wobble = rng.uniform(-0.3, 0.3, group)
                    constraints.setdefault(j, []).append(
                        (queries, _uncap(target + wobble, soft_cap)))
            positions = np.asarray(sorted(constraints))
            solved = np.empty((len(positions), keys.shape[1]), np.float32)
            for index, j in enumerate(positions):
                queries = np.concatenate([q for q, _ in constraints[j]])
                targets = np.concatenate([t for _, t in constraints[j]])
                solved[index] = _solve_keys(rng, queries, targets[None])[0]
            write_keys(seq, g, positions, solved)
    return log_totals


def draw_sinks(rng: np.random.Generator, log_totals, q_heads: int, kv_heads: int) -> np.ndarray:
    """Sink logits [Hq] holding 15-50% of a typical probed row's softmax for each head."""
    group = q_heads // kv_heads
    per_head = [[] for _ in range(q_heads)]
    for _, g, log_total in log_totals:
        for k, value in enumerate(log_total):
            per_head[g * group + k].append(value)
    share = rng.uniform(0.15, 0.5, q_heads)
    typical = np.array([np.median(v) if v else 0.0 for v in per_head])
    return (typical + np.log(share / (1 - share))).astype(np.float32)
