"""The XLA decode variants (xla_blocked, xla_dense) against the reference, on tiny shapes."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from checks import run_and_compare

from attnbench import kernels
from attnbench.kernels import registry
from attnbench.kernels.decode.xla_blocked import XlaBlockedConfig
from attnbench.kernels import DecodeShape
from attnbench.kernels.tunables import sample_configs
from attnbench.tuner.measure.accuracy import judge
from attnbench.kernels.decode.problem import DecodeProblem
from attnbench.kernels.decode import inputs as decode_inputs

VARIANTS = ("xla_blocked", "xla_dense")

# S = 300 is no multiple of any block size, so the last block always hangs past the cache.
SMALL = dict(batch=3, max_len=300, q_heads=4, kv_heads=2, head_dim=16)


@dataclasses.dataclass(frozen=True)
class FixedLengths(DecodeProblem):
    """A decode problem whose rows have the given [start, end) instead of random lengths."""

    starts: tuple[int, ...] = ()
    ends: tuple[int, ...] = ()

    def make_inputs(self, seed: int):
        args, kwargs = super().make_inputs(seed)
        start = jnp.asarray(self.starts, jnp.int32)
        end = jnp.asarray(self.ends, jnp.int32)
        return (*args[:3], start, end), kwargs


def shape_of(problem: DecodeProblem) -> DecodeShape:
    args, kwargs = problem.make_inputs(0)
    _, shape, _ = decode_inputs.prepare(*args, **kwargs)
    return shape


def config_class(variant: str):
    return registry.get_variant("decode", variant).config_class


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("seed", [0, 1])
def test_default_and_sampled_configs(variant, seed):
    problem = DecodeProblem(**SMALL, dtype="bfloat16", random_start=True, min_len=1,
                            sliding_window=90, logits_soft_cap=20.0, sinks=True)
    shape = shape_of(problem)
    configs = [None] + sample_configs(config_class(variant), shape, 3, seed)
    assert len(configs) == 4, "the config space has too few valid configs for this shape"
    for index, config in enumerate(configs):
        run_and_compare(problem, variant, config, seed=10 * seed + index)


FEATURES = {
    "none": {},
    "window_int": dict(sliding_window=37),
    "window_tuple": dict(sliding_window=(36, 5)),
    "soft_cap": dict(logits_soft_cap=3.0),
    "sinks": dict(sinks=True),
    "all": dict(sliding_window=(64, 0), logits_soft_cap=10.0, sinks=True),
}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("features", list(FEATURES))
def test_features(variant, features):
    problem = DecodeProblem(**SMALL, dtype="float32", random_start=True, **FEATURES[features])
    run_and_compare(problem, variant, seed=3)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_dtypes(variant, dtype):
    problem = DecodeProblem(**SMALL, dtype=dtype, random_start=True, sliding_window=100,
                            sinks=True)
    for seed in (4, 5):
        run_and_compare(problem, variant, seed=seed)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("heads", [(4, 2), (4, 1), (2, 2)], ids=["gqa", "mqa", "mha"])
def test_head_layouts(variant, heads):
    q_heads, kv_heads = heads
    problem = DecodeProblem(batch=2, max_len=130, q_heads=q_heads, kv_heads=kv_heads,
                            head_dim=32, dtype="bfloat16", random_start=True)
    run_and_compare(problem, variant, seed=6)


BLOCK = dict(kv_block_size=64, blocks_per_step=2)


@pytest.mark.parametrize("contraction",
                         ["fused_reduce", "head_major_dot", "key_major_dot", "block_diagonal_dot"])
def test_blocked_edges(contraction):
    """Rows chosen against 64-position blocks, S = 300 (the last block is partial)."""
    config = dict(BLOCK, contraction=contraction)
    # start > 0 mid-block; one row ending on a block boundary; the last, partial block;
    # a row inside one block; an empty row; a full row.
    problem = FixedLengths(batch=6, max_len=300, q_heads=4, kv_heads=2, head_dim=16,
                           dtype="float32", starts=(70, 0, 250, 130, 5, 0),
                           ends=(128, 192, 300, 140, 5, 300))
    out, _, _ = run_and_compare(problem, "xla_blocked", config, seed=7)
    assert not np.any(np.asarray(out[4])), "an empty row must give zeros"
    # The window [p - 63, p] of a row ending at 192 is exactly the block [128, 192).
    windowed = dataclasses.replace(problem, sliding_window=64)
    run_and_compare(windowed, "xla_blocked", config, seed=8)
    # ... and with one more position, it reaches one key into the block before.
    run_and_compare(dataclasses.replace(problem, sliding_window=65), "xla_blocked", config,
                    seed=9)


@pytest.mark.parametrize("variant", VARIANTS)
def test_empty_rows_give_zeros(variant):
    problem = FixedLengths(batch=3, max_len=70, q_heads=4, kv_heads=2, head_dim=16,
                           dtype="bfloat16", starts=(0, 33, 69), ends=(0, 33, 69), sinks=True)
    out, reference, _ = run_and_compare(problem, variant, seed=10)
    assert not np.any(np.asarray(out, np.float32))
    mixed = dataclasses.replace(problem, starts=(0, 10, 69), ends=(0, 60, 69), sinks=False)
    out, _, _ = run_and_compare(mixed, variant, seed=11)
    assert not np.any(np.asarray(out[0], np.float32)) and not np.any(np.asarray(out[2], np.float32))
    assert np.any(np.asarray(out[1], np.float32))


@pytest.mark.parametrize("variant", ("reference", *VARIANTS))
def test_nan_in_a_valid_key_reaches_its_row_and_a_masked_one_nothing(variant):
    problem = FixedLengths(batch=3, max_len=70, q_heads=4, kv_heads=2, head_dim=16,
                           dtype="float32", starts=(0, 10, 5), ends=(70, 60, 40), sinks=True)
    args, kwargs = problem.make_inputs(17)
    run = jax.jit(lambda *a: kernels.decode_attention(*a, variant=variant, **kwargs))
    clean = np.asarray(run(*args))
    # Position 30 is inside row 1's keys [10, 60); position 50 is past row 2's end (40).
    key = args[1].at[1, 30].set(jnp.nan).at[2, 50].set(jnp.nan)
    out = np.asarray(run(args[0], key, *args[2:]))
    assert np.all(np.isnan(out[1]))
    np.testing.assert_array_equal(out[[0, 2]], clean[[0, 2]])


@pytest.mark.parametrize("variant", VARIANTS)
def test_single_sequence(variant):
    problem = DecodeProblem(batch=1, max_len=200, q_heads=4, kv_heads=2, head_dim=16,
                            dtype="bfloat16", random_start=True, sliding_window=50)
    run_and_compare(problem, variant, seed=12)


def test_batch_larger_than_splits_and_step_width():
    problem = DecodeProblem(batch=7, max_len=150, q_heads=4, kv_heads=2, head_dim=16,
                            dtype="float32", lengths="long_tail", random_start=True)
    for blocks_per_step, num_kv_splits in ((1, 1), (2, 3), (3, 2), (1, 4)):
        config = dict(kv_block_size=64, blocks_per_step=blocks_per_step,
                      num_kv_splits=num_kv_splits)
        run_and_compare(problem, "xla_blocked", config, seed=13 + blocks_per_step)


@pytest.mark.parametrize("variant", VARIANTS)
def test_query_rank_4(variant):
    args, kwargs = DecodeProblem(**SMALL, dtype="bfloat16").make_inputs(14)
    query = args[0]
    rank3 = kernels.decode_attention(*args, variant=variant, **kwargs)
    rank4 = kernels.decode_attention(query[:, None], *args[1:], variant=variant, **kwargs)
    assert rank4.shape == (query.shape[0], 1) + query.shape[1:]
    np.testing.assert_array_equal(np.asarray(rank4[:, 0], np.float32),
                                  np.asarray(rank3, np.float32))


@pytest.mark.parametrize("variant", VARIANTS)
def test_out_of_range_lengths_do_not_crash(variant):
    """Unspecified results, but finite and computed without reading outside the cache."""
    args, kwargs = DecodeProblem(**SMALL, dtype="float32").make_inputs(15)
    start = jnp.asarray([-5, 290, 10], jnp.int32)
    end = jnp.asarray([400, 1000, 5], jnp.int32)  # past S, far past S, before start
    call = jax.jit(lambda *a: kernels.decode_attention(*a, variant=variant, sliding_window=30,
                                                       sinks=kwargs.get("sinks")))
    out = np.asarray(call(*args[:3], start, end))
    assert np.all(np.isfinite(out))
    # In-range rows next to the bad ones are still right.
    good_end = jnp.asarray([300, 300, 5], jnp.int32)
    good_start = jnp.asarray([0, 290, 5], jnp.int32)
    reference = kernels.decode_attention(*args[:3], good_start, good_end, variant="reference",
                                         sliding_window=30)
    assert judge(out[1], reference[1], "float32").ok


def test_invalid_configs_raise_clear_errors():
    args, kwargs = DecodeProblem(**SMALL, dtype="float32").make_inputs(16)
    bad = [
        ("xla_blocked", dict(kv_block_size=100), "kv_block_size"),
        ("xla_blocked", dict(blocks_per_step=0), "blocks_per_step"),
        ("xla_blocked", dict(num_kv_splits=-1), "num_kv_splits"),
        ("xla_blocked", dict(contraction="einsum"), "contraction"),
        ("xla_blocked", dict(slice_as_bits="yes"), "slice_as_bits"),
        ("xla_blocked", dict(block_size=64), "unknown tunable"),
        ("xla_dense", dict(contraction="fused_reduce", precision="dot_accumulates_f32"),
         "upcast_first"),
        ("xla_dense", dict(weight_dtype="float64"), "weight_dtype"),
    ]
    for variant, config, words in bad:
        with pytest.raises(ValueError, match=words):
            kernels.decode_attention(*args, variant=variant, config=config)
    shape = shape_of(DecodeProblem(**SMALL))
    assert "exceeds" in XlaBlockedConfig(kv_block_size=1024).invalid_reason(shape)
    assert XlaBlockedConfig(kv_block_size=1024).clamp(shape).invalid_reason(shape) is None


@pytest.mark.parametrize("variant", VARIANTS)
def test_heuristic_is_valid_for_many_shapes(variant):
    chosen = registry.get_variant("decode", variant)
    for batch, max_len in [(1, 1), (1, 7), (2, 64), (3, 300), (8, 8192), (64, 100_000)]:
        shape = DecodeShape(batch=batch, max_len=max_len, q_heads=8, kv_heads=2, head_dim=64,
                            dtype="bfloat16")
        assert chosen.default_config(shape).invalid_reason(shape) is None


def test_defaults_point_at_xla_variants():
    assert registry.DEFAULT_VARIANT[("decode", "cpu")][-1] in VARIANTS
