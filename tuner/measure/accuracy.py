"""How a kernel's output is judged against the float32 reference: one verdict per call,
decided by its worst (row, query head).

The measure. For each output row r (a decode sequence, a paged query token) and query head h,
the row error is

    e[r, h] = rms_D(out[r, h] - ref[r, h]) / rms_D(ref[r, h])

(rows whose reference is all zeros, i.e. rows with no valid key, are measured against the
whole output's rms instead). A whole-output norm would dilute one bad row among B (or T) by
sqrt(B), and one wrong key among L by about 1/sqrt(L); per row, one wrong key that holds a
share w of the row's softmax moves e by about w / ||p||_2 (p: the row's softmax weights),
which the generators' probe keys make large (kernels/probes.py). The worst e decides; the
whole-output relative Frobenius error is still recorded.

Why rms(ref[r, h]) is the scale a correct kernel's error follows. Values are independent
across keys (the generators draw them so), so ||o||_rms ~ sigma_v * ||p||_2 / ||p||_1, where
sigma_v is the values' rms. A correct kernel differs from the reference only by rounding:

- the output rounded to its dtype: at most u * |o| per element -> at most u in e;
- P (the softmax weights) rounded to the value dtype before P @ V, as fast kernels do: each
  weight gets an independent relative error uniform in [-u, u] (std u / sqrt(3)), so the
  output moves by u / sqrt(3) * sigma_v * ||p||_2 / ||p||_1 -> u / sqrt(3) in e;
- float32 accumulation (logits over D, sums over up to 2**15 keys, the online-softmax
  rescaling): relative errors ~ eps32 * sqrt(n) each, and a logit error ds moves e by at most
  ds; logits reach ~64 here (probes, soft-capped heads), so ds <= eps32 * 64 * sqrt(256)
  dominates these -> ACCUMULATION_ERROR in e.

u is the dtype's unit roundoff (2**-9 bfloat16, 2**-11 float16, 2**-24 float32). Their sum is
the expected error of a correct kernel; the bound is SAFETY times it, for the worst of
thousands of (row, head) pairs (the ratio rms(ref) / (sigma_v ||p||_2) itself fluctuates by
~10% at D = 64). That gives 1.3e-2 for bfloat16, 3.3e-3 for float16, 2.4e-4 for float32.

NaN or Inf anywhere fails. Rows the contract requires to be zero (padding) must be exactly 0.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import threadpoolctl

UNIT_ROUNDOFF = {"float32": 2.0**-24, "float16": 2.0**-11, "bfloat16": 2.0**-9}
# float32 arithmetic inside any kernel, whatever the input dtype (see the docstring).
ACCUMULATION_ERROR = 2.0**-24 * 64 * math.sqrt(256)
SAFETY = 4.0
# A row whose reference is far smaller than the output's rms (a sink holding nearly all of
# its softmax) is measured against this share of that rms, so its float32 noise is not
# magnified into a false alarm.
SMALL_ROW_FLOOR = 1e-3


def row_error_bound(dtype: str) -> float:
    """The bound on a correct kernel's worst row error for inputs of `dtype`."""
    u = UNIT_ROUNDOFF[dtype]
    return SAFETY * (u + u / math.sqrt(3.0) + ACCUMULATION_ERROR)


# The bound per dtype; a sweep file's `tolerances` replace these.
RELATIVE_ERROR_BOUND = {dtype: row_error_bound(dtype) for dtype in UNIT_ROUNDOFF}


@dataclasses.dataclass(frozen=True)
class Verdict:
    ok: bool
    row_error: float  # the worst (row, head) error; inf for NaN/Inf or a wrong shape
    relative_error: float  # whole-output relative Frobenius error
    max_abs_error: float
    reason: str  # empty when ok; otherwise names the row, head and key positions
    row: int | None = None  # the worst row and head (None when not per-row)
    head: int | None = None


def judge(output, reference, dtype: str, tolerance: float | None = None, *,
          zero_rows=None, key_ranges=None) -> Verdict:
    """Judges `output` against `reference` ([rows, ..., heads, D], any array types).

    tolerance: the bound on the worst row error (default: the derived bound for `dtype`).
    zero_rows: bool mask over rows that must be exactly zero (padding), or None.
    key_ranges: int [rows, 2], each row's valid key positions [first, end), or None; only
    used to say where a failing row looks.
    """
    # On one BLAS thread: a BLAS pool spins for a while after a parallel call, and a
    # judge runs just before its config is timed, so the spinning threads would take the
    # cores of a multi-threaded CPU kernel (it ran a two-thread kernel at half speed).
    with threadpoolctl.threadpool_limits(limits=1, user_api="blas"):
        return _judge(output, reference, dtype, tolerance, zero_rows, key_ranges)


