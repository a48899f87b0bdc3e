"""The Triton ragged paged attention variant against the reference.

Kernels run under Triton's CPU interpreter (interpret=True: the same kernels and launch code
as on a GPU); the GPU path is checked to lower for CUDA on this CPU-only host.
"""

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnbench import kernels
from attnbench.kernels import gpu_limits
from attnbench.kernels.paged import triton_paged
from attnbench.kernels.paged.triton_paged import TritonPagedConfig, heuristic
from attnbench.kernels.tunables import sample_configs
from attnbench.tuner.measure.accuracy import judge
from attnbench.kernels.paged.problem import PagedProblem
from attnbench.kernels.paged import inputs as paged_inputs
from attnbench.kernels import PagedShape
from checks import run_and_compare

VARIANT = "triton"
# Tiny shapes: the interpreter runs every program in Python.
SMALL = dict(q_heads=4, kv_heads=2, head_dim=32)


def shape_of(problem: PagedProblem, seed: int = 0):
    args, kwargs = problem.make_inputs(seed)
    return paged_inputs.prepare(*args, **kwargs)[1]


MIXED = PagedProblem(num_seqs=3, max_len=40, page_size=16, dtype="float32",
                     prefill_fraction=0.5, prefill_chunk=8, padding_tokens=3, inactive_seqs=1,
                     **SMALL)


def test_default_config_and_sampled_configs():
    shape = shape_of(MIXED)
    configs = [None] + sample_configs(TritonPagedConfig, shape, 3, seed=0)
    assert len(configs) == 4
    for index, config in enumerate(configs):
        run_and_compare(MIXED, VARIANT, config, seed=index, interpret=True)


@pytest.mark.parametrize("problem", [
    # decode only, with padding rows and inactive sequences
    PagedProblem(num_seqs=4, max_len=45, page_size=16, dtype="bfloat16", padding_tokens=2,
                 inactive_seqs=2, **SMALL),
    # prefill only: each chunk is the whole context
    PagedProblem(num_seqs=2, max_len=37, page_size=16, dtype="bfloat16", prefill_fraction=1.0,
                 prefill_chunk=64, **SMALL),
    # mixed, MHA and MQA
    PagedProblem(num_seqs=3, max_len=33, page_size=16, dtype="float16", prefill_fraction=0.5,
                 prefill_chunk=9, padding_tokens=1, q_heads=2, kv_heads=2, head_dim=16),
    PagedProblem(num_seqs=3, max_len=33, page_size=16, dtype="float16", prefill_fraction=0.5,
                 prefill_chunk=6, q_heads=4, kv_heads=1, head_dim=24),
], ids=["decode", "prefill", "mixed-mha", "mixed-mqa-d24"])
@pytest.mark.parametrize("kv_splits", [1, 2])
def test_batch_kinds(problem, kv_splits):
    config = heuristic(shape_of(problem)).replace(kv_splits=kv_splits)
    run_and_compare(problem, VARIANT, config, seed=kv_splits, interpret=True)


@pytest.mark.parametrize("page_size,max_len", [(1, 21), (16, 45), (128, 150)])
def test_page_sizes(page_size, max_len):
    problem = PagedProblem(num_seqs=3, max_len=max_len, page_size=page_size, dtype="float32",
                           prefill_fraction=0.34, prefill_chunk=5, padding_tokens=1, **SMALL)
    run_and_compare(problem, VARIANT, seed=page_size, interpret=True)
    if page_size == 128:  # a page cut into two key blocks
        config = TritonPagedConfig(kv_pages_per_block=1, sub_page_blocks=2, queries_per_block=8)
        run_and_compare(problem, VARIANT, config, seed=1, interpret=True)


def test_prefill_chunk_starting_mid_page():
    # Context 37, chunk 7: the chunk's first query sits at position 30, row 14 of page 1.
    problem = PagedProblem(num_seqs=2, max_len=37, lengths="fixed", page_size=16,
                           dtype="float32", prefill_fraction=1.0, prefill_chunk=7, **SMALL)
    args, _ = problem.make_inputs(0)
    assert int(args[2][0]) % 16 != 0 and int(args[2][0]) - 7 > 16
    # One page per step and 8-token query blocks: the chunk's block straddles a page boundary.
    config = TritonPagedConfig(kv_pages_per_block=1, queries_per_block=8, num_warps=4)
    run_and_compare(problem, VARIANT, config, seed=0, interpret=True)
    run_and_compare(problem, VARIANT, config.replace(kv_splits=2), seed=1, interpret=True)


