"""How a kernel's output is judged against the float32 reference.

The measure is the relative Frobenius error ||out - ref|| / ||ref|| in float64, with one
bound per input dtype. NaN or Inf anywhere fails, whatever the error says.
"""

from __future__ import annotations

import dataclasses

import numpy as np

# Bounds on the relative Frobenius error. bfloat16 keeps 8 bits of mantissa (~4e-3 per
# rounding); the kernels round P (the softmax weights) to the value dtype before P @ V,
# which adds about as much again, so 2e-2 leaves room without letting a wrong mask pass
# (a single dropped or extra key moves the error far above it on random inputs).
RELATIVE_ERROR_BOUND = {"float32": 1e-4, "float16": 5e-3, "bfloat16": 2e-2}


@dataclasses.dataclass(frozen=True)
class Accuracy:
    ok: bool
    relative_error: float  # inf when the output has NaN/Inf or the wrong shape
    max_abs_error: float
    reason: str  # empty when ok


def compare(output, reference, dtype: str, bound: float | None = None) -> Accuracy:
    """Judges `output` against `reference` (any array types of equal shape)."""
    bound = RELATIVE_ERROR_BOUND[dtype] if bound is None else bound
    out = np.asarray(output, dtype=np.float64)
    ref = np.asarray(reference, dtype=np.float64)
    if out.shape != ref.shape:
        return Accuracy(False, float("inf"), float("inf"),
                        f"output shape {out.shape} != reference shape {ref.shape}")
    if not np.all(np.isfinite(out)):
        bad = int(np.size(out) - np.count_nonzero(np.isfinite(out)))
        return Accuracy(False, float("inf"), float("inf"), f"{bad} output values are NaN or Inf")
    difference = out - ref
    max_abs = float(np.max(np.abs(difference))) if difference.size else 0.0
    ref_norm = float(np.linalg.norm(ref))
    diff_norm = float(np.linalg.norm(difference))
    # An all-zero reference (every row empty) must be matched exactly up to rounding.
    relative = diff_norm / ref_norm if ref_norm > 0 else (0.0 if diff_norm < 1e-6 else float("inf"))
    if relative > bound:
        return Accuracy(False, relative, max_abs,
                        f"relative error {relative:.3g} > bound {bound:.3g} for {dtype}")
    return Accuracy(True, relative, max_abs, "")
