"""The Triton split-KV decode variant, run by Triton's CPU interpreter, against the reference.

The interpreter runs the same @triton.jit kernel bodies with the same launch code (grids,
strides, constexprs) as a GPU would, so these tests check the kernel logic; the CUDA export
test checks that the GPU path lowers and compiles (ptxas, sm_90) on this GPU-less host.
"""

from __future__ import annotations

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from checks import require_test_extra, run_and_compare

from attnbench import kernels
from attnbench.kernels import DecodeShape, gpu_limits
from attnbench.kernels.decode import inputs as decode_inputs
from attnbench.kernels.decode import triton_splitkv
from attnbench.kernels.decode.problem import DecodeProblem
from attnbench.kernels.decode.triton_splitkv import TritonSplitKVConfig
from attnbench.kernels.tunables import sample_configs

# The variant imports these lazily; without them every test below would fail one by one.
require_test_extra("triton", "torch", "jax_triton")

VARIANT = "triton_splitkv"
DTYPES = ("float32", "bfloat16", "float16")
FEATURE_SETS = {
    "none": {},
    "window_int": {"sliding_window": 13},
    "window_tuple": {"sliding_window": (9, 4)},
    "soft_cap": {"logits_soft_cap": 2.0},
    "sinks": {"sinks": True},
    "all": {"sliding_window": 21, "logits_soft_cap": 3.0, "sinks": True},
}


def shape_of(problem: DecodeProblem) -> DecodeShape:
    return DecodeShape(batch=problem.batch, max_len=problem.max_len, q_heads=problem.q_heads,
                       kv_heads=problem.kv_heads, head_dim=problem.head_dim, dtype=problem.dtype)


@dataclasses.dataclass(frozen=True)
class FixedLengthsProblem(DecodeProblem):
    """A DecodeProblem whose sequence_start/sequence_end are given, not drawn."""

    starts: tuple[int, ...] = ()
    ends: tuple[int, ...] = ()

    def make_inputs(self, seed):
        args, kwargs = super().make_inputs(seed)
        starts = jnp.asarray(self.starts, jnp.int32)
        ends = jnp.asarray(self.ends, jnp.int32)
        return (*args[:3], starts, ends), kwargs


# ---- Numbers against the reference ---------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("features", list(FEATURE_SETS))
def test_every_feature_and_dtype(features, dtype):
    # S = 40 is 2.5 blocks of 16, shared by 1, 2 or 4 splits: the online softmax runs over
    # several blocks, partial first and last blocks, and splits with no block.
    problem = FixedLengthsProblem(batch=4, max_len=40, q_heads=4, kv_heads=2, head_dim=32,
                                  dtype=dtype, starts=(0, 5, 30, 12), ends=(40, 37, 33, 13),
                                  **FEATURE_SETS[features])
    splits = {"float32": 1, "bfloat16": 2, "float16": 4}[dtype]
    config = TritonSplitKVConfig(kv_block_size=16, num_kv_splits=splits)
    seed = list(FEATURE_SETS).index(features) * 3 + DTYPES.index(dtype)
    run_and_compare(problem, VARIANT, config, seed=seed, interpret=True)


@pytest.mark.parametrize("q_heads,kv_heads,block_q_heads", [
    (8, 2, 16),  # GQA: the group of 4 padded to the dot's 16 rows
    (4, 1, 16),  # MQA
    (3, 3, 16),  # MHA
    (34, 2, 16),  # a group of 17 spread over two programs, the second mostly padding
])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_head_layouts(q_heads, kv_heads, block_q_heads, dtype):
    problem = DecodeProblem(batch=2, max_len=50, q_heads=q_heads, kv_heads=kv_heads,
                            head_dim=16, dtype=dtype, random_start=True, sliding_window=30,
                            logits_soft_cap=4.0, sinks=True)
    config = TritonSplitKVConfig(kv_block_size=16, block_q_heads=block_q_heads, num_kv_splits=2)
    for seed in (q_heads, q_heads + 100):
        run_and_compare(problem, VARIANT, config, seed=seed, interpret=True)