def test_query_blocks_that_barely_spill_over():
    # 8-token blocks, 9-token chunks: each chunk takes two blocks, the second holding one
    # token, near the worst case for the static grid bound.
    problem = PagedProblem(num_seqs=4, max_len=30, lengths="fixed", page_size=16,
                           dtype="float32", prefill_fraction=1.0, prefill_chunk=9,
                           padding_tokens=5, **SMALL)
    run_and_compare(problem, VARIANT, TritonPagedConfig(kv_pages_per_block=1,
                    queries_per_block=8), seed=0, interpret=True)


FEATURES = {
    "window": dict(sliding_window=5),
    "window-tuple": dict(sliding_window=(9, 0)),
    "soft-cap": dict(logits_soft_cap=2.0),
    "sinks": dict(sinks=True),
    "all": dict(sliding_window=7, logits_soft_cap=3.0, sinks=True),
}


# Window and soft cap live in the attention loop both paths share; sinks differ per path.
@pytest.mark.parametrize("feature,kv_splits", [(name, 1) for name in FEATURES]
                         + [("sinks", 2), ("all", 2)])
def test_features(feature, kv_splits):
    problem = PagedProblem(num_seqs=3, max_len=40, page_size=16, dtype="float32",
                           prefill_fraction=0.5, prefill_chunk=12, padding_tokens=2,
                           **FEATURES[feature], **SMALL)
    config = TritonPagedConfig(kv_pages_per_block=1, queries_per_block=8, kv_splits=kv_splits)
    run_and_compare(problem, VARIANT, config, seed=kv_splits, interpret=True)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_dtypes_with_every_feature(dtype):
    problem = PagedProblem(num_seqs=3, max_len=40, page_size=16, dtype=dtype,
                           prefill_fraction=0.5, prefill_chunk=10, padding_tokens=1,
                           sliding_window=12, logits_soft_cap=4.0, sinks=True, **SMALL)
    run_and_compare(problem, VARIANT, seed=3, interpret=True)


def test_window_with_large_scores_has_no_nan():
    # Soft cap large enough to keep big logits big; a window of 1 leaves one key per row.
    problem = PagedProblem(num_seqs=2, max_len=20, page_size=16, dtype="float32",
                           prefill_fraction=0.5, prefill_chunk=6, sliding_window=1,
                           logits_soft_cap=50.0, **SMALL)
    run_and_compare(problem, VARIANT, seed=0, interpret=True)


@pytest.mark.parametrize("kv_splits", [1, 2])
def test_out_of_range_indices_leave_other_rows_right(kv_splits):
    problem = PagedProblem(num_seqs=4, max_len=40, page_size=16, dtype="float32",
                           prefill_fraction=0.5, prefill_chunk=6, padding_tokens=2, **SMALL)
    args, kwargs = problem.make_inputs(5)
    queries, kv_pages, context_lens, page_table, query_start_loc, num_seqs = args
    reference = np.asarray(kernels.ragged_paged_attention(*args, variant="reference", **kwargs))
    bad_table = np.asarray(page_table).copy()
    bad_table[1, :] = np.resize([10**6, -7, 2**31 - 1], bad_table.shape[1])
    bad_context = np.asarray(context_lens).copy()
    bad_context[2] = 10**6
    bad_context[3] = -50
    bad_args = (queries, kv_pages, jnp.asarray(bad_context), jnp.asarray(bad_table),
                query_start_loc, num_seqs)
    config = {"kv_pages_per_block": 1, "queries_per_block": 8, "kv_splits": kv_splits}
    out = np.asarray(jax.jit(lambda *a: kernels.ragged_paged_attention(
        *a, variant=VARIANT, config=config, interpret=True, **kwargs))(*bad_args), np.float32)
    starts = np.asarray(query_start_loc)
    good = np.zeros(out.shape[0], bool)
    good[starts[0]:starts[1]] = True  # sequence 0 is untouched
    good[starts[num_seqs]:] = True  # padding rows stay zero
    accuracy = judge(out[good], reference[good], "float32")
    assert accuracy.ok, accuracy.reason
    assert not np.any(out[starts[num_seqs]:])


