"""The static check compiles each distinct kernel once, in parallel, and keeps the results.

Needs the CUDA jax plugin, jax-triton and triton (the `test` extra); the import below fails
loudly without them.
"""

import csv

import jax_triton  # noqa: F401 -- fails loudly without the CUDA plugin
import pytest

from attnbench.kernels import registry
from attnbench.kernels.decode.problem import DecodeProblem
from attnbench.kernels.paged.problem import PagedProblem
from attnbench.tuner.check import compile_cache, cuda_check, static_check
from attnbench.tuner.plan.sweep_file import sweeps_dir

SM90 = cuda_check.TARGETS["sm_90"]


def decode(batch, max_len=2048):
    return DecodeProblem(batch=batch, max_len=max_len, q_heads=32, kv_heads=8, head_dim=128)


def test_problems_that_differ_in_batch_or_context_launch_the_same_kernels_on_other_grids():
    variant = registry.get_variant("decode", "triton_splitkv")
    config = variant.default_config(decode(4).shape(0))
    small = cuda_check.trace_kernels(decode(4), variant.name, config, SM90)
    large = cuda_check.trace_kernels(decode(16), variant.name, config, SM90)
    assert [k.key for k in small] == [k.key for k in large] and len(small) == 2
    assert [k.grid for k in small] != [k.grid for k in large]
    # The context length is a run-time argument too.
    longer = cuda_check.trace_kernels(decode(4, max_len=8192), variant.name, config, SM90)
    assert [k.key for k in longer] == [k.key for k in small]
    # Another target, or other warps, is another kernel.
    other = cuda_check.trace_kernels(decode(4), variant.name, config, cuda_check.TARGETS["sm_80"])
    assert {k.key for k in other}.isdisjoint(k.key for k in small)
    warps = cuda_check.trace_kernels(decode(4), variant.name,
                                     config.replace(num_warps=8 if config.num_warps != 8 else 4),
                                     SM90)
    assert warps[0].key != small[0].key


def test_configs_that_differ_only_in_their_kv_splits_share_the_attention_kernel():
    decode_variant = registry.get_variant("decode", "triton_splitkv")
    base = decode_variant.default_config(decode(4).shape(0))
    per_split = [cuda_check.trace_kernels(decode(4), decode_variant.name,
                                          base.replace(num_kv_splits=splits), SM90)
                 for splits in (2, 4, 8)]
    assert len({kernels[0].key for kernels in per_split}) == 1
    assert [kernels[0].grid[2] for kernels in per_split] == [2, 4, 8]
    paged_variant = registry.get_variant("paged", "triton")
    problem = PagedProblem(num_seqs=4, max_len=2048, q_heads=16, kv_heads=4, head_dim=128)
    config = paged_variant.default_config(problem.shape(0))
    attention = [cuda_check.trace_kernels(problem, paged_variant.name,
                                          config.replace(kv_splits=splits), SM90)[0].key
                 for splits in (1, 2, 4)]
    # One split writes the final output itself, more write partials: two kernels for three.
    assert attention[1] == attention[2] != attention[0]


def test_paged_batches_of_other_sizes_launch_the_same_kernels():
    variant = registry.get_variant("paged", "triton")

    def paged(num_seqs, max_len, prefill_fraction):
        return PagedProblem(num_seqs=num_seqs, max_len=max_len, q_heads=16, kv_heads=4,
                            head_dim=128, prefill_fraction=prefill_fraction, prefill_chunk=64)

    base = paged(4, 1024, 0.0)
    config = variant.default_config(base.shape(0)).replace(kv_splits=2)
    keys = {tuple(k.key for k in cuda_check.trace_kernels(problem, variant.name, config, SM90))
            for problem in (base, paged(8, 4096, 0.0), paged(8, 2048, 0.5), paged(40, 512, 0.5))}
    # Tokens, sequences, pages per sequence and pages all differ; the kernels do not.
    assert len(keys) == 1 and len(next(iter(keys))) == 2


def read(path):
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def test_a_parallel_check_fills_the_cache_and_a_second_check_compiles_nothing(tmp_path,
                                                                               monkeypatch):
    sweep = sweeps_dir() / "nvidia-h100.yaml"
    cache = tmp_path / "cache"
    lines = []
    cold = static_check.run_check(sweep, [SM90], tmp_path / "cold.csv", limit=1, jobs=2,
                                  cache_dir=cache, echo=lines.append)
    assert {row["variant"] for row in cold} == {v.name for v in cuda_check.gpu_kernel_variants()}
    assert all(row["status"] == "ok" and int(row["registers_per_thread"]) > 0 for row in cold)
    assert any("0 are cached" in line for line in lines)
    files = sorted(cache.rglob("*.json"))
    # A file per variant that compiled a kernel of its own: the v3 Triton variant's first
    # config launches the paged kernel the paged Triton variant's first config compiled.
    stems = {f"{v.op}-{v.name}" for v in cuda_check.gpu_kernel_variants()}
    assert {file.name.rsplit("-", 1)[0] for file in files} == stems - {"paged_v3-triton"}

    def no_compiles(*args, **kwargs):
        raise AssertionError("a cached kernel was compiled again")

    monkeypatch.setattr(cuda_check, "compile_kernels", no_compiles)
    warm = static_check.run_check(sweep, [SM90], tmp_path / "warm.csv", limit=1, jobs=1,
                                  cache_dir=cache, echo=lines.append)
    assert read(tmp_path / "warm.csv") == read(tmp_path / "cold.csv") and warm == cold
    # Without the cache the same check must compile again.
    with pytest.raises(AssertionError, match="compiled again"):
        static_check.run_check(sweep, [SM90], tmp_path / "none.csv", limit=1, jobs=1,
                               use_cache=False, echo=lines.append)


def test_a_changed_kernel_or_toolchain_uses_another_cache_file(tmp_path, monkeypatch):
    variant = registry.get_variant("decode", "triton_splitkv")
    before = compile_cache.cache_file(tmp_path, "sm_90", variant)
    monkeypatch.setattr(compile_cache, "variant_fingerprint", lambda v: "0" * 16)
    assert compile_cache.cache_file(tmp_path, "sm_90", variant) != before
    assert compile_cache.cache_file(tmp_path, "sm_80", variant).parent != before.parent
    assert "triton-" in before.parent.name


def test_a_cache_file_merges_writes_and_survives_damage(tmp_path):
    path = tmp_path / "f.json"
    compile_cache.store(path, {"a": cuda_check.KernelCompile("k", 1024, 40, 0).to_json()})
    compile_cache.store(path, {"b": cuda_check.KernelCompile("k", error="boom").to_json()})
    assert compile_cache.load(path) == {"a": cuda_check.KernelCompile("k", 1024, 40, 0).to_json(),
                                        "b": cuda_check.KernelCompile("k", error="boom").to_json()}
    path.write_text("{not json")
    assert compile_cache.load(path) == {}


def test_jobs_below_one_is_refused(tmp_path):
    with pytest.raises(ValueError, match="jobs: must be at least 1"):
        static_check.run_check(sweeps_dir() / "nvidia-h100.yaml", [SM90], tmp_path / "x.csv",
                               limit=1, jobs=0)
