"""The shared machinery that runs the Triton variants in Triton's CPU interpreter
(kernels/triton_launch.py) and the shared-memory limits they are configured by
(kernels/gpu_limits.py).

The interpreter shares the process with GPU compiles; the point of most tests here is that an
interpreted run of either variant leaves triton as the GPU compiler needs it.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from checks import require_test_extra, run_and_compare

require_test_extra("triton", "torch", "jax_triton")

import jax_triton  # noqa: E402
import triton.language as tl  # noqa: E402

from attnbench.kernels import gpu_limits, triton_launch  # noqa: E402
from attnbench.kernels.decode import triton_splitkv  # noqa: E402
from attnbench.kernels.paged import triton_paged  # noqa: E402
from attnbench.kernels import DecodeShape, PagedShape  # noqa: E402
from attnbench.kernels.decode import inputs as decode_inputs  # noqa: E402
from attnbench.kernels.decode.problem import DecodeProblem  # noqa: E402
from attnbench.kernels.paged import inputs as paged_inputs  # noqa: E402
from attnbench.kernels.paged.problem import PagedProblem  # noqa: E402

# bfloat16 (the widened dot), KV splits (the merge kernels' tl.max / tl.sum) and every feature:
# each interpreted run calls as many of triton.language's helpers as the variants use.
TINY_DECODE = DecodeProblem(batch=2, max_len=40, q_heads=4, kv_heads=1, head_dim=16,
                            dtype="bfloat16", random_start=True, sliding_window=20,
                            logits_soft_cap=3.0, sinks=True)
TINY_DECODE_CONFIG = triton_splitkv.TritonSplitKVConfig(kv_block_size=16, num_kv_splits=2)
TINY_PAGED = PagedProblem(num_seqs=2, max_len=40, page_size=16, q_heads=4, kv_heads=2,
                          head_dim=16, dtype="bfloat16", prefill_fraction=0.5, prefill_chunk=5,
                          padding_tokens=1, sliding_window=20, logits_soft_cap=3.0, sinks=True)
TINY_PAGED_CONFIG = triton_paged.TritonPagedConfig(kv_pages_per_block=1, queries_per_block=8,
                                                   kv_splits=2)


def run_both_interpreted():
    run_and_compare(TINY_DECODE, "triton_splitkv", TINY_DECODE_CONFIG, seed=1, interpret=True)
    run_and_compare(TINY_PAGED, "triton", TINY_PAGED_CONFIG, seed=2, interpret=True)


def export_decode_for_cuda():
    """jax.export for sm_90 of the decode variant (stage 1 + merge); returns the MLIR text."""
    query = jax.ShapeDtypeStruct((2, 8, 64), jnp.bfloat16)
    cache = jax.ShapeDtypeStruct((2, 128, 2, 64), jnp.bfloat16)
    lengths = jax.ShapeDtypeStruct((2,), jnp.int32)
    sinks = jax.ShapeDtypeStruct((8,), jnp.float32)

    def decode(query, key, value, start, end, sinks):
        args, shape, _ = decode_inputs.prepare(query, key, value, start, end,
                                               sliding_window=50, logits_soft_cap=30.0,
                                               sinks=sinks)
        config = triton_splitkv.heuristic(shape).replace(num_kv_splits=2)
        return triton_splitkv.decode_attention_triton(args, config, compute_capability=90)

    return export(decode, query, cache, cache, lengths, lengths, sinks)


def export_paged_for_cuda():
    """jax.export for sm_90 of the paged variant (attention + split merge); the MLIR text."""
    problem = PagedProblem(num_seqs=2, max_len=64, q_heads=8, kv_heads=2, head_dim=64,
                           page_size=16, dtype="bfloat16", prefill_fraction=0.5,
                           prefill_chunk=16, sliding_window=50, logits_soft_cap=30.0,
                           sinks=True)
    arrays, kwargs = problem.make_inputs(0)
    sinks = kwargs.pop("sinks")

    def paged(*arrays):
        args, shape = paged_inputs.prepare(*arrays[:6], sinks=arrays[6], **kwargs)
        config = triton_paged.heuristic(shape).replace(kv_splits=2)
        return triton_paged.ragged_paged_attention_triton(args, config, compute_capability=90)

    return export(paged, *arrays, sinks)


def export(function, *arrays) -> str:
    exported = jax.export.export(
        jax.jit(function), platforms=["cuda"],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("triton_kernel_call")],
    )(*arrays)
    return exported.mlir_module()


def test_interpreted_runs_of_both_variants_then_cuda_exports_of_both(monkeypatch):
    """An interpreted call of each variant, then a CUDA export of both, in one process.

    Left patched by the interpreter, Triton's front end fails on either kernel
    ("'block_argument' object has no attribute 'get_element_ty'");
    test_a_leaking_scope_is_caught shows this test would see it."""
    # Kernels jax-triton compiled earlier in this process would not go through the front end.
    monkeypatch.setattr(jax_triton.triton_lib, "_COMPILED_KERNEL_CACHE", {})
    run_both_interpreted()
    assert export_decode_for_cuda().count("stablehlo.custom_call @triton_kernel_call") == 2
    assert export_paged_for_cuda().count("stablehlo.custom_call @triton_kernel_call") == 2
    # And the interpreter still works after GPU compiles.
    run_both_interpreted()


def test_a_leaking_scope_is_caught():
    """The cross-variant test's negative control: with the restore switched off, the same
    sequence fails the exports (run in a subprocess: the leak would poison this one)."""
    code = (
        "import sys, pytest\n"
        f"sys.path.insert(0, {os.path.dirname(__file__)!r})\n"
        "from attnbench.kernels import triton_launch\n"
        "triton_launch._restore_attributes = lambda *args, **kwargs: None\n"
        "import test_triton_launch as t\n"
        "t.run_both_interpreted()\n"
        "for export in (t.export_decode_for_cuda, t.export_paged_for_cuda):\n"
        "    try:\n"
        "        export()\n"
        "    except Exception as error:\n"
        "        print('export failed:', type(error).__name__)\n"
        "    else:\n"
        "        print('export passed')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("export failed: CompilationError") == 2, result.stdout


def language_state():
    """Every attribute of the modules and classes the interpreter patches, by identity."""
    modules, classes = triton_launch._patched_objects()
    return {owner: dict(vars(owner)) for owner in modules + classes}


def assert_language_restored(before):
    from triton.runtime.interpreter import interpreter_builder
    from triton.runtime.jit import JITFunction

    for owner, attributes in language_state().items():
        changed = [name for name, value in before[owner].items()
                   if attributes.get(name) is not value]
        assert not changed, (owner, changed)
        if isinstance(owner, type):  # modules may gain the interpreter's own new names
            assert set(attributes) == set(before[owner]), owner
    assert "create_dot" not in vars(interpreter_builder)
    assert isinstance(tl.max, JITFunction) and isinstance(tl.standard.sum, JITFunction)
    assert isinstance(tl.cdiv, JITFunction)
    for name in ("load", "store", "dot", "where", "full", "reduce", "static_assert"):
        assert tl.core.is_builtin(getattr(tl.core, name)), name
        assert tl.core.is_builtin(getattr(tl, name)), name
    assert tl.core.is_builtin(tl.tensor.__add__)
    assert isinstance(tl.range, type) and isinstance(tl.core.static_range, type)


def test_scope_puts_triton_back_exactly():
    run_both_interpreted()  # the interpreter's rewrites (and their new module names) exist now
    before = language_state()
    run_both_interpreted()
    assert_language_restored(before)


def dot_kernel(a_ptr, b_ptr, poisoned_out_ptr, out_ptr, SIZE: tl.constexpr,
               FAIL: tl.constexpr):
    rows = tl.arange(0, SIZE)
    offsets = rows[:, None] * SIZE + rows[None, :]
    a = tl.load(a_ptr + offsets)
    b = tl.load(b_ptr + offsets)
    product = tl.dot(a, b)
    # A helper call (tl.max): the interpreter patches the language for it.
    row_max = tl.max(product, axis=1)
    tl.static_assert(not FAIL, "failing on purpose")
    tl.store(out_ptr + offsets, product - row_max[:, None] + row_max[:, None])


def interpreted_dot(a, b, fail=False):
    kernel = triton_launch.jit_kernel(dot_kernel, True)

    def run(launch, a, b):
        (out,) = launch(kernel, (1,), (a, b), (((16, 16), "float32"),),
                        {"SIZE": 16, "FAIL": fail}, 4, 1)
        return out

    return triton_launch.call_interpreted(run, ((16, 16), "float32"), a, b)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_dot_under_jit_is_exact_for_every_dtype(dtype):
    """Small integers: every product and sum is exact in float32, so the interpreted dot must
    equal numpy's. Raw bfloat16 bits multiplied (the interpreter's own tl.dot) would not."""
    rng = np.random.default_rng(0)
    a, b = (jnp.asarray(rng.integers(-8, 9, (16, 16)), dtype) for _ in range(2))
    out = jax.jit(interpreted_dot)(a, b)
    expected = np.asarray(a, np.float32) @ np.asarray(b, np.float32)
    assert out.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(out), expected)


def test_scope_restores_after_a_failing_kernel_and_when_nested():
    a = jnp.ones((16, 16), jnp.bfloat16)
    interpreted_dot(a, a).block_until_ready()
    before = language_state()
    with pytest.raises(Exception, match="failing on purpose"):
        interpreted_dot(a, a, fail=True).block_until_ready()
    assert_language_restored(before)
    with triton_launch.interpreter_scope():
        with triton_launch.interpreter_scope():
            pass
        assert not isinstance(tl.max, type(before[tl]["max"]))  # the outer swap still holds
        out = triton_launch.interpreter_launch(
            triton_launch.jit_kernel(dot_kernel, True), (1,),
            tuple(triton_launch.to_torch(np.full((16, 16), 2, jnp.bfloat16))
                  for _ in range(2)),
            (((16, 16), "float32"),), {"SIZE": 16, "FAIL": False}, 4, 1)
        np.testing.assert_array_equal(triton_launch.to_numpy(out[0]), 64.0)
    assert_language_restored(before)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32", "int32"])
def test_torch_round_trip_copies(dtype):
    array = np.arange(24).reshape(2, 3, 4).astype(jnp.dtype(dtype))[:, ::2]  # not contiguous
    array.flags.writeable = False
    tensor = triton_launch.to_torch(array)
    assert tensor.is_contiguous() and str(tensor.dtype) == f"torch.{dtype}"
    tensor.fill_(7)  # writable, and a copy
    assert int(array[0, 0, 0]) == 0
    back = triton_launch.to_numpy(tensor)
    assert back.dtype == jnp.dtype(dtype) and back.shape == array.shape
    np.testing.assert_array_equal(back.astype(np.float32), 7)


def test_modules_import_without_triton_or_torch():
    code = ("import sys\n"
            "for name in ('triton', 'jax_triton', 'torch'): sys.modules[name] = None\n"
            "from attnbench.kernels import gpu_limits, triton_launch\n"
            "from attnbench.kernels.decode import triton_splitkv\n"
            "from attnbench.kernels.paged import triton_paged\n"
            "from attnbench.kernels import registry\n"
            "listed = {(v.op, v.name) for v in registry.VARIANTS}\n"
            "assert {('decode', 'triton_splitkv'), ('paged', 'triton')} <= listed\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def _every_config(config_class):
    """Every combination of a config's sweep choices that its field rules admit."""
    space = config_class.space()
    for values in itertools.product(*(entry["choices"] for entry in space.values())):
        yield config_class(**dict(zip(space, values)))


