"""The native CPU variants (cpu_native, C++ through the XLA FFI) against the reference, their
build (cache, lock, failure as a reason), and a sanitizer build on hostile indices."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from checks import run_and_compare
from test_decode_xla import FixedLengths, shape_of
from test_hostile import (DECODE_KWARGS, PAGED_KWARGS, _decode_expected, _decode_inputs,
                          _paged_expected, _paged_inputs)

from attnbench import kernels
from attnbench.kernels import registry
from attnbench.kernels.decode.problem import DecodeProblem
from attnbench.kernels.native import build
from attnbench.kernels.paged.problem import PagedProblem
from attnbench.kernels.tunables import sample_configs

REPO = Path(__file__).resolve().parents[1]


def test_the_library_builds_here():
    # The suite's machines have a C++ compiler: unavailability here is a failure, not a skip.
    assert build.unavailable_reason() is None
    for op in ("decode", "paged"):
        assert registry.get_variant(op, "cpu_native").unavailable_reason() is None


def test_where_it_builds_it_is_what_an_untuned_cpu_call_runs(tmp_path, monkeypatch):
    from attnbench.kernels import lookup

    # Shapes no table holds (head dim 48), so the untuned choice decides.
    monkeypatch.setattr(lookup, "shipped_tuned_dir", lambda: tmp_path / "none")
    monkeypatch.setattr(lookup, "user_tuned_dir", lambda: tmp_path / "none-either")
    lookup.clear_caches()
    decode = DecodeProblem(batch=2, max_len=64, q_heads=4, kv_heads=2, head_dim=48).shape()
    paged = PagedProblem(num_seqs=2, max_len=64, q_heads=4, kv_heads=2, head_dim=48).shape()
    for shape in (decode, paged):
        chosen = lookup.choose(shape, platform="cpu")
        assert (chosen.variant.name, chosen.source) == ("cpu_native", "heuristic default")
        # Where it cannot run the call (an interpreter was asked for), the XLA variant does.
        assert lookup.choose(shape, platform="cpu", interpret=True).variant.name.startswith("xla")
    assert registry.default_variant_name("decode", "cpu") == "cpu_native"
    lookup.clear_caches()


DECODE_FEATURES = {
    "none": {},
    "window_int": dict(sliding_window=37),
    "window_tuple": dict(sliding_window=(36, 5)),
    "soft_cap": dict(logits_soft_cap=3.0),
    "all": dict(sliding_window=(64, 0), logits_soft_cap=10.0, sinks=True),
}


CASES = [("bfloat16", name) for name in DECODE_FEATURES if name != "all"] + [
    (dtype, "all") for dtype in ("float32", "bfloat16", "float16")]


@pytest.mark.parametrize("dtype,features", CASES)
def test_decode_features_and_dtypes(dtype, features):
    problem = DecodeProblem(batch=3, max_len=300, q_heads=8, kv_heads=2, head_dim=64,
                            dtype=dtype, random_start=True, **DECODE_FEATURES[features])
    run_and_compare(problem, "cpu_native", seed=3)


@pytest.mark.parametrize("heads,dim", [((4, 1), 32), ((6, 3), 40), ((2, 2), 128)],
                         ids=["mqa", "odd_heads_dim40", "mha"])
def test_decode_head_layouts_and_sampled_configs(heads, dim):
    q_heads, kv_heads = heads
    problem = DecodeProblem(batch=3, max_len=200, q_heads=q_heads, kv_heads=kv_heads,
                            head_dim=dim, dtype="bfloat16", random_start=True, sinks=True,
                            sliding_window=70)
    configs = [None] + sample_configs(registry.get_variant("decode", "cpu_native").config_class,
                                      shape_of(problem), 3, 1)
    for index, config in enumerate(configs):
        run_and_compare(problem, "cpu_native", config, seed=20 + index)


def test_decode_edges_and_empty_rows():
    # start > 0 mid-block, a row ending on a block boundary, the last partial block, a row
    # inside one block, an empty row, a full row; odd splits leave some parts empty.
    problem = FixedLengths(batch=6, max_len=300, q_heads=4, kv_heads=2, head_dim=16,
                           dtype="float32", starts=(70, 0, 250, 130, 5, 0),
                           ends=(128, 192, 300, 140, 5, 300), sinks=True)
    config = dict(kv_block_size=32, kv_splits=5, heads_per_task=1, prefetch_distance=8)
    out, _, _ = run_and_compare(problem, "cpu_native", config, seed=7)
    assert not np.any(np.asarray(out[4])), "an empty row must give zeros"
    run_and_compare(dataclasses.replace(problem, sliding_window=64), "cpu_native", config,
                    seed=8)


def test_decode_rank4_query_and_jit_inside_a_model():
    problem = DecodeProblem(batch=2, max_len=64, q_heads=4, kv_heads=2, head_dim=32)
    (query, key, value, start, end), kwargs = problem.make_inputs(0)

    @jax.jit
    def step(q, k, v, s, e):
        return kernels.decode_attention(q[:, None], k, v, s, e, variant="cpu_native") * 2.0

    out = step(query, key, value, start, end)
    expected = kernels.decode_attention(query, key, value, start, end, variant="reference")
    assert out.shape == (2, 1, 4, 32) and out.dtype == query.dtype
    np.testing.assert_allclose(np.asarray(out[:, 0], np.float32),
                               2 * np.asarray(expected, np.float32), rtol=2e-2, atol=2e-2)


def test_decode_garbage_outside_the_valid_range_contributes_nothing():
    bad, _ = _decode_inputs()
    for config in (None, dict(kv_block_size=32, kv_splits=3, heads_per_task=1)):
        out = np.asarray(kernels.decode_attention(*map(jnp.asarray, bad), variant="cpu_native",
                                                  config=config, **DECODE_KWARGS))
        assert np.isfinite(out).all(), "cpu_native read a masked position"
        np.testing.assert_allclose(out, _decode_expected(), atol=2e-5, rtol=2e-5)


def test_decode_nan_in_a_valid_key_reaches_its_row_only():
    problem = FixedLengths(batch=3, max_len=70, q_heads=4, kv_heads=2, head_dim=16,
                           dtype="float32", starts=(0, 10, 5), ends=(70, 60, 40), sinks=True)
    args, kwargs = problem.make_inputs(17)
    key = np.asarray(args[1]).copy()
    key[1, 30, 1, 3] = np.nan  # valid for row 1, KV head 1 (query heads 2 and 3)
    out = np.asarray(kernels.decode_attention(args[0], jnp.asarray(key), *args[2:],
                                              variant="cpu_native", config={"kv_splits": 2},
                                              **kwargs))
    assert np.isnan(out[1, 2:]).all()
    assert np.isfinite(out[1, :2]).all() and np.isfinite(out[[0, 2]]).all()


PAGED_FEATURES = {
    "none": {},
    "window": dict(sliding_window=(40, 0)),
    "all": dict(sliding_window=45, logits_soft_cap=8.0, sinks=True),
}


@pytest.mark.parametrize("dtype,features", [("bfloat16", "none"), ("bfloat16", "window")] + [
    (dtype, "all") for dtype in ("float32", "bfloat16", "float16")])
def test_paged_mixed_batches(dtype, features):
    problem = PagedProblem(num_seqs=5, max_len=200, q_heads=8, kv_heads=2, head_dim=64,
                           page_size=16, dtype=dtype, prefill_fraction=0.4, prefill_chunk=40,
                           padding_tokens=3, inactive_seqs=1, **PAGED_FEATURES[features])
    run_and_compare(problem, "cpu_native", seed=1)
    run_and_compare(problem, "cpu_native",
                    dict(rows_per_task=4, kv_splits=3, kv_block_size=32, heads_per_task=1),
                    seed=2)


@pytest.mark.parametrize("page_size", [16, 32])
def test_paged_decode_only_and_mqa(page_size):
    for kv_heads in (4, 1):
        problem = PagedProblem(num_seqs=6, max_len=300, q_heads=8, kv_heads=kv_heads,
                               head_dim=128, page_size=page_size, dtype="bfloat16",
                               sinks=True, inactive_seqs=2)
        run_and_compare(problem, "cpu_native", seed=4)


@pytest.mark.parametrize("decode_only", [False, True])
def test_paged_garbage_in_unread_slots_contributes_nothing(decode_only):
    bad, _ = _paged_inputs(decode_only)
    out = np.asarray(kernels.ragged_paged_attention(*map(jnp.asarray, bad), variant="cpu_native",
                                                    **PAGED_KWARGS))
    assert np.isfinite(out).all(), "cpu_native read a slot it must not"
    np.testing.assert_allclose(out, _paged_expected(decode_only), atol=2e-5, rtol=2e-5)
    assert not out[bad[0].shape[0] - 2:].any(), "padding rows are not zero"


def test_configs_outside_their_rules_are_refused_by_name():
    problem = DecodeProblem(batch=2, max_len=64, q_heads=4, kv_heads=2, head_dim=32)
    (query, key, value, start, end), _ = problem.make_inputs(0)
    with pytest.raises(ValueError, match="prefetch_distance"):
        kernels.decode_attention(query, key, value, start, end, variant="cpu_native",
                                 config={"prefetch_distance": -1})
    with pytest.raises(ValueError, match="kv_block_size"):
        kernels.decode_attention(query, key, value, start, end, variant="cpu_native",
                                 config={"kv_block_size": 48})
    with pytest.raises(kernels.UnsupportedError, match="interpret"):
        kernels.decode_attention(query, key, value, start, end, variant="cpu_native",
                                 interpret=True)


# ---- the build: cache, lock, failures ------------------------------------------------------

def _counting_compiler(tmp_path: Path) -> Path:
    """A CXX that logs each compile (not --version) and then runs the real compiler."""
    log = tmp_path / "compiles.log"
    wrapper = tmp_path / "cxx"
    wrapper.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        case "$1" in --version) ;; *) echo compile >> {log}; sleep 1 ;; esac
        exec {build.compiler()} "$@"
        """))
    wrapper.chmod(0o755)
    return wrapper


