"""The float32 reference against the independent float64 NumPy oracle (tests/oracle.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import oracle
from attnbench import kernels
from attnbench.kernels.decode.reference import decode_attention_reference
from attnbench.kernels.paged.reference import ragged_paged_attention_reference
from attnbench.kernels.paged.problem import PagedProblem
from attnbench.kernels.decode import inputs as decode_inputs
from attnbench.kernels.paged import inputs as paged_inputs

# Both sides read the same (already rounded) inputs and accumulate in >= float32.
BOUND = 2e-5


def relative_error(actual, expected):
    actual = np.asarray(actual, np.float64)
    assert np.all(np.isfinite(actual)), "NaN or Inf in the reference output"
    norm = np.linalg.norm(expected)
    return np.linalg.norm(actual - expected) / (norm if norm > 0 else 1.0)


def decode_case(seed, *, batch=3, max_len=40, q_heads=4, kv_heads=2, dim=16, dtype="float32",
                start=None, end=None):
    rng = np.random.default_rng(seed)
    end = rng.integers(1, max_len + 1, batch) if end is None else np.asarray(end)
    start = np.zeros(batch, int) if start is None else np.asarray(start)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), dtype)  # noqa: E731
    return (normal(batch, q_heads, dim), normal(batch, max_len, kv_heads, dim),
            normal(batch, max_len, kv_heads, dim), jnp.asarray(start, jnp.int32),
            jnp.asarray(end, jnp.int32))


def check_decode(arrays, **kwargs):
    args, _, _ = decode_inputs.prepare(*arrays, **kwargs)
    got = decode_attention_reference(args)
    expected = oracle.decode(*arrays, **kwargs)
    assert got.dtype == jnp.float32
    assert relative_error(got, expected) < BOUND
    return got


@pytest.mark.parametrize("q_heads,kv_heads", [(4, 4), (4, 2), (8, 1)], ids=["MHA", "GQA", "MQA"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_decode_heads_and_dtypes(q_heads, kv_heads, dtype):
    check_decode(decode_case(1, q_heads=q_heads, kv_heads=kv_heads, dtype=dtype))


@pytest.mark.parametrize("kwargs", [
    {"sliding_window": 1},
    {"sliding_window": 7},
    {"sliding_window": (5, 0)},
    {"sliding_window": (5, 3)},  # the right extent cannot admit keys past the query
    {"logits_soft_cap": 2.0},
    {"softmax_scale": 0.5},
    {"sliding_window": 9, "logits_soft_cap": 3.0},
], ids=str)
def test_decode_features(kwargs):
    check_decode(decode_case(2, start=[0, 3, 10], end=[40, 20, 11]), **kwargs)


def test_decode_window_edge_on_block_boundary():
    # With a window of 16 and the query at p = 47, the oldest key kept is j = 32: a multiple
    # of 16, where a blocked kernel's block starts.
    arrays = decode_case(3, batch=2, max_len=64, start=[0, 0], end=[48, 64])
    got = check_decode(arrays, sliding_window=16)
    moved = check_decode(arrays, sliding_window=17)
    assert relative_error(got, np.asarray(moved, np.float64)) > 1e-3  # the edge key matters


def test_decode_empty_rows_give_zeros_with_and_without_sinks():
    arrays = decode_case(4, start=[5, 0, 7], end=[5, 9, 7])
    sinks = jnp.asarray(np.random.default_rng(0).standard_normal(4), jnp.float32)
    for kwargs in ({}, {"sinks": sinks}):
        out = np.asarray(check_decode(arrays, **kwargs))
        assert np.all(out[[0, 2]] == 0.0)
        assert np.any(out[1] != 0.0)


def test_decode_sinks_shrink_the_weights():
    arrays = decode_case(5)
    plain = check_decode(arrays)
    sunk = check_decode(arrays, sinks=jnp.full((4,), 3.0))
    # A sink takes softmax mass away from every key, so outputs shrink towards zero.
    assert np.linalg.norm(sunk) < np.linalg.norm(plain)


def test_decode_operator_rank4_and_dtype_under_jit():
    arrays = decode_case(6, dtype="bfloat16")
    query4 = arrays[0][:, None]
    run = jax.jit(lambda *a: kernels.decode_attention(*a, variant="reference"))
    out4 = run(query4, *arrays[1:])
    out3 = run(*arrays)
    assert out4.shape == query4.shape and out4.dtype == jnp.bfloat16
    assert np.array_equal(np.asarray(out4[:, 0], np.float32), np.asarray(out3, np.float32))


def paged_case(problem: PagedProblem, seed: int):
    return problem.make_inputs(seed)


def check_paged(arrays, **kwargs):
    args, _ = paged_inputs.prepare(*arrays, **kwargs)
    got = ragged_paged_attention_reference(args)
    expected = oracle.paged(*arrays, **kwargs)
    assert relative_error(got, expected) < BOUND
    return got


SMALL = dict(q_heads=4, kv_heads=2, head_dim=8)


@pytest.mark.parametrize("problem", [
    PagedProblem(num_seqs=3, max_len=37, page_size=16, **SMALL),  # decode only
    PagedProblem(num_seqs=2, max_len=21, page_size=16, prefill_fraction=1.0, prefill_chunk=64,
                 **SMALL),  # prefill only: q_len = context
    PagedProblem(num_seqs=4, max_len=45, page_size=16, prefill_fraction=0.5, prefill_chunk=11,
                 padding_tokens=3, inactive_seqs=2, **SMALL),  # mixed, chunks start mid-page
    PagedProblem(num_seqs=3, max_len=9, page_size=1, prefill_fraction=0.5, prefill_chunk=4,
                 **SMALL),
    PagedProblem(num_seqs=2, max_len=150, page_size=128, prefill_fraction=0.5, prefill_chunk=5,
                 **SMALL),
    PagedProblem(num_seqs=3, max_len=30, page_size=16, prefill_fraction=0.5, prefill_chunk=9,
                 dtype="float16", q_heads=4, kv_heads=1, head_dim=8),  # MQA, float16
], ids=["decode", "prefill", "mixed-padding", "page1", "page128", "mqa-f16"])
def test_paged_batches(problem):
    arrays, _ = paged_case(problem, seed=7)
    out = check_paged(arrays)
    real_rows = int(np.asarray(arrays[4])[problem.num_seqs])
    assert np.all(np.asarray(out)[real_rows:] == 0.0)


@pytest.mark.parametrize("kwargs", [
    {"sliding_window": 5}, {"sliding_window": (3, 2)}, {"logits_soft_cap": 1.5},
    {"sliding_window": 4, "logits_soft_cap": 2.5},
], ids=str)
def test_paged_features(kwargs):
    problem = PagedProblem(num_seqs=3, max_len=33, page_size=8, prefill_fraction=0.5,
                           prefill_chunk=10, dtype="bfloat16", **SMALL)
    arrays, _ = paged_case(problem, seed=8)
    check_paged(arrays, **kwargs)


def test_paged_sinks_with_and_without_valid_keys():
    problem = PagedProblem(num_seqs=2, max_len=20, page_size=4, prefill_fraction=0.5,
                           prefill_chunk=6, padding_tokens=2, **SMALL)
    arrays, _ = paged_case(problem, seed=9)
    sinks = jnp.asarray([0.5, -1.0, 2.0, 0.0], jnp.float32)
    out = check_paged(arrays, sinks=sinks)
    # Padding rows have no valid key: zeros even with sinks.
    assert np.all(np.asarray(out)[-2:] == 0.0)


def test_paged_out_of_range_values_stay_in_bounds():
    problem = PagedProblem(num_seqs=3, max_len=24, page_size=8, dtype="float32", **SMALL)
    arrays, _ = paged_case(problem, seed=10)
    queries, pages, ctx, table, qsl, num_seqs = arrays
    bad_table = table.at[0, 0].set(10_000).at[0, 1].set(-5)
    bad_ctx = ctx.at[1].set(10_000)
    out = kernels.ragged_paged_attention(queries, pages, bad_ctx, bad_table, qsl, num_seqs,
                                         variant="reference")
    assert np.all(np.isfinite(np.asarray(out, np.float32)))
    # Sequence 2 is untouched by the bad values and stays right.
    expected = oracle.paged(*arrays)
    rows = slice(int(qsl[2]), int(qsl[3]))
    assert relative_error(np.asarray(out)[rows], expected[rows]) < BOUND