def test_garbage_index_values_never_crash():
    problem = PagedProblem(num_seqs=3, max_len=40, page_size=16, dtype="float32",
                           prefill_fraction=0.5, prefill_chunk=6, **SMALL)
    args, kwargs = problem.make_inputs(0)
    rng = np.random.default_rng(0)
    big = np.iinfo(np.int32)
    garbage = [jnp.asarray(rng.integers(big.min, big.max, np.shape(a), dtype=np.int32))
               for a in args[2:5]]
    for num_seqs in (-3, 2, 10**6):
        out = kernels.ragged_paged_attention(args[0], args[1], *garbage,
                                             jnp.asarray(num_seqs, jnp.int32), variant=VARIANT,
                                             interpret=True, **kwargs)
        assert out.shape == args[0].shape


def test_invalid_configs_raise_clear_errors():
    problem = PagedProblem(num_seqs=2, max_len=40, page_size=16, dtype="float32",
                           q_heads=2, kv_heads=2, head_dim=32)
    args, kwargs = problem.make_inputs(0)

    def call(config):
        return kernels.ragged_paged_attention(*args, variant=VARIANT, config=config,
                                              interpret=True, **kwargs)

    with pytest.raises(ValueError, match="tile rows < 16"):
        call({"queries_per_block": 1})  # G = 1: one row per token
    with pytest.raises(ValueError, match="power of two"):
        call({"kv_pages_per_block": 3})
    with pytest.raises(ValueError, match="unknown tunable"):
        call({"pages_per_block": 2})
    big_head_dim = dataclasses.replace(shape_of(problem), head_dim=512)
    too_deep = TritonPagedConfig(kv_pages_per_block=4, queries_per_block=16, num_stages=5)
    assert "shared memory" in (too_deep.invalid_reason(big_head_dim) or "")


def test_heuristic_is_valid_for_every_shape():
    checked = 0
    for page_size, heads, head_dim, dtype, (num_tokens, max_seqs, pages_per_seq) in (
            itertools.product([1, 2, 8, 16, 32, 128, 256, 512, 12],
                              [(32, 8), (8, 8), (12, 2), (64, 1), (5, 5)], [64, 80, 128, 256],
                              ["float32", "bfloat16"], [(8, 8, 512), (600, 8, 40), (1, 1, 1)])):
        shape = PagedShape(
            num_tokens=num_tokens, max_seqs=max_seqs, pages_per_seq=pages_per_seq,
            page_size=page_size, num_pages=100, q_heads=heads[0], kv_heads=heads[1],
            head_dim=head_dim, dtype=dtype)
        config = heuristic(shape)
        assert config.invalid_reason(shape) is None, (shape, config)
        # Defaults run on every supported GPU, except where no config does: the queries of a
        # 64-head float32 D=256 group alone take 64 KiB (there it must fit the larger GPUs).
        budget = (gpu_limits.SHARED_MEMORY_PER_BLOCK_BYTES["sm_80"]
                  if heads == (64, 1) and head_dim == 256 and dtype == "float32"
                  else gpu_limits.PORTABLE_SHARED_MEMORY_BYTES)
        assert config.shared_memory_bytes(shape) <= budget, (shape, config)
        checked += 1
    assert checked > 1000


def test_shared_memory_rule_allows_the_largest_gpu_and_the_default_the_smallest():
    shape = PagedShape(num_tokens=256, max_seqs=4, pages_per_seq=32, page_size=16,
                              num_pages=128, q_heads=32, kv_heads=8, head_dim=128,
                              dtype="bfloat16")
    # 64 tile rows, 128-key blocks, double-buffered: ~160 KiB, only for A100 and H100.
    big = TritonPagedConfig(kv_pages_per_block=8, queries_per_block=16, num_warps=8,
                            num_stages=2)
    assert (gpu_limits.PORTABLE_SHARED_MEMORY_BYTES < big.shared_memory_bytes(shape)
            <= gpu_limits.MAX_SHARED_MEMORY_BYTES)
    assert big.invalid_reason(shape) is None
    # 256-key blocks: ~304 KiB, more than any GPU has.
    assert "shared memory" in big.replace(kv_pages_per_block=16).invalid_reason(shape)
    fitted = triton_paged.fit_resources(big, shape)
    assert fitted.shared_memory_bytes(shape) <= gpu_limits.PORTABLE_SHARED_MEMORY_BYTES
    assert fitted.invalid_reason(shape) is None
    assert triton_paged.fit_resources(big, shape, gpu_limits.MAX_SHARED_MEMORY_BYTES) == big