def _judge(output, reference, dtype: str, tolerance: float | None, zero_rows,
           key_ranges) -> Verdict:
    bound = RELATIVE_ERROR_BOUND[dtype] if tolerance is None else tolerance
    out = np.asarray(output, dtype=np.float64)
    ref = np.asarray(reference, dtype=np.float64)
    if out.shape != ref.shape:
        return Verdict(False, math.inf, math.inf, math.inf,
                       f"output shape {out.shape} != reference shape {ref.shape}")
    if out.ndim < 2:
        out, ref = out.reshape(1, 1, -1), ref.reshape(1, 1, -1)
    rows = out.shape[0]
    out = out.reshape(rows, -1, out.shape[-1])
    ref = ref.reshape(rows, -1, ref.shape[-1])
    where = _Where(key_ranges, out.shape[1])
    finite = np.isfinite(out).all(axis=-1)
    if not finite.all():
        row, head = np.argwhere(~finite)[0]
        bad = int(out.size - np.count_nonzero(np.isfinite(out)))
        return Verdict(False, math.inf, math.inf, math.inf,
                       f"{bad} output values are NaN or Inf, first at {where(row, head)}",
                       int(row), int(head))
    difference = out - ref
    max_abs = float(np.max(np.abs(difference))) if difference.size else 0.0
    ref_norm = float(np.linalg.norm(ref))
    diff_norm = float(np.linalg.norm(difference))
    relative = diff_norm / ref_norm if ref_norm > 0 else (0.0 if diff_norm == 0 else math.inf)
    if zero_rows is not None:
        zero_rows = np.asarray(zero_rows, bool)
        nonzero = zero_rows & np.any(out != 0, axis=(1, 2))
        if nonzero.any():
            row = int(np.flatnonzero(nonzero)[0])
            return Verdict(False, math.inf, relative, max_abs,
                           f"padding rows are not exactly zero ({int(nonzero.sum())} rows, "
                           f"first: row {row})", row, None)
    if out.size == 0:
        return Verdict(True, 0.0, 0.0, 0.0, "")
    row_scale = np.sqrt(np.mean(ref**2, axis=-1))
    overall = math.sqrt(float(np.mean(ref**2)))
    # Empty rows (all-zero reference) fall back to the whole output's scale.
    scale = np.maximum(row_scale, SMALL_ROW_FLOOR * overall)
    row_rms = np.sqrt(np.mean(difference**2, axis=-1))
    with np.errstate(divide="ignore", invalid="ignore"):
        errors = np.where(row_rms == 0, 0.0, row_rms / np.where(scale > 0, scale, 1.0))
    errors = np.where((scale == 0) & (row_rms > 0), math.inf, errors)
    row, head = np.unravel_index(int(np.argmax(errors)), errors.shape)
    worst = float(errors[row, head])
    if worst > bound:
        over = int(np.count_nonzero(errors > bound))
        return Verdict(False, worst, relative, max_abs,
                       f"row error {worst:.3g} > bound {bound:.3g} for {dtype} at "
                       f"{where(row, head)}; {over} of {errors.size} (row, head) over",
                       int(row), int(head))
    return Verdict(True, worst, relative, max_abs, "", int(row), int(head))


class _Where:
    """Names an output (row, head) and, when known, the key positions it attends."""

    def __init__(self, key_ranges, heads: int):
        self.ranges = None if key_ranges is None else np.asarray(key_ranges)
        self.heads = heads

    def __call__(self, row, head) -> str:
        text = f"row {int(row)} head {int(head)}"
        if self.ranges is not None and 0 <= row < len(self.ranges):
            first, end = (int(v) for v in self.ranges[row][:2])
            text += f" (keys {first}..{end - 1})" if end > first else " (no valid key)"
        return text


def extras_problems(operator, extras, reference_extras) -> list[str]:
    """Why a call's extra outputs (an updated cache) differ from the reference's: they
    must be equal bit for bit (NaN where the reference has the same NaN)."""
    problems = []
    for name, got, want in zip(operator.extra_names(), extras, reference_extras):
        got, want = np.asarray(got), np.asarray(want)
        if got.shape != want.shape or got.dtype != want.dtype:
            problems.append(f"{name}: {got.dtype}{list(got.shape)} != reference "
                            f"{want.dtype}{list(want.shape)}")
            continue
        differ = got.view(np.uint8).reshape(got.shape + (-1,)) != want.view(np.uint8).reshape(
            want.shape + (-1,))
        differ = differ.any(axis=-1)
        if differ.any():
            first = tuple(int(i) for i in np.argwhere(differ)[0])
            problems.append(f"{name}: {int(differ.sum())} elements differ from the reference's "
                            f"bit for bit, first at {list(first)}")
    return problems
