"""Compiling GPU configs for real CUDA targets on this GPU-less host (attnbench check).

These tests need the CUDA jax plugin, jax-triton and triton (the `test` extra). If they are
missing the imports below fail loudly: a GPU kernel that stops compiling must fail CI.
"""

import dataclasses

import jax_triton  # noqa: F401 -- fails loudly without the CUDA plugin
import pytest

from attnbench.kernels import registry
from attnbench.tuner.check import cuda_check
from attnbench.kernels.decode.problem import DecodeProblem
from attnbench.kernels.paged.problem import PagedProblem

DECODE = DecodeProblem(batch=4, max_len=1024, q_heads=32, kv_heads=8, head_dim=128,
                       sinks=True, sliding_window=256)
PAGED = PagedProblem(num_seqs=4, max_len=1024, q_heads=32, kv_heads=8, head_dim=128,
                     page_size=16, prefill_fraction=0.5, prefill_chunk=128, logits_soft_cap=30.0)


def gpu_variants(op):
    found = cuda_check.gpu_kernel_variants(op)
    assert found, f"no GPU variant of {op} is registered"
    return found


def shape_of(problem):
    return problem.shape(0)


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


def test_check_a_slice_of_the_shipped_gpu_sweeps(tmp_path):
    """CI's guard: the first configs of every GPU variant in the shipped H100 and A100 sweeps
    compile for sm_90 and sm_80, and the CSV says so."""
    import csv

    from attnbench.tuner.check import static_check
    from attnbench.tuner.plan.sweep_file import sweeps_dir

    for sweep, target in (("nvidia-h100.yaml", "sm_90"), ("nvidia-a100.yaml", "sm_80")):
        out = tmp_path / f"{target}.csv"
        lines = []
        rows = static_check.run_check(sweeps_dir() / sweep, [cuda_check.parse_target(target)],
                                      out, limit=1, echo=lines.append)
        checked = {row["variant"] for row in rows}
        assert checked == {v.name for v in cuda_check.gpu_kernel_variants()}
        assert all(row["status"] == "ok" for row in rows), [r["reason"] for r in rows]
        with open(out, newline="") as file:
            written = list(csv.DictReader(file))
        assert len(written) == len(rows) and all(int(r["registers_per_thread"]) > 0 for r in written)
        assert "compile errors" in lines[-1]


def test_refused_configs_become_skipped_static(tmp_path):
    from attnbench.tuner.check import static_check
    from attnbench.tuner.plan import planning
    from attnbench.tuner.plan.sweep_file import load_sweep, sweeps_dir

    spec = load_sweep(sweeps_dir() / "nvidia-h100.yaml")
    item, candidate = static_check.checked_candidates(spec, (0, 1))[0]
    csv_path = tmp_path / "check.csv"
    csv_path.write_text(
        ",".join(static_check.CSV_COLUMNS) + "\n"
        + f'{space_id(item)},x,{candidate.variant.name},"{quoted(candidate.config)}",sm_90,'
          'unlaunchable,too much shared memory,k,1x1x1,4,2,999999,64,0\n')
    plans = planning.plan(spec, (0, 1), "gpu")
    assert static_check.prune(plans, static_check.read_verdicts(csv_path)) == 1
    pruned = [c for p in plans for c in p.candidates if c.skip_status == "skipped_static"]
    assert len(pruned) == 1 and "too much shared memory" in pruned[0].skip_reason


def space_id(item):
    from attnbench.tuner.plan import space

    return space.problem_id(item.problem)


def quoted(config):
    from attnbench.tuner.plan import space

    return space.canonical(config).replace('"', '""')


def test_sweep_runs_the_static_check_in_a_child_process(tmp_path):
    """The sweep calls the check as a function in a CPU-only child (never the CLI), gets a
    verdict for every GPU config of the file, and reuses a finished check on resume."""
    from attnbench.tuner.check import static_check
    from attnbench.tuner.plan.sweep_file import load_sweep, quick_sweep_path

    lines = []
    verdicts = static_check.check_before_sweep(quick_sweep_path(), tmp_path, "nvidia-h100",
                                               (0, 1), lines.append)
    expected = static_check.checked_candidates(load_sweep(quick_sweep_path()), (0, 1))
    assert verdicts is not None and len(verdicts) == len(expected) > 0
    assert all(status == "ok" for status, _ in verdicts.values()), verdicts
    assert (tmp_path / "static_check-sm_90.done").exists()
    lines.clear()
    assert static_check.check_before_sweep(quick_sweep_path(), tmp_path, "nvidia-h100",
                                           (0, 1), lines.append) == verdicts
    assert not any("checking the GPU configs" in line for line in lines)