SAMPLED_PROBLEM = DecodeProblem(batch=2, max_len=100, q_heads=32, kv_heads=1, head_dim=24,
                                random_start=True, sliding_window=70, logits_soft_cap=5.0,
                                sinks=True)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_sampled_configs_and_default(dtype):
    # G = 32 lets block_q_heads vary; D = 24 is padded to 32 inside the kernel.
    problem = dataclasses.replace(SAMPLED_PROBLEM, dtype=dtype)
    shape = shape_of(problem)
    configs = sample_configs(TritonSplitKVConfig, shape, count=4, seed=DTYPES.index(dtype))
    assert len(configs) == 4 and len(set(configs)) == 4
    for index, config in enumerate([None, *configs]):
        run_and_compare(problem, VARIANT, config, seed=10 * DTYPES.index(dtype) + index,
                        interpret=True)


# ---- Edge cases -----------------------------------------------------------------------------


@pytest.mark.parametrize("sinks", [False, True])
def test_empty_rows_give_zeros(sinks):
    problem = FixedLengthsProblem(batch=4, max_len=40, q_heads=4, kv_heads=2, head_dim=16,
                                  dtype="float32", sinks=sinks,
                                  starts=(0, 7, 40, 3), ends=(0, 7, 40, 35))
    config = TritonSplitKVConfig(kv_block_size=16, num_kv_splits=2)
    out, _, _ = run_and_compare(problem, VARIANT, config, seed=5, interpret=True)
    assert not np.any(np.asarray(out[:3])), "rows with end == start must be exactly zero"
    assert np.all(np.abs(np.asarray(out[3])) > 0)


@pytest.mark.parametrize("window", [16, 17, (15, 0), (16, 2)])
def test_window_on_a_block_boundary(window):
    # end = 48 is a block boundary of 16; window 16 (= (15, 0)) starts exactly at key 32,
    # the first key of block 2; window 17 (= (16, _)) reaches back one key into block 1.
    problem = FixedLengthsProblem(batch=2, max_len=64, q_heads=2, kv_heads=1, head_dim=16,
                                  dtype="float32", sliding_window=window,
                                  starts=(0, 20), ends=(48, 48))
    config = TritonSplitKVConfig(kv_block_size=16, num_kv_splits=2)
    run_and_compare(problem, VARIANT, config, seed=17, interpret=True)


def test_cache_length_not_a_multiple_of_the_block():
    problem = FixedLengthsProblem(batch=2, max_len=37, q_heads=2, kv_heads=1, head_dim=16,
                                  dtype="bfloat16", starts=(0, 5), ends=(37, 33))
    config = TritonSplitKVConfig(kv_block_size=16, num_kv_splits=4)
    run_and_compare(problem, VARIANT, config, seed=3, interpret=True)


def test_single_sequence():
    problem = DecodeProblem(batch=1, max_len=30, q_heads=4, kv_heads=1, head_dim=16,
                            dtype="float16", random_start=True, sinks=True)
    config = TritonSplitKVConfig(kv_block_size=16, num_kv_splits=2)
    for seed in (0, 1):
        run_and_compare(problem, VARIANT, config, seed=seed, interpret=True)
        run_and_compare(problem, VARIANT, seed=seed + 2, interpret=True)


def test_batch_larger_than_splits_and_splits_larger_than_rows():
    # Short rows among long ones: some splits get no block at all and must still write.
    problem = FixedLengthsProblem(batch=5, max_len=96, q_heads=2, kv_heads=2, head_dim=16,
                                  dtype="float32", sinks=True,
                                  starts=(0, 0, 10, 90, 50), ends=(96, 1, 12, 96, 70))
    for splits in (2, 8):
        config = TritonSplitKVConfig(kv_block_size=16, num_kv_splits=splits)
        run_and_compare(problem, VARIANT, config, seed=splits, interpret=True)


def test_out_of_range_lengths_are_clamped_like_the_reference():
    # end > S, start < 0 and start > end: the kernel must stay inside its buffers and, as
    # the reference does, clamp both into [0, S].
    problem = FixedLengthsProblem(batch=4, max_len=32, q_heads=2, kv_heads=1, head_dim=16,
                                  dtype="float32", sliding_window=40,
                                  starts=(-5, 0, 20, -100), ends=(50, 1000, 10, 8))
    config = TritonSplitKVConfig(kv_block_size=16, num_kv_splits=2)
    run_and_compare(problem, VARIANT, config, seed=9, interpret=True)


