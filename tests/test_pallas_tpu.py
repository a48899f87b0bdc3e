"""The Pallas TPU variants of both operators, run on the CPU in Pallas' TPU interpret mode.

TPU interpret mode simulates VMEM/SMEM, the BlockSpec pipeline (a block is written back
only when its index changes) and fills fresh buffers with NaN; reads outside a buffer raise.
It is slow (seconds per call), so shapes are tiny and each case runs once or twice.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnbench import kernels
from attnbench.kernels.decode import pallas_tpu as decode_tpu
from attnbench.kernels.paged import pallas_tpu as paged_tpu
from attnbench.kernels import DecodeShape, PagedShape
from attnbench.kernels.decode import inputs as decode_inputs
from attnbench.kernels.decode.problem import DecodeProblem
from attnbench.kernels.paged import inputs as paged_inputs
from attnbench.kernels.paged.problem import PagedProblem
from attnbench.kernels.tunables import cdiv, sample_configs
from checks import run_and_compare

VARIANT = "pallas_tpu"


def _run(problem, config=None, seed=0):
    return run_and_compare(problem, VARIANT, config, seed=seed, interpret=True)


def _shape_of(problem):
    return problem.shape(0)


# ---- decode_attention -------------------------------------------------------------------------

DECODE_BASE = DecodeProblem(batch=3, max_len=256, q_heads=4, kv_heads=2, head_dim=128,
                            dtype="float32", random_start=True)


@dataclasses.dataclass(frozen=True)
class DecodeWithEmptyRows(DecodeProblem):
    """Row 0 has start == end, row 1 has end == 0: both must give zeros."""

    def make_inputs(self, seed):
        (query, key, value, start, end), kwargs = super().make_inputs(seed)
        start = start.at[0].set(end[0])
        start, end = start.at[1].set(0), end.at[1].set(0)
        return (query, key, value, start, end), kwargs


def test_decode_default_and_sampled_configs():
    shape = _shape_of(DECODE_BASE)
    configs = [None] + sample_configs(decode_tpu.PallasTpuDecodeConfig, shape, 2, seed=1)
    assert len(configs) == 3
    for seed, config in enumerate(configs):
        _run(DECODE_BASE, config, seed=seed)


@pytest.mark.parametrize("features", [
    {"sliding_window": 40},
    {"sliding_window": (70, 3)},
    {"logits_soft_cap": 5.0},
    {"sinks": True},
], ids=["window_int", "window_tuple", "soft_cap", "sinks"])
def test_decode_each_feature(features):
    _run(dataclasses.replace(DECODE_BASE, **features),
         decode_tpu.PallasTpuDecodeConfig(kv_block_size=64, heads_per_block=2))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_decode_all_features_each_dtype(dtype):
    problem = dataclasses.replace(DECODE_BASE, dtype=dtype, sliding_window=50,
                                  logits_soft_cap=10.0, sinks=True)
    _run(problem, decode_tpu.PallasTpuDecodeConfig(kv_block_size=128, heads_per_block=2))


@pytest.mark.parametrize("q_heads,kv_heads,heads_per_block", [(16, 1, 8), (2, 2, 1)],
                         ids=["mqa_split_group", "mha"])
def test_decode_mqa_mha(q_heads, kv_heads, heads_per_block):
    _run(dataclasses.replace(DECODE_BASE, q_heads=q_heads, kv_heads=kv_heads, sinks=True),
         decode_tpu.PallasTpuDecodeConfig(kv_block_size=128, heads_per_block=heads_per_block))


@pytest.mark.parametrize("sinks", [False, True])
def test_decode_empty_rows_give_zeros(sinks):
    problem = DecodeWithEmptyRows(**dataclasses.asdict(DECODE_BASE) | {"sinks": sinks})
    out, _, _ = _run(problem, decode_tpu.PallasTpuDecodeConfig(kv_block_size=64,
                                                               heads_per_block=2))
    assert not np.any(np.asarray(out[:2]))


def test_decode_short_head_dim_and_partial_last_block():
    # D = 64 with Hkv > 1 takes the transposed layout; S = 200 leaves a partial last block
    # whose padding (NaN in interpret mode) must not leak.
    problem = DecodeProblem(batch=2, max_len=200, q_heads=4, kv_heads=2, head_dim=64,
                            dtype="bfloat16", lengths="fixed", sliding_window=150, sinks=True)
    _run(problem, decode_tpu.PallasTpuDecodeConfig(kv_block_size=64, heads_per_block=2))


def test_decode_out_of_range_lengths_stay_in_bounds():
    # Reads outside a buffer raise in interpret mode, so this checks the clamps.
    args, _ = DECODE_BASE.make_inputs(0)
    query, key, value, _, _ = args
    start = jnp.asarray([-5, 100, 3], jnp.int32)
    end = jnp.asarray([10_000, 50, -2], jnp.int32)
    out = kernels.decode_attention(query, key, value, start, end, variant=VARIANT,
                                   interpret=True)
    assert np.all(np.isfinite(np.asarray(out)))


@pytest.mark.parametrize("dtype,config", [
    ("float32", {"kv_block_size": 100, "heads_per_block": 2}),
    ("bfloat16", {"kv_block_size": 8, "heads_per_block": 2}),
])
def test_decode_invalid_config_raises(dtype, config):
    args, kwargs = dataclasses.replace(DECODE_BASE, dtype=dtype).make_inputs(0)
    with pytest.raises(ValueError, match="sublane tile"):
        kernels.decode_attention(*args, variant=VARIANT, config=config, interpret=True,
                                 **kwargs)


def test_decode_rules():
    shape = DecodeShape(batch=8, max_len=4096, q_heads=32, kv_heads=2, head_dim=128,
                               dtype="bfloat16")
    config = decode_tpu.PallasTpuDecodeConfig
    assert "sublane tile" in config(kv_block_size=8, heads_per_block=16).invalid_reason(shape)
    assert config(kv_block_size=16, heads_per_block=16).invalid_reason(shape) is None
    assert "sublane tile" in config(kv_block_size=512, heads_per_block=8).invalid_reason(shape)
    assert "VMEM" in config(kv_block_size=1 << 16, heads_per_block=16).invalid_reason(shape)
    f32 = dataclasses.replace(shape, dtype="float32")
    assert config(kv_block_size=8, heads_per_block=8).invalid_reason(f32) is None


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_decode_heuristic_is_valid_everywhere(dtype):
    for max_len in (1, 7, 100, 4096, 131072):
        for q_heads, kv_heads in ((1, 1), (8, 8), (12, 4), (28, 4), (64, 8), (128, 1)):
            for head_dim in (64, 96, 128, 256):
                shape = DecodeShape(batch=4, max_len=max_len, q_heads=q_heads,
                                           kv_heads=kv_heads, head_dim=head_dim, dtype=dtype)
                config = kernels.get_variant("decode", VARIANT).default_config(shape)
                assert config.invalid_reason(shape) is None, (shape, config)


# ---- ragged_paged_attention ------------------------------------------------------------------

PAGED_MIXED = PagedProblem(num_seqs=4, max_len=64, q_heads=4, kv_heads=2, head_dim=128,
                           page_size=16, dtype="float32", prefill_fraction=0.5,
                           prefill_chunk=20, padding_tokens=3, inactive_seqs=1)


def test_paged_default_and_sampled_configs():
    shape = _shape_of(PAGED_MIXED)
    configs = [None] + sample_configs(paged_tpu.PallasTpuPagedConfig, shape, 2, seed=3)
    assert len(configs) == 3
    for seed, config in enumerate(configs):
        _run(PAGED_MIXED, config, seed=seed)


# Mixed batches with padding rows and inactive sequences are PAGED_MIXED itself.
@pytest.mark.parametrize("batch", [
    {"prefill_fraction": 0.0, "padding_tokens": 5},
    {"prefill_fraction": 1.0, "prefill_chunk": 64, "padding_tokens": 0},
], ids=["decode_only", "prefill_only"])
def test_paged_batch_kinds(batch):
    _run(dataclasses.replace(PAGED_MIXED, **batch),
         paged_tpu.PallasTpuPagedConfig(pages_per_block=2, query_rows_per_block=8))


# The window as an int and the soft cap alone are in test_paged_all_features_each_dtype.
@pytest.mark.parametrize("features", [
    {"sliding_window": (20, 0)},
    {"sinks": True},
], ids=["window_tuple", "sinks"])
def test_paged_each_feature(features):
    _run(dataclasses.replace(PAGED_MIXED, **features),
         paged_tpu.PallasTpuPagedConfig(pages_per_block=1, query_rows_per_block=16))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_paged_all_features_each_dtype(dtype):
    problem = dataclasses.replace(PAGED_MIXED, dtype=dtype, sliding_window=24,
                                  logits_soft_cap=10.0, sinks=True)
    _run(problem, paged_tpu.PallasTpuPagedConfig(pages_per_block=2, query_rows_per_block=16))


@pytest.mark.parametrize("q_heads,kv_heads", [(4, 1), (2, 2)], ids=["mqa", "mha"])
def test_paged_mqa_mha(q_heads, kv_heads):
    _run(dataclasses.replace(PAGED_MIXED, q_heads=q_heads, kv_heads=kv_heads, sinks=True))


def test_paged_page_size_8_and_short_head_dim():
    # page_size 8 with bfloat16 allows one page per block only; D = 64 takes the
    # transposed layout.
    problem = dataclasses.replace(PAGED_MIXED, page_size=8, head_dim=64, dtype="bfloat16",
                                  max_len=40, sliding_window=13)
    config = paged_tpu.PallasTpuPagedConfig(pages_per_block=1, query_rows_per_block=16)
    _run(problem, config)
    _run(dataclasses.replace(problem, dtype="float32"),
         paged_tpu.PallasTpuPagedConfig(pages_per_block=4, query_rows_per_block=8))


def test_paged_out_of_range_values_stay_in_bounds():
    args, _ = PAGED_MIXED.make_inputs(0)
    queries, kv_pages, context_lens, page_table, query_start_loc, _ = args
    page_table = page_table.at[0, 0].set(-7).at[1, 1].set(10**6)
    context_lens = context_lens.at[2].set(10**5)
    query_start_loc = query_start_loc.at[-1].set(10**4)
    out = kernels.ragged_paged_attention(
        queries, kv_pages, context_lens, page_table, query_start_loc,
        jnp.asarray(99, jnp.int32), variant=VARIANT, interpret=True)
    assert np.all(np.isfinite(np.asarray(out)))


@pytest.mark.parametrize("config,words", [
    ({"pages_per_block": 2, "query_rows_per_block": 12}, "sublane tile"),
    ({"pages_per_block": 2, "query_rows_per_block": 16, "_dtype": "bfloat16",
      "_page_size": 8}, "page_size"),
])
def test_paged_invalid_config_raises(config, words):
    config = dict(config)
    problem = dataclasses.replace(PAGED_MIXED, dtype=config.pop("_dtype", "float32"),
                                  page_size=config.pop("_page_size", 16))
    args, kwargs = problem.make_inputs(0)
    with pytest.raises(ValueError, match=words):
        kernels.ragged_paged_attention(*args, variant=VARIANT, config=config, interpret=True,
                                       **kwargs)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_paged_heuristic_is_valid_everywhere(dtype):
    for num_tokens in (1, 5, 300, 8192):
        for page_size in (8, 16, 32, 128):
            for q_heads, kv_heads in ((8, 8), (28, 4), (64, 8), (16, 1)):
                for head_dim in (64, 128, 256):
                    shape = PagedShape(
                        num_tokens=num_tokens, max_seqs=64, pages_per_seq=64,
                        page_size=page_size, num_pages=4096, q_heads=q_heads,
                        kv_heads=kv_heads, head_dim=head_dim, dtype=dtype)
                    config = kernels.get_variant("paged", VARIANT).default_config(shape)
                    assert config.invalid_reason(shape) is None, (shape, config)


def test_paged_work_list_covers_every_row_once():
    problem = dataclasses.replace(PAGED_MIXED, prefill_chunk=13, padding_tokens=11)
    args, kwargs = problem.make_inputs(5)
    normalized, _ = paged_inputs.prepare(*args, **kwargs)
    rows, kv_rows, kv_blocks = 8, 32, 2
    work = np.asarray(paged_tpu.work_list(normalized, rows, kv_rows, kv_blocks))
    work = work.reshape(-1, paged_tpu.NUM_FIELDS)
    owner = np.full(problem.num_tokens, -1)
    for item in work:
        for row in range(item[paged_tpu.ROW_LO], item[paged_tpu.ROW_HI]):
            assert owner[row] == -1, "a row is owned twice"
            owner[row] = item[paged_tpu.SEQUENCE]
    starts = np.asarray(args[4])
    real = int(starts[problem.num_seqs])
    expected = np.searchsorted(starts, np.arange(real), side="right") - 1
    np.testing.assert_array_equal(owner[:real], expected)
    assert np.all(owner[real:] == -1)
    # Each query block opens with exactly one first item and closes with one last item.
    blocks = cdiv(problem.num_tokens, rows)
    firsts = work[work[:, paged_tpu.FIRST_OF_BLOCK] == 1, paged_tpu.QUERY_BLOCK]
    lasts = work[work[:, paged_tpu.LAST_OF_BLOCK] == 1, paged_tpu.QUERY_BLOCK]
    np.testing.assert_array_equal(firsts, np.arange(blocks))
    np.testing.assert_array_equal(lasts, np.arange(blocks))


# ---- Lowering for a real TPU (Mosaic), without one ---------------------------------------------


def _export_for_tpu(function, *specs):
    """Lowers `function` for TPU v5e through jax.export (Mosaic lowering; no libtpu needed)."""
    device = jax.sharding.AbstractDevice(device_kind="TPU v5 lite", num_cores=1, platform="tpu")
    mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)
    with jax.sharding.use_abstract_mesh(mesh):
        exported = jax.export.export(jax.jit(function), platforms=["tpu"])(*specs)
    return exported.mlir_module()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_both_lower_for_tpu(dtype):
    def decode(query, key, value, start, end, sinks):
        args, shape, _ = decode_inputs.prepare(query, key, value, start, end, sliding_window=64,
                                               logits_soft_cap=30.0, sinks=sinks)
        return decode_tpu.pallas_tpu_decode(args, decode_tpu.heuristic(shape))

    def paged(queries, kv_pages, context_lens, page_table, query_start_loc, num_seqs, sinks):
        args, shape = paged_inputs.prepare(queries, kv_pages, context_lens, page_table,
                                           query_start_loc, num_seqs, sliding_window=64,
                                           logits_soft_cap=30.0, sinks=sinks)
        config = paged_tpu.PallasTpuPagedConfig(pages_per_block=4, query_rows_per_block=32)
        assert config.invalid_reason(shape) is None
        return paged_tpu.pallas_tpu_paged(args, config)

    spec = jax.ShapeDtypeStruct
    i32 = jnp.int32
    module = _export_for_tpu(
        decode, spec((2, 8, 128), dtype), spec((2, 512, 2, 128), dtype),
        spec((2, 512, 2, 128), dtype), spec((2,), i32), spec((2,), i32),
        spec((8,), jnp.float32))
    assert "tpu_custom_call" in module
    module = _export_for_tpu(
        paged, spec((40, 8, 128), dtype), spec((64, 16, 4, 128), dtype), spec((8,), i32),
        spec((8, 8), i32), spec((9,), i32), spec((), i32), spec((8,), jnp.float32))
    assert "tpu_custom_call" in module


@pytest.mark.parametrize("topology", ["v5e:2x2", "v6e:2x2"])
def test_both_compile_for_tpu_with_libtpu(topology):
    """The full Mosaic compile (layouts, tiling, scoped VMEM), on a CPU host through libtpu's
    compile-only TPU devices. libtpu comes with the `test` extra; without it this fails
    loudly, since a TPU kernel that stops compiling must fail CI."""
    import libtpu  # noqa: F401
    from jax.experimental import topologies

    device = topologies.get_topology_desc(topology, "tpu").devices[0]
    sharding = jax.sharding.SingleDeviceSharding(device)

    def spec(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

    i32 = jnp.int32
    with jax.default_device(device):
        for dtype in ("float32", "bfloat16", "float16"):
            for config in (None, decode_tpu.PallasTpuDecodeConfig(128, 4)):
                def decode(query, key, value, start, end, sinks, config=config):
                    args, shape, _ = decode_inputs.prepare(
                        query, key, value, start, end, sliding_window=64,
                        logits_soft_cap=30.0, sinks=sinks)
                    chosen = config or decode_tpu.heuristic(shape)
                    assert chosen.invalid_reason(shape) is None
                    return decode_tpu.pallas_tpu_decode(args, chosen)

                jax.jit(decode).lower(
                    spec((2, 8, 128), dtype), spec((2, 1024, 2, 128), dtype),
                    spec((2, 1024, 2, 128), dtype), spec((2,), i32), spec((2,), i32),
                    spec((8,), jnp.float32)).compile()
            for config in (None, paged_tpu.PallasTpuPagedConfig(4, 32)):
                def paged(queries, kv_pages, context_lens, page_table, query_start_loc,
                          num_seqs, sinks, config=config):
                    args, shape = paged_inputs.prepare(
                        queries, kv_pages, context_lens, page_table, query_start_loc,
                        num_seqs, sliding_window=64, logits_soft_cap=30.0, sinks=sinks)
                    chosen = config or paged_tpu.heuristic(shape)
                    assert chosen.invalid_reason(shape) is None
                    return paged_tpu.pallas_tpu_paged(args, chosen)

                jax.jit(paged).lower(
                    spec((40, 8, 128), dtype), spec((64, 16, 4, 128), dtype),
                    spec((8,), i32), spec((8, 8), i32), spec((9,), i32), spec((), i32),
                    spec((8,), jnp.float32)).compile()
