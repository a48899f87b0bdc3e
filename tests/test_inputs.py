"""Bad input: errors at trace time that name the argument; opt-in value checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnbench import kernels
from attnbench.kernels.paged.problem import PagedProblem

B, S, HQ, HKV, D = 2, 16, 4, 2, 8


def decode_arrays(dtype=jnp.float32):
    key = jax.random.normal(jax.random.key(0), (B, S, HKV, D), dtype)
    return (jax.random.normal(jax.random.key(1), (B, HQ, D), dtype), key, key,
            jnp.zeros((B,), jnp.int32), jnp.full((B,), S, jnp.int32))


def replace(arrays, index, value):
    arrays = list(arrays)
    arrays[index] = value
    return arrays


@pytest.mark.parametrize("index,value,error,pattern", [
    (0, jnp.zeros((B, D)), ValueError, r"query must have shape \[B, Hq, D\].*got shape \(2, 8\)"),
    (0, jnp.zeros((B, 2, HQ, D)), ValueError, r"query of rank 4 must have shape \[B, 1, Hq, D\]"),
    (0, jnp.zeros((B, 3, D)), ValueError, r"query heads of query \(3\) must be a multiple of "
                                          r"the key/value heads of key \(2\)"),
    (0, jnp.zeros((B, HQ, D), jnp.int32), TypeError, r"query must have dtype in .* got int32"),
    (1, jnp.zeros((B, S, HKV)), ValueError, r"key must have shape \[B, S, Hkv, D\]"),
    (2, jnp.zeros((B, S, HKV, D), jnp.bfloat16), TypeError, "key and value must share a dtype"),
    (2, jnp.zeros((B, S + 1, HKV, D)), ValueError, "value must have the shape of key"),
    (1, jnp.zeros((B + 1, S, HKV, D)), ValueError, r"key must have batch 2 \(from query\)"),
    (3, jnp.zeros((B,), jnp.float32), TypeError, "sequence_start must be an integer array"),
    (4, jnp.zeros((B + 1,), jnp.int32), ValueError, r"sequence_end must have shape int32 \[B\]"),
])
def test_decode_shape_errors_name_the_argument(index, value, error, pattern):
    arrays = replace(decode_arrays(), index, value)
    with pytest.raises(error, match=pattern):
        jax.jit(kernels.decode_attention).lower(*arrays)


@pytest.mark.parametrize("kwargs,pattern", [
    ({"sliding_window": 0}, "sliding_window must be an int >= 1"),
    ({"sliding_window": (3,)}, r"sliding_window as a tuple must be \(left, right\)"),
    ({"sliding_window": 2.5}, "sliding_window must be an int"),
    ({"logits_soft_cap": -1.0}, "logits_soft_cap must be a finite number > 0"),
    ({"softmax_scale": "big"}, "softmax_scale must be a Python float"),
    ({"sinks": jnp.zeros((HQ + 1, 2))}, r"sinks of rank 2 must have shape \[Hkv, num_sinks\] "
                                         r"with Hkv = 2 or \[Hq, num_sinks\] with Hq = 4, got \(5, 2\)"),
    ({"sinks": jnp.zeros((HQ, 1, 1))}, r"sinks must have shape \[Hq\], \[num_sinks\]"),
    ({"sinks": jnp.zeros((0,))}, "sinks must hold at least one sink"),
    ({"sinks": jnp.zeros((HQ,), jnp.int32)}, "sinks must be a float array"),
    ({"variant": "nope"}, "unknown decode variant 'nope'"),
    ({"config": {"kv_block_size": 3}, "variant": "reference"}, "unknown tunable"),
], ids=str)
def test_decode_keyword_errors(kwargs, pattern):
    with pytest.raises((ValueError, TypeError), match=pattern):
        kernels.decode_attention(*decode_arrays(), **kwargs)


def paged_arrays():
    problem = PagedProblem(num_seqs=3, max_len=20, q_heads=HQ, kv_heads=HKV, head_dim=D,
                           page_size=4, dtype="float32")
    return list(problem.make_inputs(0)[0])


@pytest.mark.parametrize("index,value,error,pattern", [
    (0, jnp.zeros((5, HQ)), ValueError, r"queries must have shape \[T, Hq, D\]"),
    (1, jnp.zeros((4, 4, 3, D)), ValueError, "odd head axis 3"),
    (1, jnp.zeros((4, 4, 4, D + 1)), ValueError, r"kv_pages must have head dim D = 8"),
    (2, jnp.zeros((3,), jnp.float32), TypeError, "context_lens must be an integer array"),
    (3, jnp.zeros((3,), jnp.int32), ValueError, r"page_table must have shape int32 \[max_seqs, pages_per_seq\]"),
    (4, jnp.zeros((3,), jnp.int32), ValueError, r"query_start_loc must have shape int32 \[max_seqs \+ 1\] = \(4,\)"),
    (5, jnp.zeros((2,), jnp.int32), ValueError, "num_seqs must be an int32 scalar or"),
])
def test_paged_shape_errors_name_the_argument(index, value, error, pattern):
    arrays = replace(paged_arrays(), index, value)
    with pytest.raises(error, match=pattern):
        kernels.ragged_paged_attention(*arrays)


def test_decode_value_check_host_and_jit():
    arrays = decode_arrays()
    bad = replace(arrays, 4, jnp.asarray([S + 3, 4], jnp.int32))
    bad = replace(bad, 3, jnp.asarray([0, 6], jnp.int32))
    with pytest.raises(ValueError) as info:
        kernels.check_inputs("decode", *bad)
    assert "sequence_end[0] = 19 is beyond the cache length S = 16" in str(info.value)
    assert "sequence_start[1] = 6 > sequence_end[1] = 4" in str(info.value)
    with pytest.raises(ValueError, match="beyond the cache length"):
        kernels.decode_attention(*bad, validate=True)
    with pytest.raises(Exception, match="beyond the cache length"):
        jax.block_until_ready(jax.jit(lambda *a: kernels.decode_attention(*a, validate=True))(*bad))
    kernels.check_inputs("decode", *arrays)  # good values pass silently
    jax.jit(lambda *a: kernels.decode_attention(*a, validate=True))(*arrays)


def test_paged_value_check_reports_each_problem():
    queries, pages, ctx, table, qsl, num_seqs = paged_arrays()
    bad = [queries, pages, ctx.at[0].set(0).at[2].set(500), table.at[1, 0].set(pages.shape[0]),
           qsl.at[2].set(0), num_seqs]
    with pytest.raises(ValueError) as info:
        kernels.check_inputs("paged", *bad)
    text = str(info.value)
    assert "query_start_loc decreases" in text
    assert "context_lens[2] = 500 is outside" in text
    assert f"page_table[1, 0] = {pages.shape[0]} is outside [0, P = {pages.shape[0]})" in text
    assert "q_len" in text  # sequence 0 now has a context shorter than its query rows
    with pytest.raises(ValueError, match="query_start_loc decreases"):
        kernels.ragged_paged_attention(*bad, validate=True)
    kernels.check_inputs("paged", queries, pages, ctx, table, qsl, num_seqs)


def test_out_of_range_decode_lengths_never_crash():
    arrays = replace(decode_arrays(), 4, jnp.asarray([S + 100, -3], jnp.int32))
    out = kernels.decode_attention(*arrays, variant="reference")
    assert np.all(np.isfinite(np.asarray(out)))