def test_rank4_query_and_explicit_scale():
    problem = DecodeProblem(batch=2, max_len=20, q_heads=2, kv_heads=1, head_dim=16,
                            dtype="float32")
    args, _ = problem.make_inputs(4)
    query4 = args[0][:, None]
    out = kernels.decode_attention(query4, *args[1:], softmax_scale=0.3, variant=VARIANT,
                                   interpret=True)
    reference = kernels.decode_attention(query4, *args[1:], softmax_scale=0.3,
                                         variant="reference")
    assert out.shape == query4.shape
    np.testing.assert_allclose(np.asarray(out), np.asarray(reference), rtol=1e-4, atol=1e-5)


def test_an_unwritten_output_shows_as_nan():
    """The poisoned outputs work: a merge grid one head short leaves that head NaN."""
    problem = DecodeProblem(batch=2, max_len=20, q_heads=2, kv_heads=1, head_dim=16,
                            dtype="float32")
    args, _ = problem.make_inputs(0)
    decode_args, shape, _ = decode_inputs.prepare(*args)
    plan = triton_splitkv.launch_plan(decode_args, triton_splitkv.heuristic(shape))
    short = dataclasses.replace(plan, merge_grid=(2, 1))
    sinks = jnp.zeros((2,), jnp.float32)
    out = np.asarray(triton_splitkv._interpreted(short, decode_args, decode_args.query, sinks))
    assert np.all(np.isnan(out[:, 1])) and np.all(np.isfinite(out[:, 0]))


# ---- Configs and errors -------------------------------------------------------------------


def test_default_config_is_valid_for_every_supported_shape():
    for head_dim, dtype, group, kv_heads, max_len, batch in itertools.product(
            (16, 24, 64, 80, 128, 256), DTYPES, (1, 3, 4, 8, 17, 64), (1, 8), (1, 5, 100, 8192),
            (1, 8, 64)):
        shape = DecodeShape(batch=batch, max_len=max_len, q_heads=group * kv_heads,
                            kv_heads=kv_heads, head_dim=head_dim, dtype=dtype)
        config = kernels.get_variant("decode", VARIANT).default_config(shape)
        assert config.invalid_reason(shape) is None, (shape, config)
        # Defaults run on every supported GPU, not only on those with the most shared memory.
        assert config.shared_memory_bytes(shape) <= gpu_limits.PORTABLE_SHARED_MEMORY_BYTES


def test_validity_rules():
    long = DecodeShape(batch=2, max_len=1000, q_heads=4, kv_heads=1, head_dim=256,
                       dtype="float32")
    too_big = TritonSplitKVConfig(kv_block_size=64, block_q_heads=16, num_kv_splits=1,
                                  num_warps=4, num_stages=4)
    assert "shared memory" in too_big.invalid_reason(long)
    spilling = TritonSplitKVConfig(kv_block_size=16, num_kv_splits=1, num_warps=2, num_stages=1)
    assert "registers" in spilling.invalid_reason(long)
    assert spilling.replace(num_warps=8).invalid_reason(long) is None
    assert "pure padding" in TritonSplitKVConfig(block_q_heads=32).invalid_reason(long)

    short = dataclasses.replace(long, max_len=20, head_dim=16)
    assert "kv_block_size" in TritonSplitKVConfig(kv_block_size=64).invalid_reason(short)
    assert "num_kv_splits" in TritonSplitKVConfig(
        kv_block_size=16, num_kv_splits=4).invalid_reason(short)
    clamped = TritonSplitKVConfig(kv_block_size=128, block_q_heads=64, num_kv_splits=32).clamp(
        short)
    assert (clamped.kv_block_size, clamped.block_q_heads, clamped.num_kv_splits) == (32, 16, 1)
    assert clamped.invalid_reason(short) is None
    for field, value in (("kv_block_size", 24), ("kv_block_size", 8), ("block_q_heads", 8),
                         ("num_kv_splits", 3), ("num_warps", 3), ("num_stages", 0)):
        with pytest.raises(ValueError, match=field):
            TritonSplitKVConfig(**{field: value})


