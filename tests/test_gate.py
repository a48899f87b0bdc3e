"""The correctness gate: deliberately wrong kernels are flagged, correct ones are not.

Mutants (tuner/measure/mutants.py) run on shrunk versions of every problem kind of every
shipped sweep file; the correct variants run on the same inputs in every dtype.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from attnbench.kernels.registry import get_operator, variants
from attnbench.tuner.measure.accuracy import RELATIVE_ERROR_BOUND, judge
from attnbench.tuner.measure.mutants import reference_output, run_mutants
from attnbench.tuner.plan.sweep_file import load_sweep, sweeps_dir


def _small(problem):
    """The problem's kind (features, GQA shape, lengths, prefill, page size) at a small size."""
    q_heads = min(problem.q_heads, 8)
    kv_heads = max(1, q_heads * problem.kv_heads // problem.q_heads)
    window = problem.sliding_window
    fields = dict(q_heads=q_heads, kv_heads=kv_heads, head_dim=64, max_len=min(problem.max_len, 700),
                  min_len=min(problem.min_len, 100),
                  sliding_window=None if window is None else min(window, 200))
    if problem.op == "decode":
        fields["batch"] = min(problem.batch, 3)
    else:
        fields.update(num_seqs=min(problem.num_seqs, 4), prefill_chunk=min(problem.prefill_chunk, 48))
        if problem.prefill_fraction:
            fields["prefill_fraction"] = 0.5
    return dataclasses.replace(problem, **fields)


def _kinds():
    kinds = {}
    for path in sorted(sweeps_dir().glob("*.yaml")):
        for item in load_sweep(path).problems:
            small = _small(item.problem)
            kinds.setdefault(small, f"{path.stem}: {item.label}")
    return kinds


KINDS = _kinds()


def test_every_shipped_problem_kind_is_covered():
    ops = {p.op for p in KINDS}
    features = {(p.sliding_window is not None, p.logits_soft_cap is not None, p.sinks)
                for p in KINDS}
    assert ops == {"decode", "paged"}
    assert len(features) >= 4 and len(KINDS) >= 10


@pytest.mark.parametrize("problem", list(KINDS), ids=list(KINDS.values()))
def test_every_mutant_is_flagged_wrong(problem):
    catches = run_mutants(problem, seed=1)
    missed = [f"{c.kind} [{c.detail}]: {c.reason}" for c in catches if not c.caught]
    assert not missed, "\n".join(missed)
    kinds = {c.kind.split(" (size")[0] for c in catches}
    assert {"newest key dropped", "oldest key dropped"} <= kinds
    if problem.kv_heads > 1:
        assert "GQA head mapping shifted" in kinds
    if problem.sinks:
        assert "sinks ignored" in kinds
    if problem.logits_soft_cap is not None:
        assert "soft cap ignored" in kinds
    if problem.sliding_window is not None:
        assert "window one too long" in kinds
    if problem.op == "paged":
        assert "page-table entry off by one" in kinds
        if problem.prefill_fraction:
            assert "causal: future key seen" in kinds


FALSE_ALARM_KINDS = sorted({dataclasses.replace(p, dtype="bfloat16") for p in KINDS},
                           key=repr)[::2]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_correct_variants_pass_on_the_probed_inputs(dtype):
    """The XLA variants (default config and small blocks) pass wherever mutants fail."""
    for index, base in enumerate(FALSE_ALARM_KINDS):
        problem = dataclasses.replace(base, dtype=dtype)
        operator = get_operator(problem.op)
        args, kwargs = problem.make_inputs(index)
        reference = reference_output(problem, args, kwargs)
        shape = problem.shape(index)
        for variant in variants(problem.op):
            if "cpu" not in variant.platforms or variant.name == "reference":
                continue
            config = variant.default_config(shape).to_dict()
            call = jax.jit(lambda *a, v=variant.name, c=config: operator.function(
                *a, variant=v, config=c, **kwargs))
            verdict = judge(call(*args), reference, dtype, zero_rows=operator.zero_rows(args),
                            key_ranges=operator.key_ranges(args, kwargs))
            assert verdict.ok, f"{variant.name} {config} on {problem}: {verdict.reason}"
            assert verdict.row_error < RELATIVE_ERROR_BOUND[dtype] / 2


def test_judge_fails_one_bad_row_that_a_global_norm_dilutes():
    rng = np.random.default_rng(0)
    reference = rng.standard_normal((64, 8, 64))
    output = reference.copy()
    output[17, 3] *= 1.05  # 5% off in one (row, head) of 512: 0.2% of the whole
    verdict = judge(output, reference, "bfloat16", key_ranges=np.tile([[5, 900]], (64, 1)))
    assert not verdict.ok and verdict.relative_error < 0.01
    assert (verdict.row, verdict.head) == (17, 3)
    assert "row 17 head 3 (keys 5..899)" in verdict.reason


def test_judge_fails_nan_and_nonzero_padding_and_passes_rounding():
    rng = np.random.default_rng(1)
    reference = rng.standard_normal((6, 4, 64)).astype(np.float32)
    reference[5] = 0.0
    rounded = np.asarray(jax.numpy.asarray(reference, "bfloat16"), np.float32)
    padding = np.arange(6) == 5
    assert judge(rounded, reference, "bfloat16", zero_rows=padding).ok
    with_nan = rounded.copy()
    with_nan[2, 1, 7] = np.nan
    assert "NaN" in judge(with_nan, reference, "bfloat16").reason
    leaky = rounded.copy()
    leaky[5, 0, 0] = 1e-30
    assert "padding" in judge(leaky, reference, "bfloat16", zero_rows=padding).reason


def test_bounds_follow_the_unit_roundoff():
    assert RELATIVE_ERROR_BOUND["float32"] < RELATIVE_ERROR_BOUND["float16"] < \
        RELATIVE_ERROR_BOUND["bfloat16"] < 2e-2
