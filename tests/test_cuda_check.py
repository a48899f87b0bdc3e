"""Compiling GPU configs for real CUDA targets on this GPU-less host (attnbench check).

These tests need the CUDA jax plugin, jax-triton and triton (the `test` extra). If they are
missing the imports below fail loudly: a GPU kernel that stops compiling must fail CI.
"""

import dataclasses

import jax_triton  # noqa: F401 -- fails loudly without the CUDA plugin
import pytest

from attnbench.kernels import registry
from attnbench.kernels.inputs import DecodeShape
from attnbench.tuner import cuda_check
from attnbench.tuner.problems import DecodeProblem, PagedProblem

DECODE = DecodeProblem(batch=4, max_len=1024, q_heads=32, kv_heads=8, head_dim=128,
                       sinks=True, sliding_window=256)
PAGED = PagedProblem(num_seqs=4, max_len=1024, q_heads=32, kv_heads=8, head_dim=128,
                     page_size=16, prefill_fraction=0.5, prefill_chunk=128, logits_soft_cap=30.0)


def gpu_variants(op):
    found = cuda_check.gpu_kernel_variants(op)
    assert found, f"no GPU variant of {op} is registered"
    return found


def shape_of(problem):
    from attnbench.tuner.bench import _shape_of

    arrays, kwargs = problem.make_inputs(0)
    return _shape_of(problem.op, arrays, kwargs)[1]


@pytest.mark.parametrize("target", ["cuda:sm_80", "cuda:sm_90"])
@pytest.mark.parametrize("problem", [DECODE, PAGED], ids=["decode", "paged"])
def test_default_configs_compile_with_plausible_resources(problem, target):
    limits = cuda_check.parse_target(target)
    for variant in gpu_variants(problem.op):
        config = variant.default_config(shape_of(problem))
        result = cuda_check.check_config(problem, variant.name, config, limits)
        assert result.status == "ok", result.reason
        assert result.kernels, "no kernel was compiled"
        for kernel in result.kernels:
            assert 0 < kernel.shared_bytes <= limits.shared_bytes_per_block
            assert 8 <= kernel.registers_per_thread <= 255
            assert kernel.spill_bytes is not None and kernel.num_warps in (1, 2, 4, 8, 16)
            assert all(g >= 1 for g in kernel.grid)


def test_a_config_too_large_for_shared_memory_is_unlaunchable():
    variant = gpu_variants("decode")[0]
    config = variant.default_config(shape_of(DECODE))
    needs = cuda_check.check_config(DECODE, variant.name, config,
                                    cuda_check.parse_target("sm_90")).kernels
    largest = max(kernel.shared_bytes for kernel in needs)
    # The same config on a chip with less shared memory per block than it needs.
    small_chip = dataclasses.replace(cuda_check.TARGETS["sm_80"],
                                     shared_bytes_per_block=largest - 1024)
    result = cuda_check.check_config(DECODE, variant.name, config, small_chip)
    assert result.status == "unlaunchable"
    assert f"needs {largest} bytes of shared memory" in result.reason


def test_unknown_target_names_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown CUDA target 'cuda:sm_12'.*cuda:sm_90"):
        cuda_check.parse_target("cuda:sm_12")


def test_a_config_the_launch_code_refuses_is_a_compile_error_not_an_exception():
    variant = registry.get_variant("decode", "triton_splitkv")
    config = variant.default_config(shape_of(DECODE)).replace(kv_block_size=512, num_stages=4)
    result = cuda_check.check_config(DECODE, variant.name, config,
                                     cuda_check.parse_target("sm_90"))
    assert result.status == "compile_error" and "shared memory" in result.reason