def test_shared_memory_rule_allows_the_largest_gpu_and_check_judges_each():
    """The rule admits what an H100 can hold; `attnbench check` (cuda_check) tells which GPUs
    can launch it; the heuristic's fitting keeps to what every GPU has."""
    from attnbench.tuner.check import cuda_check

    problem = DecodeProblem(batch=2, max_len=1024, q_heads=16, kv_heads=2, head_dim=128,
                            dtype="bfloat16")
    shape = shape_of(problem)
    big = TritonSplitKVConfig(kv_block_size=128, block_q_heads=16, num_kv_splits=2,
                              num_warps=8, num_stages=3)
    assert (gpu_limits.PORTABLE_SHARED_MEMORY_BYTES < big.shared_memory_bytes(shape)
            <= gpu_limits.MAX_SHARED_MEMORY_BYTES)
    assert big.invalid_reason(shape) is None
    assert "shared memory" in big.replace(num_stages=5).invalid_reason(shape)
    fitted = triton_splitkv.fit_resources(big, shape)
    assert fitted.invalid_reason(shape) is None
    assert fitted.shared_memory_bytes(shape) <= gpu_limits.PORTABLE_SHARED_MEMORY_BYTES
    assert triton_splitkv.fit_resources(big, shape, gpu_limits.MAX_SHARED_MEMORY_BYTES) == big

    on_h100 = cuda_check.check_config(problem, VARIANT, big, cuda_check.parse_target("sm_90"))
    assert on_h100.status == "ok", on_h100.reason
    on_l4 = cuda_check.check_config(problem, VARIANT, big, cuda_check.parse_target("sm_89"))
    assert on_l4.status == "unlaunchable" and "shared memory" in on_l4.reason


def test_invalid_config_raises_a_clear_error():
    problem = DecodeProblem(batch=2, max_len=20, q_heads=4, kv_heads=1, head_dim=256,
                            dtype="float32")
    args, _ = problem.make_inputs(0)
    with pytest.raises(ValueError, match="kv_block_size must be a power of two >= 16"):
        kernels.decode_attention(*args, variant=VARIANT, config={"kv_block_size": 24},
                                 interpret=True)
    with pytest.raises(ValueError, match="shared memory"):
        kernels.decode_attention(*args, variant=VARIANT, interpret=True, config={
            "kv_block_size": 64, "num_stages": 5, "num_kv_splits": 1})
    with pytest.raises(ValueError, match="unknown tunable"):
        kernels.decode_attention(*args, variant=VARIANT, config={"block_k": 16}, interpret=True)
    decode_args, shape, _ = decode_inputs.prepare(*args)
    with pytest.raises(ValueError, match="invalid config"):
        triton_splitkv.decode_attention_triton(
            decode_args, TritonSplitKVConfig(block_q_heads=64), interpret=True)


def test_needs_interpret_on_cpu():
    problem = DecodeProblem(batch=1, max_len=16, q_heads=2, kv_heads=1, head_dim=16)
    args, _ = problem.make_inputs(0)
    with pytest.raises(kernels.UnsupportedError, match="interpret=True"):
        kernels.decode_attention(*args, variant=VARIANT)


# ---- The GPU path lowers for CUDA -----------------------------------------------------------


def test_exports_for_cuda():
    """jax.export for CUDA compiles both kernels (Triton -> PTX -> ptxas, sm_90) on this host,
    also after an interpreted run in the same process."""
    tiny = DecodeProblem(batch=1, max_len=16, q_heads=2, kv_heads=1, head_dim=16)
    run_and_compare(tiny, VARIANT, seed=0, interpret=True)
    batch, max_len, q_heads, kv_heads, head_dim = 2, 256, 8, 2, 128
    query = jax.ShapeDtypeStruct((batch, q_heads, head_dim), jnp.bfloat16)
    cache = jax.ShapeDtypeStruct((batch, max_len, kv_heads, head_dim), jnp.bfloat16)
    lengths = jax.ShapeDtypeStruct((batch,), jnp.int32)
    sinks = jax.ShapeDtypeStruct((q_heads,), jnp.float32)

    def decode(query, key, value, start, end, sinks):
        args, shape, _ = decode_inputs.prepare(query, key, value, start, end,
                                               sliding_window=100, logits_soft_cap=30.0,
                                               sinks=sinks)
        config = kernels.get_variant("decode", VARIANT).default_config(shape)
        return triton_splitkv.decode_attention_triton(args, config, compute_capability=90)

    exported = jax.export.export(
        jax.jit(decode), platforms=["cuda"],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("triton_kernel_call")],
    )(query, cache, cache, lengths, lengths, sinks)
    module = exported.mlir_module()
    assert module.count("stablehlo.custom_call @triton_kernel_call") == 2  # stage 1 and merge
    assert exported.out_avals[0].shape == (batch, q_heads, head_dim)
    assert exported.out_avals[0].dtype == jnp.bfloat16