SHARED_MEMORY_CASES = {
    # G = 64 lets block_q_heads take every choice; 4 stages of 128-key blocks overflow sm_90.
    "triton_splitkv": (triton_splitkv.TritonSplitKVConfig, triton_splitkv.fit_resources,
                       DecodeShape(batch=4, max_len=4096, q_heads=128, kv_heads=2,
                                          head_dim=128, dtype="bfloat16")),
    "triton": (triton_paged.TritonPagedConfig, triton_paged.fit_resources,
               PagedShape(num_tokens=256, max_seqs=4, pages_per_seq=64, page_size=16,
                                 num_pages=256, q_heads=32, kv_heads=8, head_dim=128,
                                 dtype="bfloat16")),
}


@pytest.mark.parametrize("variant", sorted(SHARED_MEMORY_CASES))
def test_shared_memory_rules_plan_on_the_largest_gpu_and_fitting_on_any_budget(variant):
    """Over the whole sweep grid of each Triton variant: the validity rule refuses every
    config whose estimate exceeds the largest GPU's shared memory and admits some that only
    the larger GPUs hold; fit_resources brings those within whatever budget it is given."""
    config_class, fit_resources, shape = SHARED_MEMORY_CASES[variant]
    largest = gpu_limits.MAX_SHARED_MEMORY_BYTES
    portable = gpu_limits.PORTABLE_SHARED_MEMORY_BYTES
    refused_for_memory, only_large_gpus = 0, []
    for config in _every_config(config_class):
        needs = config.shared_memory_bytes(shape)
        reason = config.invalid_reason(shape)
        if needs > largest:
            assert reason is not None, (config, needs)
            refused_for_memory += "shared memory" in reason
        elif reason is not None:
            assert "shared memory" not in reason, (config, needs, reason)
        elif needs > portable:
            only_large_gpus.append(config)
    assert refused_for_memory and only_large_gpus
    budgets = sorted(set(gpu_limits.SHARED_MEMORY_PER_BLOCK_BYTES.values()))
    for config in only_large_gpus[::7]:
        for budget in budgets:
            fitted = fit_resources(config, shape, budget)
            assert fitted.invalid_reason(shape) is None, (config, budget, fitted)
            assert fitted.shared_memory_bytes(shape) <= budget, (config, budget, fitted)
        assert fit_resources(config, shape, largest) == config  # nothing to fit: unchanged
