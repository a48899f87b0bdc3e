"""ragged_paged_attention_v3: its XLA, Triton and Pallas TPU variants against the reference
(output judged, cache bit for bit; the kernels interpreted, and compiled for CUDA and TPU
targets), the cache write against a NumPy restatement, in-place update under donation,
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


# The Triton and Pallas TPU variants, interpreted: each cache dtype once, the three batch kinds
# and both feature sets among them (interpreted runs are slow; the XLA cases above cross more),
# on smaller batches still. One KV head: two padding slots per row in the float8 and int8
# caches; D = 32: 96 padding lanes. Configs: the heuristic (Triton's runs the prefill bands in
# a launch of their own on the prefill and mixed batches) or the one named, to reach the other
# launch plan.
_KERNEL_SIZES = dict(num_seqs=3, max_len=24, q_heads=2, kv_heads=1, padding_tokens=1)
KERNEL_BATCHES = {
    "decode": _tiny(**_KERNEL_SIZES),
    "prefill": _tiny(**_KERNEL_SIZES, prefill_fraction=1.0, prefill_chunk=9),
    "mixed": _tiny(**_KERNEL_SIZES, prefill_fraction=0.34, mixed_fraction=0.34, prefill_chunk=7),
}
KERNEL_CASES = [("decode", "float32", "all"), ("prefill", "int8", "none"),
                ("mixed", "float8_e4m3fn", "all"), ("mixed", "bfloat16", "none")]
KERNEL_CONFIGS = {
    ("triton", "mixed", "bfloat16"): dict(kv_pages_per_block=2, queries_per_block=8,
                                          kv_splits=2, chunk_prefill_size=0),
    ("pallas_tpu", "mixed", "bfloat16"): dict(pages_per_block=1, query_rows_per_block=16,
                                              chunk_prefill_size=32, vmem_limit_mib=32),
}


@pytest.mark.parametrize("batch,cache_dtype,feature_set", KERNEL_CASES)
def test_kernel_variants_match_reference_interpreted(batch, cache_dtype, feature_set):
    from checks import require_test_extra

    require_test_extra("triton", "torch")
    index = KERNEL_CASES.index((batch, cache_dtype, feature_set))
    problem = dataclasses.replace(KERNEL_BATCHES[batch], cache_dtype=cache_dtype,
                                  **FEATURES[feature_set])
    # Both variants in one test: they share the reference's run (checks.run_and_compare).
    for variant in ("triton", "pallas_tpu"):
        config = KERNEL_CONFIGS.get((variant, batch, cache_dtype))
        if config is not None:
            fields = registry.get_variant("paged_v3", variant).config_class(**config)
            assert fields.invalid_reason(problem.shape(index)) is None
        run_and_compare(problem, variant, config, seed=index, interpret=True)


def test_kernel_variant_configs_wrap_the_paged_rules():
    from attnbench.kernels.paged_v3 import pallas_tpu, triton_paged

    shape = _tiny().shape(0)
    triton = triton_paged.TritonV3Config(kv_pages_per_block=2, queries_per_block=8)
    assert triton.invalid_reason(shape) is None
    # The v2 rules speak for the v3 config: 4 x 2 tile rows are too few for a dot.
    assert "tl.dot's minimum" in triton.replace(queries_per_block=4).invalid_reason(shape)
    assert "with chunk_prefill_size = 1" in triton.replace(chunk_prefill_size=1).invalid_reason(
        shape)
    assert triton.replace(chunk_prefill_size=16).prefill_config() == (
        triton.attention_config().replace(queries_per_block=16, kv_splits=1))
    tpu = pallas_tpu.PallasTpuV3Config(pages_per_block=1, query_rows_per_block=16)
    assert tpu.invalid_reason(shape) is None
    assert "sublane tile" in tpu.replace(query_rows_per_block=24).invalid_reason(shape)
    # A raised VMEM limit raises the budget its blocks are planned against.
    assert tpu.replace(vmem_limit_mib=64).vmem_budget_bytes() > tpu.vmem_budget_bytes()
    assert tpu.replace(vmem_limit_mib=64).vmem_limit_bytes() == 64 * 2**20
    assert tpu.vmem_limit_bytes() is None
    with pytest.raises(ValueError, match="chunk_prefill_size must be one of"):
        pallas_tpu.PallasTpuV3Config(chunk_prefill_size=24)


def test_kernel_heuristics_are_valid_everywhere():
    import itertools

    from attnbench.kernels.paged_v3.inputs import PagedV3Shape

    for variant in ("triton", "pallas_tpu"):
        heuristic = registry.get_variant("paged_v3", variant).heuristic
        for tokens, seqs, pages, page_size, (q_heads, kv_heads), head_dim, dtype, stored in (
                itertools.product((1, 64, 1000), (1, 64), (1, 512), (8, 16, 64),
                                  ((8, 1), (32, 8), (64, 8)), (64, 256),
                                  ("bfloat16", "float32", "float16"), cache.CACHE_PACKING)):
            shape = PagedV3Shape(num_tokens=tokens, max_seqs=seqs, pages_per_seq=pages,
                                 page_size=page_size, num_pages=seqs * pages, q_heads=q_heads,
                                 kv_heads=kv_heads, head_dim=head_dim, dtype=dtype,
                                 cache_dtype=stored)
            assert heuristic(shape).invalid_reason(shape) is None, (variant, shape)


def test_kernel_variants_are_the_accelerator_defaults():
    assert registry.default_variant_name("paged_v3", "gpu") == "triton"
    assert registry.default_variant_name("paged_v3", "tpu") == "pallas_tpu"
    assert registry.default_variant_name("paged_v3", "cpu") == "cpu_native"  # XLA where it cannot build


def test_triton_float8_cache_compiles_before_sm_89():
    """float8 caches reach the Triton kernel as their bits (Triton's own fp8 type needs sm_89),
    so an A100 compiles them; the prefill bands' launch is one more kernel."""
    from checks import require_test_extra

    require_test_extra("jax_triton", "triton")
    from attnbench.tuner.check import cuda_check

    problem = PagedV3Problem(num_seqs=4, max_len=512, q_heads=32, kv_heads=8, head_dim=128,
                             page_size=16, dtype="bfloat16", cache_dtype="float8_e4m3fn",
                             prefill_fraction=0.25, mixed_fraction=0.25, prefill_chunk=64,
                             sinks=True)
    config = registry.get_variant("paged_v3", "triton").config_class(
        kv_pages_per_block=4, queries_per_block=4, chunk_prefill_size=16)
    result = cuda_check.check_config(problem, "triton", config, cuda_check.parse_target("sm_80"))
    assert result.status == "ok", result.reason
    assert len(result.kernels) == 2


@pytest.mark.parametrize("target,cache_dtype", [("v5e", "float8_e4m3fn"), ("v6e", "int8")])
def test_pallas_tpu_compiles_for_tpu_with_libtpu(target, cache_dtype):
    """The full Mosaic compile of a quantized cache's kernels (scales from SMEM, D = 64 so
    padding lanes, the prefill bands' launch, a raised VMEM limit), on libtpu's compile-only
    devices: fails loudly without libtpu."""
    import libtpu  # noqa: F401
    from attnbench.tuner.check import tpu_check

    problem = PagedV3Problem(num_seqs=8, max_len=1024, q_heads=16, kv_heads=4, head_dim=64,
                             page_size=64, dtype="bfloat16", cache_dtype=cache_dtype,
                             prefill_fraction=0.25, prefill_chunk=128, sliding_window=256,
                             logits_soft_cap=30.0)
    config = registry.get_variant("paged_v3", "pallas_tpu").config_class(
        pages_per_block=4, query_rows_per_block=32, chunk_prefill_size=64, vmem_limit_mib=64)
    assert config.invalid_reason(problem.shape(0)) is None
    assert tpu_check.compile_program(problem, "pallas_tpu", config,
                                     tpu_check.TPU_TARGETS[target]) == ""


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