def test_config_rules_follow_the_shape():
    shape = PagedShape(num_tokens=64, max_seqs=4, pages_per_seq=8, page_size=1,
                              num_pages=40, q_heads=8, kv_heads=2, head_dim=64,
                              dtype="bfloat16")
    assert "key block of 8 < 16" in TritonPagedConfig(kv_pages_per_block=8).invalid_reason(shape)
    assert "tile rows < 16" in TritonPagedConfig(
        kv_pages_per_block=16, queries_per_block=2).invalid_reason(shape)
    clamped = TritonPagedConfig(kv_pages_per_block=64, kv_splits=16).clamp(shape)
    assert clamped.kv_pages_per_block == 16 and clamped.kv_splits == 1
    assert clamped.invalid_reason(shape) is None


def export_for_cuda(problem: PagedProblem, config: TritonPagedConfig):
    args, kwargs = problem.make_inputs(0)
    sinks = kwargs.pop("sinks", None)

    def call(*arrays):
        normalized, _ = paged_inputs.prepare(*arrays[:6], sinks=arrays[6], **kwargs)
        return triton_paged.ragged_paged_attention_triton(normalized, config,
                                                         compute_capability=90)

    return jax.export.export(
        jax.jit(call), platforms=["cuda"],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("triton_kernel_call")],
    )(*args, sinks)


@pytest.mark.parametrize("dtype,kv_splits", [("bfloat16", None), ("float32", 4)])
def test_gpu_path_lowers_for_cuda(dtype, kv_splits):
    """Compiles the kernels through Triton to PTX for sm_90 and lowers the custom calls, after
    an interpreted run in the same process (the interpreter must leave triton as it was)."""
    run_and_compare(PagedProblem(num_seqs=1, max_len=8, page_size=16, dtype="float32", **SMALL),
                    VARIANT, seed=0, interpret=True)
    problem = PagedProblem(num_seqs=4, max_len=256, q_heads=8, kv_heads=2, head_dim=128,
                           page_size=16, dtype=dtype, prefill_fraction=0.5,
                           prefill_chunk=64, padding_tokens=3, sliding_window=100,
                           logits_soft_cap=30.0, sinks=True)
    config = heuristic(shape_of(problem))
    if kv_splits is not None:
        config = config.replace(kv_splits=kv_splits)
    assert config.invalid_reason(shape_of(problem)) is None
    exported = export_for_cuda(problem, config)
    module = exported.mlir_module()
    expected_calls = 1 if config.kv_splits == 1 else 2
    assert module.count("stablehlo.custom_call @triton_kernel_call") == expected_calls
    assert exported.platforms == ("cuda",)


@pytest.mark.parametrize("dtype,head_dim,config", [
    ("bfloat16", 128, TritonPagedConfig(kv_pages_per_block=4, queries_per_block=16, num_stages=3)),
    ("float32", 64, TritonPagedConfig(kv_pages_per_block=4, queries_per_block=16, num_stages=2)),
    ("bfloat16", 128, TritonPagedConfig(kv_pages_per_block=2, queries_per_block=4, num_stages=1,
                                        kv_splits=2)),
])
def test_shared_memory_estimate_bounds_the_compiled_kernel(monkeypatch, dtype, head_dim, config):
    """Triton's own count for the sm_90 build stays under the estimate invalid_reason uses."""
    import jax_triton.triton_lib as triton_lib

    builds = []
    compile_ttir = triton_lib.compile_ttir_inplace

    def recording(*args, **kwargs):
        builds.append(compile_ttir(*args, **kwargs))
        return builds[-1]

    monkeypatch.setattr(triton_lib, "compile_ttir_inplace", recording)
    monkeypatch.setattr(triton_lib, "_COMPILED_KERNEL_CACHE", {})
    problem = PagedProblem(num_seqs=4, max_len=512, q_heads=16, kv_heads=4, head_dim=head_dim,
                           page_size=16, dtype=dtype, prefill_fraction=0.5, prefill_chunk=64)
    shape = shape_of(problem)
    assert config.invalid_reason(shape) is None
    export_for_cuda(problem, config)
    attention_build = builds[0]
    assert 0 < attention_build.shared_mem_bytes <= config.shared_memory_bytes(shape)

