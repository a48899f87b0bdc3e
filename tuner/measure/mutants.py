"""Deliberately wrong kernels: the gate's own test. Each is the float32 reference with one
bug in one row (or one page-table entry), of the kinds that serving kernels really have:

- one key dropped or added at a boundary: the newest key, the oldest, one past the end, one
  before the range (start or window edge), both sides of the last block boundary of every
  block size a sweep can pick and of the page size (a page's last key);
- window, soft cap, sinks, GQA head mapping, causal diagonal wrong in one row;
- one page-table entry off by one (every row of that sequence reads a neighbouring page).

A row is recomputed by :func:`row_attention` (the contract's formula, in float32 NumPy, with
an explicit mask) and spliced into the reference output, cast to the problem's dtype as a
kernel's output is; the page-table mutant runs the reference on the edited table. The gate
must flag every one (`attnbench selftest`, tests/test_gate.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from attnbench.kernels.inputs import window_left_of
from attnbench.kernels.operator import AttentionRow
from attnbench.kernels.probes import BLOCK_SIZES
from attnbench.kernels.registry import get_operator


@dataclasses.dataclass(frozen=True)
class Mutant:
    kind: str  # the bug class, e.g. "newest key dropped"
    detail: str  # where: row and position
    output: np.ndarray


def row_attention(queries, keys, values, valid, scale, soft_cap, sinks, kv_of_head):
    """One row of attention by the contract: queries [Hq, D], keys/values [L, Hkv, D],
    valid bool [L]; kv_of_head int [Hq] (query head h reads kv head kv_of_head[h])."""
    q = np.asarray(queries, np.float32)
    k = np.asarray(keys, np.float32)[:, kv_of_head]  # [L, Hq, D]
    v = np.asarray(values, np.float32)[:, kv_of_head]
    logits = np.einsum("hd,lhd->hl", q, k) * scale
    if soft_cap is not None:
        logits = soft_cap * np.tanh(logits / soft_cap)
    logits = np.where(valid[None], logits, -np.inf)
    peak = logits.max(axis=1)
    if sinks is not None:
        peak = np.maximum(peak, sinks)
    peak = np.where(np.isfinite(peak), peak, 0.0)
    weights = np.exp(logits - peak[:, None])
    denominator = weights.sum(axis=1)
    if sinks is not None:
        denominator = denominator + np.exp(sinks - peak)
    out = np.einsum("hl,lhd->hd", weights, v)
    return np.where(denominator[:, None] > 0, out / np.where(denominator > 0, denominator,
                                                                1.0)[:, None], 0.0)


def mutants(problem, args, kwargs, reference) -> Iterator[Mutant]:
    """Every mutant that applies to this problem, on these inputs (`reference`: the float32
    reference output on them)."""
    operator = get_operator(problem.op)
    prepared, _ = operator.prepare(*args, **kwargs)
    dtype = jnp.dtype(args[0].dtype)
    base = np.asarray(jnp.asarray(reference).astype(dtype).astype(jnp.float32))
    scale = prepared.softmax_scale
    cap = prepared.logits_soft_cap
    sinks = None if prepared.sinks is None else np.asarray(prepared.sinks)
    _, shape = operator.prepare(*args, **kwargs)
    heads = np.arange(shape.q_heads) // shape.group_size
    kv_heads = shape.kv_heads
    rows = operator.attention_rows(args, kwargs)
    longest = max((r for r in rows if not r.first_of_chunk), key=lambda r: r.position - r.low)

    def spliced(row: AttentionRow, kind: str, detail: str, valid=None, soft_cap=cap, row_sinks=sinks,
                kv_of_head=heads) -> Mutant:
        if valid is None:
            valid = _range_mask(row)
        out = row_attention(row.queries, row.keys, row.values, valid, scale, soft_cap,
                            row_sinks, kv_of_head)
        mutated = base.copy()
        mutated[row.index] = np.asarray(jnp.asarray(out, jnp.float32).astype(dtype), np.float32)
        return Mutant(kind, f"row {row.index} {detail}", mutated)

    def edited(row: AttentionRow, kind: str, j: int, include: bool) -> Mutant | None:
        if not 0 <= j < len(row.keys):
            return None
        valid = _range_mask(row)
        if valid[j] == include:
            return None
        valid[j] = include
        return spliced(row, kind, f"key {j}", valid)

    row = longest
    candidates = [
        edited(row, "newest key dropped", row.position, False),
        edited(row, "oldest key dropped", row.low, False),
        edited(row, "key past the end added", row.position + 1, True),
        edited(row, "key before the range added", row.low - 1, True),
    ]
    units = operator.boundary_sizes(args)
    for size in sorted(set(BLOCK_SIZES) | set(units)):
        boundary = (row.position // size) * size
        if row.low < boundary <= row.position:
            what = units.get(size, "block")
            candidates.append(edited(row, f"first key of a {what} dropped (size {size})",
                                     boundary, False))
            candidates.append(edited(row, f"last key of a {what} dropped (size {size})",
                                     boundary - 1, False))
    window_left = window_left_of(kwargs.get("sliding_window"))
    if window_left is not None:
        windowed = max(rows, key=lambda r: r.position - window_left - r.low)
        if windowed.position - window_left >= 1 and windowed.low > 0:
            candidates.append(edited(windowed, "window one too long", windowed.low - 1, True))
            candidates.append(edited(windowed, "window one too short", windowed.low, False))
    if cap is not None:
        candidates.append(spliced(row, "soft cap ignored", "", soft_cap=None))
    if sinks is not None:
        candidates.append(spliced(row, "sinks ignored", "", row_sinks=None))
    if kv_heads > 1:
        candidates.append(spliced(row, "GQA head mapping shifted", "",
                                  kv_of_head=(heads + 1) % kv_heads))
    for first in (r for r in rows if r.first_of_chunk):
        candidates.append(edited(first, "causal: future key seen", first.position + 1, True))
        candidates.append(edited(first, "causal: own key dropped", first.position, False))
        break
    candidates.append(_page_entry_off_by_one(operator, args, kwargs, longest, dtype))
    yield from (c for c in candidates if c is not None)


def _range_mask(row: AttentionRow) -> np.ndarray:
    valid = np.zeros(len(row.keys), bool)
    valid[row.low:row.position + 1] = True
    return valid


def _page_entry_off_by_one(operator, args, kwargs, row: AttentionRow, dtype) -> Mutant | None:
    """The longest row's sequence reads its second-to-last page (or its only one) from the
    next page index: a table off by one in one entry (operators with a page table only)."""
    units = operator.boundary_sizes(args)
    page_size = next((size for size, name in units.items() if name == "page"), None)
    if page_size is None:
        return None
    page = max(row.position // page_size - 1, 0)
    edited_args = operator.with_page_moved(args, row.sequence, page)
    if edited_args is None:
        return None
    out = jax.jit(lambda *a: operator.function(*a, variant="reference", **kwargs))(*edited_args)
    return Mutant("page-table entry off by one", f"sequence {row.sequence} page {page}",
                  np.asarray(jnp.asarray(out).astype(dtype).astype(jnp.float32)))


@dataclasses.dataclass(frozen=True)
class Catch:
    kind: str
    detail: str
    caught: bool
    reason: str  # the gate's verdict on the mutant


class _AsOperator:
    """A problem read as one of another operator (its fields, another `op`)."""

    def __init__(self, problem, op: str):
        self._problem, self.op = problem, op

    def __getattr__(self, name):
        return getattr(self._problem, name)


def reference_output(problem, args, kwargs) -> np.ndarray:
    """The float32 reference output, as the sweep's worker computes it."""
    operator = get_operator(problem.op)

    def call(*arrays):
        prepared, _ = operator.prepare(*arrays, **kwargs)
        return operator.reference.kernel(prepared, None)

    return np.asarray(operator.split_result(jax.jit(call)(*args))[0])


def run_mutants(problem, seed: int = 0) -> list[Catch]:
    """Judges every mutant of `problem` on its inputs of `seed`, as the sweep judges."""
    from .accuracy import judge

    args, kwargs = problem.make_inputs(seed)
    # An operator with side outputs (a cache it writes) is mutated through the plain
    # operator that computes its attention output on equivalent inputs.
    op, args, kwargs = get_operator(problem.op).plain_attention_inputs(args, kwargs)
    if op != problem.op:
        problem = _AsOperator(problem, op)
    operator = get_operator(op)
    reference = reference_output(problem, args, kwargs)
    zero_rows, key_ranges = operator.zero_rows(args), operator.key_ranges(args, kwargs)
    catches = []
    for mutant in mutants(problem, args, kwargs, reference):
        verdict = judge(mutant.output, reference, problem.dtype, zero_rows=zero_rows,
                        key_ranges=key_ranges)
        catches.append(Catch(mutant.kind, mutant.detail, not verdict.ok,
                             verdict.reason or f"passed (row error {verdict.row_error:.2g})"))
    return catches