def test_two_processes_build_once_into_one_file(tmp_path):
    wrapper = _counting_compiler(tmp_path)
    root = tmp_path / "cache"
    # A small source keeps the two compiles cheap; the cache and lock are the same code.
    source = tmp_path / "small.cc"
    source.write_text('extern "C" int attnbench_probe() { return 7; }\n')
    code = ("import sys; from pathlib import Path; from attnbench.kernels.native import build; "
            "print(build.build(root=Path(sys.argv[1]), source=Path(sys.argv[2])).library)")
    env = dict(os.environ, CXX=str(wrapper))
    processes = [subprocess.Popen([sys.executable, "-c", code, str(root), str(source)], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(2)]
    results = [p.communicate(timeout=300) for p in processes]
    assert all(p.returncode == 0 for p in processes), [r[1][-2000:] for r in results]
    paths = {r[0].strip().splitlines()[-1] for r in results}
    assert len(paths) == 1, paths
    assert (tmp_path / "compiles.log").read_text().count("compile") == 1
    library = Path(paths.pop())
    assert library.is_file() and not list(library.parent.glob("*.tmp"))
    # A later call finds it in the cache; other flags get a folder of their own.
    mtime = library.stat().st_mtime_ns
    again = build.build(root=root, source=source)
    assert again.library == library and library.stat().st_mtime_ns == mtime
    other = build.build(("-O1",), root=root, source=source)
    assert other.library != library


def test_the_key_changes_with_source_compiler_flags_and_cpu():
    base = build.build_key(b"src", "g++ 12", ("-O3",), frozenset({"avx2"}), "/inc")
    assert base != build.build_key(b"src2", "g++ 12", ("-O3",), frozenset({"avx2"}), "/inc")
    assert base != build.build_key(b"src", "g++ 13", ("-O3",), frozenset({"avx2"}), "/inc")
    assert base != build.build_key(b"src", "g++ 12", ("-O2",), frozenset({"avx2"}), "/inc")
    assert base != build.build_key(b"src", "g++ 12", ("-O3",), frozenset({"avx512f"}), "/inc")


def test_a_compile_error_is_the_reason_with_the_compiler_message(tmp_path):
    broken = tmp_path / "broken.cc"
    broken.write_text("int f() { return undeclared_name; }\n")
    with pytest.raises(build.NativeBuildError, match="undeclared_name"):
        build.build(root=tmp_path / "cache", source=broken)


def test_without_a_compiler_the_variant_is_unavailable_and_xla_stays_default(tmp_path):
    code = textwrap.dedent("""
        import json
        from attnbench.kernels import registry
        from attnbench.kernels.lookup import choose
        from attnbench.kernels.decode.problem import DecodeProblem
        shape = DecodeProblem(batch=2, max_len=64, q_heads=4, kv_heads=2, head_dim=32).shape()
        variant = registry.get_variant("decode", "cpu_native")
        print(json.dumps({"reason": variant.unsupported_reason(shape, "cpu", False),
                          "default": choose(shape, platform="cpu").variant.name}))
        """)
    env = dict(os.environ, CXX=str(tmp_path / "no-such-compiler"),
               ATTNBENCH_NATIVE_CACHE=str(tmp_path / "cache"))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    import json
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert "no-such-compiler" in result["reason"] and "unavailable" in result["reason"]
    assert result["default"] == "xla_blocked"
    listed = subprocess.run([sys.executable, "-m", "attnbench.cli", "list", "--op", "decode"],
                            env=env, capture_output=True, text=True, timeout=300)
    assert listed.returncode == 0, listed.stderr[-2000:]
    assert "unavailable: the native CPU library is unavailable" in listed.stdout


# ---- a sanitizer build on hostile indices ----------------------------------------------------

HOSTILE = textwrap.dedent("""
    import jax.numpy as jnp, numpy as np
    from attnbench import kernels
    rng = np.random.default_rng(0)
    f32 = np.float32
    # decode: starts after ends, negative, ends past S, huge values
    B, S, H, G, D = 6, 50, 4, 2, 32
    q = rng.standard_normal((B, H, D), f32)
    k = rng.standard_normal((B, S, G, D), f32).astype(jnp.bfloat16)
    start = np.array([-5, 40, 0, 2**31 - 1, -2**31, 10], np.int32)
    end = np.array([60, 10, 2**31 - 1, 3, -7, 50], np.int32)
    for config in (None, {"kv_splits": 7, "kv_block_size": 16, "prefetch_distance": 40,
                          "heads_per_task": 1}):
        for kwargs in ({}, {"sliding_window": 7, "logits_soft_cap": 2.0,
                            "sinks": np.ones(H, f32)}):
            out = kernels.decode_attention(q, k, k, start, end, variant="cpu_native",
                                           config=config, **kwargs)
            np.asarray(out)
    # paged: pages outside [0, P), contexts beyond the table or negative, decreasing and
    # out-of-range query offsets, num_seqs beyond max_seqs
    P, ps, T, MS, PPS = 5, 16, 12, 4, 3
    qp = rng.standard_normal((T, H, D), f32)
    kv = rng.standard_normal((P, ps, 2 * G, D), f32).astype(jnp.float16)
    table = np.array([[-1, 7, 2**31 - 1], [4, -2**31, 3], [0, 1, 2], [9, 9, 9]], np.int32)
    for ctx, qsl, ns in (
            ([100, 48, -3, 2**31 - 1], [0, 5, 3, 40, 2**31 - 1], 9),
            ([48, 1, 30, 47], [-4, 2, 12, 12, 12], 4),
            ([48, 48, 48, 48], [0, 12, 6, 9, 12], -2),
            ([20, 30, 40, 48], [0, 1, 2, 3, 4], 4)):
        for config in (None, {"rows_per_task": 2, "kv_splits": 3, "kv_block_size": 32,
                              "prefetch_distance": 33}):
            out = kernels.ragged_paged_attention(
                qp, kv, np.array(ctx, np.int32), table, np.array(qsl, np.int32),
                np.array([ns], np.int32), variant="cpu_native", config=config,
                sliding_window=(5, 0), sinks=np.zeros(H, f32))
            np.asarray(out)
            # The same indices steer the v3 operator's in-place write of the new tokens.
            cache = rng.standard_normal((P, ps, G, 2, 128), f32).astype(jnp.bfloat16)
            new = rng.standard_normal((T, G, D), f32).astype(jnp.bfloat16)
            out, cache = kernels.ragged_paged_attention_v3(
                qp.astype(jnp.bfloat16), new, new, cache, np.array(ctx, np.int32), table,
                np.array(qsl, np.int32), np.array([0, 0, ns], np.int32),
                variant="cpu_native", config=config, sliding_window=(5, 0))
            np.asarray(out), np.asarray(cache)
    print("hostile inputs done")
    """)


def test_a_sanitizer_build_finds_nothing_on_hostile_indices(tmp_path):
    libasan = subprocess.run([build.compiler(), "-print-file-name=libasan.so"],
                             capture_output=True, text=True).stdout.strip()
    libubsan = subprocess.run([build.compiler(), "-print-file-name=libubsan.so"],
                              capture_output=True, text=True).stdout.strip()
    assert os.path.isabs(libasan) and os.path.isabs(libubsan), "the compiler has no sanitizers"
    env = dict(os.environ, ATTNBENCH_NATIVE_CACHE=str(tmp_path / "cache"),
               ATTNBENCH_NATIVE_FLAGS="-O1 -fsanitize=address,undefined "
                                      "-fno-sanitize-recover=all -fno-omit-frame-pointer",
               LD_PRELOAD=f"{libasan} {libubsan}",
               ASAN_OPTIONS="detect_leaks=0:abort_on_error=1",
               UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1", JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-c", HOSTILE], env=env, capture_output=True,
                          text=True, timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == 0 and "hostile inputs done" in done.stdout, output[-4000:]
    assert "AddressSanitizer" not in output and "runtime error" not in output, output[-4000:]
    # The library that ran is the instrumented one.
    built = list((tmp_path / "cache").glob("*/libattnbench_native.so"))
    assert len(built) == 2  # the attention kernels and the v3 cache write
    for library in built:
        assert "-fsanitize=address,undefined" in (library.parent / "command.txt").read_text()
        assert "libasan" in subprocess.run(["ldd", str(library)], capture_output=True,
                                           text=True).stdout
