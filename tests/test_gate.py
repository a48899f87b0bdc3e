"""The correctness gate: deliberately wrong kernels are flagged, correct ones are not.

Mutants (tuner/measure/mutants.py) run on shrunk versions of every problem kind of every
shipped sweep file; the correct variants run on the same inputs in every dtype.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from attnbench.kernels.registry import OPERATOR_NAMES, get_operator, variants
from attnbench.tuner.measure.accuracy import RELATIVE_ERROR_BOUND, judge
from attnbench.tuner.measure.mutants import reference_output, run_mutants
from attnbench.tuner.plan.sweep_file import load_sweep, sweeps_dir


def _small(problem):
    """The problem's kind (features, GQA shape, lengths, prefill, page size) at a small size."""
    group = problem.q_heads // problem.kv_heads
    kv_heads = 1 if problem.kv_heads == 1 else 2  # MQA stays MQA, GQA keeps a group > 1
    window = problem.sliding_window
    fields = dict(q_heads=kv_heads * min(group, 4), kv_heads=kv_heads, head_dim=64,
                  max_len=520, min_len=100, lengths="fixed" if problem.lengths == "fixed" else "uniform",
                  sliding_window=None if window is None else 100)
    if problem.op == "decode":
        fields["batch"] = 3
    else:
        fields.update(num_seqs=3, prefill_chunk=40,
                      prefill_fraction=0.34 if problem.prefill_fraction else 0.0)
    if hasattr(problem, "mixed_fraction"):
        # The operator with a written cache: one kind per stored dtype, all three bands.
        fields.update(cache_dtype=problem.stored_dtype, page_size=16, prefill_fraction=0.34,
                      mixed_fraction=0.33)
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
    assert ops == set(OPERATOR_NAMES)
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


def _one_per_feature_set():
    chosen = {}
    for problem in sorted(KINDS, key=repr):
        features = (problem.op, problem.sliding_window, problem.logits_soft_cap, problem.sinks,
                    problem.prefill_fraction if problem.op == "paged" else 0)
        chosen.setdefault(features, dataclasses.replace(problem, dtype="bfloat16"))
    return list(chosen.values())


FALSE_ALARM_KINDS = _one_per_feature_set()


DTYPES = ("float32", "bfloat16", "float16")


@pytest.mark.parametrize("dtype", DTYPES)
def test_correct_variants_pass_on_the_probed_inputs(dtype):
    """The XLA variants pass where the mutants fail: every feature set once, each dtype on a
    third of them (the suite runs on 2 cores)."""
    for index, base in enumerate(FALSE_ALARM_KINDS[DTYPES.index(dtype)::len(DTYPES)]):
        problem = dataclasses.replace(base, dtype=dtype)
        operator = get_operator(problem.op)
        args, kwargs = problem.make_inputs(index)
        reference = reference_output(problem, args, kwargs)
        shape = problem.shape(index)
        for variant in variants(problem.op):
            if "cpu" not in variant.platforms or variant.name == "reference" or variant.peer:
                continue  # peers have their own verdicts (tests/test_peers.py)
            config = variant.default_config(shape).to_dict()
            call = jax.jit(lambda *a, v=variant.name, c=config: operator.function(
                *a, variant=v, config=c, **kwargs))
            output, _ = operator.split_result(call(*args))
            verdict = judge(output, reference, dtype, zero_rows=operator.zero_rows(args),
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


def test_judge_leaves_no_blas_pool_running_before_a_timing(monkeypatch):
    import threadpoolctl

    from attnbench.tuner.measure import accuracy

    seen = []
    norm = np.linalg.norm

    def watched_norm(x, *args, **kwargs):
        seen.append(max(pool["num_threads"] for pool in threadpoolctl.threadpool_info()
                        if pool["user_api"] == "blas"))
        return norm(x, *args, **kwargs)

    monkeypatch.setattr(accuracy.np.linalg, "norm", watched_norm)
    reference = np.random.default_rng(0).standard_normal((64, 4, 128)).astype(np.float32)
    assert judge(reference, reference, "float32").ok
    assert seen and set(seen) == {1}


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


def test_timed_input_sets_keep_every_logit_of_the_checked_inputs():
    """The rotated copies timed after the checked run hold the same logits (so the same
    probes and logit statistics) in fresh buffers; only output channels change sign."""
    import jax.numpy as jnp
    import numpy as np

    from attnbench import kernels
    from attnbench.kernels.decode.problem import DecodeProblem
    from attnbench.tuner.measure.input_sets import rotated_input_sets

    problem = DecodeProblem(batch=2, max_len=64, q_heads=4, kv_heads=2, head_dim=16)
    args, kwargs = problem.make_inputs(3)
    first, second = rotated_input_sets(args, 3, 2)
    logits = [np.einsum("bhd,bshd->bhs", np.asarray(s[0], np.float32)[:, :2],
                        np.asarray(s[1], np.float32)) for s in (first, second)]
    np.testing.assert_array_equal(logits[0], logits[1])
    assert not np.array_equal(np.asarray(first[2], np.float32), np.asarray(second[2], np.float32))
    out = [np.asarray(kernels.decode_attention(*s, variant="reference", **kwargs), np.float32)
           for s in (first, second)]
    flipped = np.sign(np.asarray(second[0], np.float32)[0, 0] / np.asarray(first[0], np.float32)[0, 0])
    np.testing.assert_allclose(out[1], out[0] * flipped, rtol=0, atol=1e-2)
    assert jnp.dtype(second[1].dtype) == jnp.dtype(first[1].dtype)
