"""ragged_paged_attention_v3: its XLA variant against the reference (output judged, cache bit
for bit), the cache write against a NumPy restatement, in-place update under donation,
argument and value checks, and its table keys."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from attnbench import kernels
from attnbench.kernels import registry
from attnbench.kernels.paged_v3 import cache
from attnbench.kernels.paged_v3.problem import PagedV3Problem
from attnbench.kernels.table import key_distance, make_key
from checks import run_and_compare

CACHE_DTYPES = ("float32", "bfloat16", "float8_e4m3fn", "int8")
FEATURES = {"none": {}, "all": dict(sliding_window=9, logits_soft_cap=20.0, sinks=True)}


def _tiny(**changes) -> PagedV3Problem:
    base = PagedV3Problem(num_seqs=4, max_len=40, q_heads=4, kv_heads=2, head_dim=32,
                          page_size=8, dtype="bfloat16", padding_tokens=2, inactive_seqs=1)
    return dataclasses.replace(base, **changes)


BATCHES = {
    "decode": _tiny(),
    "prefill": _tiny(prefill_fraction=1.0, prefill_chunk=12),
    "mixed": _tiny(num_seqs=6, prefill_fraction=0.34, mixed_fraction=0.34, prefill_chunk=7),
}


# (batch, cache dtype, features): every dtype with and without the features, every batch
# kind with both; the full cross product costs a compile per case for little more.
CASES = [("decode", "float32", "all"), ("prefill", "float32", "none"),
         ("mixed", "bfloat16", "all"), ("decode", "bfloat16", "none"),
         ("prefill", "float8_e4m3fn", "all"), ("mixed", "float8_e4m3fn", "none"),
         ("mixed", "int8", "all"), ("decode", "int8", "none"), ("prefill", "int8", "none")]


@pytest.mark.parametrize("batch,cache_dtype,feature_set", CASES)
def test_xla_matches_reference(batch, cache_dtype, feature_set):
    index = CASES.index((batch, cache_dtype, feature_set))
    features = FEATURES[feature_set]
    problem = dataclasses.replace(BATCHES[batch], cache_dtype=cache_dtype, **features)
    run_and_compare(problem, "xla", seed=index)


def test_xla_float32_queries_and_mqa_with_padded_slots():
    # Hkv = 1 with a packing of 4 leaves two padding slots per row; D = 24 pads lanes.
    problem = _tiny(dtype="float32", kv_heads=1, head_dim=24, cache_dtype="float8_e4m3fn",
                    mixed_fraction=0.5, prefill_chunk=5, sliding_window=6)
    run_and_compare(problem, "xla", seed=3)


def _numpy_quantize(x: np.ndarray, scale, dtype: str) -> np.ndarray:
    x = x.astype(np.float64) / (1.0 if scale is None else scale)
    if dtype == "int8":
        return np.clip(np.rint(x), -128, 127).astype(np.int8)
    if dtype == "float8_e4m3fn":
        return np.clip(x.astype(np.float32), -448, 448).astype(ml_dtypes.float8_e4m3fn)
    return x.astype(np.float32).astype(jnp.dtype(dtype))


@pytest.mark.parametrize("cache_dtype", ("bfloat16", "int8"))
def test_cache_write_matches_numpy_and_touches_only_written_slots(cache_dtype):
    problem = _tiny(num_seqs=5, prefill_fraction=0.2, mixed_fraction=0.4, prefill_chunk=6,
                    cache_dtype=cache_dtype)
    args, kwargs = problem.make_inputs(1)
    _, updated = jax.jit(lambda *a: kernels.ragged_paged_attention_v3(
        *a, variant="xla", **kwargs))(*args)
    before = np.asarray(args[3])
    expected = before.copy()
    keys, values = np.asarray(args[1], np.float32), np.asarray(args[2], np.float32)
    contexts, table, starts, bands = (np.asarray(a) for a in args[4:8])
    page_size, rows, pack, lanes = before.shape[1:]
    head_dim = keys.shape[-1]
    written = np.zeros(before.shape[:2], bool)
    for i in range(int(bands[2])):
        for t in range(starts[i], starts[i + 1]):
            position = contexts[i] - (starts[i + 1] - starts[i]) + (t - starts[i])
            page, row = table[i, position // page_size], position % page_size
            slot = np.zeros((rows * pack, lanes), expected.dtype)
            slot[0::2][: keys.shape[1], :head_dim] = _numpy_quantize(
                keys[t], kwargs.get("k_scale"), cache_dtype)
            slot[1::2][: keys.shape[1], :head_dim] = _numpy_quantize(
                values[t], kwargs.get("v_scale"), cache_dtype)
            expected[page, row] = slot.reshape(rows, pack, lanes)
            written[page, row] = True
    got = np.asarray(updated)
    assert written.sum() == starts[bands[2]]
    assert np.array_equal(got.view(np.uint8), expected.view(np.uint8))
    # The slots it writes held other values before: the check above is not vacuous.
    assert not np.array_equal(got[written].view(np.uint8), before[written].view(np.uint8))


def test_quantize_rounds_to_nearest_and_saturates():
    x = jnp.asarray([1000.0, -1000.0, 2.5, -3.5, 0.26, 1e-9], jnp.float32)
    assert np.asarray(cache.quantize(x, 2.0, "int8")).tolist() == [127, -128, 1, -2, 0, 0]
    fp8 = np.asarray(cache.quantize(x, None, "float8_e4m3fn")).astype(np.float32)
    assert fp8[:2].tolist() == [448.0, -448.0] and fp8[2] == 2.5 and fp8[3] == -3.5


@pytest.mark.parametrize("cache_dtype", ("float32", "int8"))
def test_donated_cache_is_updated_in_place(cache_dtype):
    # 16- and 8-bit float caches alias too, but XLA:CPU copies them around the scatter
    # (docs/semantics.md, the last section); these two are written in place.
    problem = _tiny(cache_dtype=cache_dtype)
    args, kwargs = problem.make_inputs(0)
    # Spare pages no sequence owns make the cache large next to the kernel's temporaries.
    spare = jnp.zeros((400,) + args[3].shape[1:], args[3].dtype)
    args = (*args[:3], jnp.concatenate([args[3], spare]), *args[4:])

    def call(*a):
        return kernels.ragged_paged_attention_v3(*a, variant="xla", **kwargs)

    lowered = jax.jit(call, donate_argnums=3).lower(*args)
    assert "tf.aliasing_output = 1" in lowered.as_text()
    memory = lowered.compile().memory_analysis()
    cache_bytes = args[3].size * args[3].dtype.itemsize
    assert memory.alias_size_in_bytes >= cache_bytes
    # No second cache among the temporaries (a copy before the scatter would be one).
    assert memory.temp_size_in_bytes < cache_bytes
    pointer = args[3].unsafe_buffer_pointer()
    _, updated = lowered.compile()(*args)
    assert updated.unsafe_buffer_pointer() == pointer


def _inputs():
    problem = _tiny(mixed_fraction=0.5, prefill_chunk=4, cache_dtype="int8")
    return problem.make_inputs(2)


def test_flat_page_table_gives_the_same_result():
    args, kwargs = _inputs()
    run = jax.jit(lambda *a: kernels.ragged_paged_attention_v3(*a, variant="reference", **kwargs))
    out, updated = run(*args)
    flat = (*args[:5], args[5].reshape(-1), *args[6:])
    out_flat, updated_flat = run(*flat)
    assert np.array_equal(np.asarray(out), np.asarray(out_flat))
    assert np.array_equal(np.asarray(updated), np.asarray(updated_flat))


def test_bad_structure_names_the_argument():
    args, kwargs = _inputs()
    call = kernels.ragged_paged_attention_v3
    wrong_packing = jnp.zeros(args[3].shape[:2] + (2, 2, args[3].shape[4]), jnp.int8)
    with pytest.raises(ValueError, match=r"kv_cache must have shape .*pack 4"):
        call(*args[:3], wrong_packing, *args[4:], **kwargs)
    with pytest.raises(ValueError, match="k_scale is required for a int8 kv_cache"):
        call(*args, v_scale=1.0)
    with pytest.raises(ValueError, match="distribution must have shape"):
        call(*args[:7], jnp.zeros((2,), jnp.int32), **kwargs)
    with pytest.raises(TypeError, match="kv_cache must have dtype"):
        call(*args[:3], args[3].astype(jnp.int16), *args[4:], **kwargs)


def test_bad_distribution_values_are_reported_by_validate():
    args, kwargs = _inputs()
    max_seqs = args[4].shape[0]
    call = kernels.ragged_paged_attention_v3
    with pytest.raises(ValueError, match=r"distribution decreases: distribution\[0\] = 3"):
        call(*args[:7], jnp.asarray([3, 1, 4], jnp.int32), validate=True, **kwargs)
    with pytest.raises(ValueError, match=r"distribution\[2\] = .* exceeds the sequences"):
        call(*args[:7], jnp.asarray([0, 0, max_seqs + 1], jnp.int32), validate=True, **kwargs)
    # A prefill sequence inside the decode band.
    with pytest.raises(ValueError, match="is in the decode band"):
        call(*args[:7], jnp.asarray([4, 4, 4], jnp.int32), validate=True, **kwargs)
    call(*args, validate=True, **kwargs)  # the problem's own distribution is fine


def test_table_key_holds_cache_dtype_and_packing():
    operator = registry.get_operator("paged_v3")
    base = dict(q_heads=8, kv_heads=2, head_dim=128, dtype="bfloat16", features=frozenset())
    sizes = {"max_len": 4096, "tokens": 8, "page_size": 16}
    int8_key = make_key(operator.lookup_shape(**base, sizes={**sizes, "cache_dtype": "int8"}),
                        "cpu")
    bf16_key = make_key(operator.lookup_shape(**base, sizes=sizes), "cpu")
    assert (int8_key["cache_dtype"], int8_key["packing"]) == ("int8", 4)
    assert (bf16_key["cache_dtype"], bf16_key["packing"]) == ("bfloat16", 2)
    assert key_distance(int8_key, bf16_key) is None
    assert key_distance(int8_key, int8_key) == 0
    assert operator.key_field_problems({**int8_key, "packing": 2}, "key")


def test_gate_catches_mutants_of_a_quantized_mixed_batch():
    from attnbench.tuner.measure.mutants import run_mutants

    problem = _tiny(num_seqs=3, max_len=64, prefill_fraction=0.34, mixed_fraction=0.34,
                    prefill_chunk=6, cache_dtype="float8_e4m3fn", sliding_window=20)
    catches = run_mutants(problem, seed=0)
    assert len(catches) >= 8
    assert all(c.caught for c in catches), [c for c in catches if not c.caught]


# ---- the native CPU variant ---------------------------------------------------------------

NATIVE_CASES = [("decode", "bfloat16", "all"), ("prefill", "float32", "all"),
                ("mixed", "bfloat16", "none"), ("mixed", "float16", "all")]


@pytest.mark.parametrize("batch,cache_dtype,feature_set", NATIVE_CASES)
def test_cpu_native_matches_reference(batch, cache_dtype, feature_set):
    index = NATIVE_CASES.index((batch, cache_dtype, feature_set))
    problem = dataclasses.replace(BATCHES[batch], cache_dtype=cache_dtype,
                                  **FEATURES[feature_set])
    run_and_compare(problem, "cpu_native", seed=10 + index)


def test_cpu_native_writes_a_donated_16_bit_cache_in_place_and_only_its_slots():
    problem = _tiny(num_seqs=5, prefill_fraction=0.2, mixed_fraction=0.4, prefill_chunk=6)
    args, kwargs = problem.make_inputs(4)
    spare = jnp.asarray(np.random.default_rng(0).standard_normal(
        (400,) + args[3].shape[1:]), args[3].dtype)
    args = (*args[:3], jnp.concatenate([args[3], spare]), *args[4:])
    _, expected = jax.jit(lambda *a: kernels.ragged_paged_attention_v3(
        *a, variant="xla", **kwargs))(*args)

    def call(*a):
        return kernels.ragged_paged_attention_v3(*a, variant="cpu_native", **kwargs)

    compiled = jax.jit(call, donate_argnums=3).lower(*args).compile()
    cache_bytes = args[3].size * args[3].dtype.itemsize
    assert compiled.memory_analysis().temp_size_in_bytes < cache_bytes
    pointer = args[3].unsafe_buffer_pointer()
    _, updated = compiled(*args)
    assert updated.unsafe_buffer_pointer() == pointer
    assert np.array_equal(np.asarray(updated).view(np.uint16),
                          np.asarray(expected).view(np.uint16))


def test_cpu_native_leaves_quantized_caches_to_the_xla_variant():
    from attnbench.kernels.lookup import choose

    variant = registry.get_variant("paged_v3", "cpu_native")
    shape = _tiny(cache_dtype="int8").shape(0)
    assert "not int8" in variant.unsupported_reason(shape, "cpu", False)
    assert choose(shape, platform="cpu").variant.name == "xla"
    assert choose(_tiny(cache_dtype="bfloat16", head_dim=48).shape(0),
                  platform="cpu").variant.name == "cpu_native"
