"""Careless and hostile inputs: garbage where no kernel may read, and bad values anywhere.

Every test here is small and bounded in time: a hostile input must give a named error, a
bounded refusal or the contract's result, never a hang, a crash or a poisoned row.
"""

from __future__ import annotations

import functools
import json

import jax.numpy as jnp
import numpy as np
import pytest

from attnbench import kernels

GARBAGE = (np.nan, 1e30, -np.inf, np.inf)


def _poison(array: np.ndarray, forbidden: np.ndarray, rng) -> tuple[np.ndarray, np.ndarray]:
    """(`array` with garbage where `forbidden`, `array` with zeros there)."""
    picks = rng.integers(0, len(GARBAGE), size=array.shape)
    garbage = np.asarray(GARBAGE, np.float32)[picks]
    return np.where(forbidden, garbage, array), np.where(forbidden, 0.0, array)


# ---- decode: positions before start, at or after end, outside the window -------------------

def _decode_inputs(seed=0):
    rng = np.random.default_rng(seed)
    batch, max_len, q_heads, kv_heads, dim = 3, 128, 4, 2, 128
    start = np.array([5, 0, 70], np.int32)
    end = np.array([100, 128, 70], np.int32)  # the last row has no valid key
    query = rng.standard_normal((batch, q_heads, dim), np.float32)
    key = rng.standard_normal((batch, max_len, kv_heads, dim), np.float32)
    value = rng.standard_normal((batch, max_len, kv_heads, dim), np.float32)
    j = np.arange(max_len)[None, :]
    forbidden = ((j < start[:, None]) | (j >= end[:, None]))[:, :, None, None]
    forbidden = np.broadcast_to(forbidden, key.shape)
    bad_key, clean_key = _poison(key, forbidden, rng)
    bad_value, clean_value = _poison(value, forbidden, rng)
    return (query, bad_key, bad_value, start, end), (query, clean_key, clean_value, start, end)


DECODE_CASES = [
    ("reference", None), ("xla_dense", None),
    ("xla_dense", {"contraction": "sequence_major_dot"}),
    ("xla_dense", {"contraction": "fused_reduce", "precision": "upcast_first"}),
    *[("xla_blocked", {"contraction": c, "kv_block_size": 64, "blocks_per_step": 2})
      for c in ("fused_reduce", "head_major_dot", "key_major_dot", "block_diagonal_dot")],
    ("pallas_tpu", {"kv_block_size": 64}),
    pytest.param("triton_splitkv", None),
]


DECODE_KWARGS = {"sliding_window": 40, "sinks": np.full((4,), 0.5, np.float32)}


@functools.cache
def _decode_expected():
    _, clean = _decode_inputs()
    return np.asarray(kernels.decode_attention(*map(jnp.asarray, clean), variant="reference",
                                               **DECODE_KWARGS))


@pytest.mark.parametrize("variant,config", DECODE_CASES)
def test_decode_garbage_outside_the_valid_range_contributes_nothing(variant, config):
    bad, _ = _decode_inputs()
    kwargs = DECODE_KWARGS
    expected = _decode_expected()
    out = kernels.decode_attention(*map(jnp.asarray, bad), variant=variant, config=config,
                                   interpret=variant != "reference" and not variant.startswith("xla"),
                                   **kwargs)
    out = np.asarray(out)
    assert np.isfinite(out).all(), f"{variant} read a masked position"
    np.testing.assert_allclose(out, expected, atol=2e-5, rtol=2e-5)


# ---- paged: unused slots, unowned pages, padding rows, inactive sequences ---------------------

def _paged_inputs(decode_only: bool, seed=0):
    rng = np.random.default_rng(seed)
    pages, page_size, q_heads, kv_heads, dim = 10, 16, 4, 2, 128
    # seq 0: 3 new rows (1 in a decode-only batch) over 20 keys on pages 1, 2; seq 1: one row
    # over 5 keys on page 3; seq 2 is inactive (num_seqs = 2) but names page 4.
    q0 = 1 if decode_only else 3
    context = np.array([20, 5, 10, 0], np.int32)
    table = np.array([[1, 2, 0], [3, 7, 8], [4, 0, 0], [9, 9, 9]], np.int32)
    starts = np.array([0, q0, q0 + 1, q0 + 1, q0 + 1], np.int32)
    num_seqs = np.array([2], np.int32)
    tokens = q0 + 3  # two padding rows
    queries = rng.standard_normal((tokens, q_heads, dim), np.float32)
    kv = rng.standard_normal((pages, page_size, 2 * kv_heads, dim), np.float32)
    readable = np.zeros((pages, page_size), bool)
    readable[1, :] = True
    readable[2, :4] = True
    readable[3, :5] = True
    forbidden = np.broadcast_to(~readable[:, :, None, None], kv.shape)
    bad_kv, clean_kv = _poison(kv, forbidden, rng)
    padding = np.broadcast_to((np.arange(tokens) >= q0 + 1)[:, None, None], queries.shape)
    bad_q, clean_q = _poison(queries, padding, rng)
    rest = (context, table, starts, num_seqs)
    return (bad_q, bad_kv, *rest), (clean_q, clean_kv, *rest)


# xla_decode runs its own path only on decode-only batches; the others see a mixed batch.
PAGED_CASES = [
    ("reference", None, False), ("xla_blocked", None, False),
    ("xla_blocked", {"page_copy": "heads"}, False), ("xla_decode", None, True),
    ("pallas_tpu", None, False),
    pytest.param("triton", None, False),
]
PAGED_KWARGS = {"sliding_window": 12, "logits_soft_cap": 5.0}


@functools.cache
def _paged_expected(decode_only: bool):
    _, clean = _paged_inputs(decode_only)
    return np.asarray(kernels.ragged_paged_attention(*map(jnp.asarray, clean),
                                                     variant="reference", **PAGED_KWARGS))


@pytest.mark.parametrize("variant,config,decode_only", PAGED_CASES)
def test_paged_garbage_in_unread_slots_contributes_nothing(variant, config, decode_only):
    bad, _ = _paged_inputs(decode_only)
    kwargs = PAGED_KWARGS
    expected = _paged_expected(decode_only)
    out = kernels.ragged_paged_attention(
        *map(jnp.asarray, bad), variant=variant, config=config,
        interpret=variant != "reference" and not variant.startswith("xla"), **kwargs)
    out = np.asarray(out)
    assert np.isfinite(out).all(), f"{variant} read a slot it must not"
    np.testing.assert_allclose(out, expected, atol=2e-5, rtol=2e-5)
    assert not out[bad[0].shape[0] - 2:].any(), "padding rows are not zero"


# ---- run folders: one owner at a time, each measurement counted once -------------------------

def test_a_second_process_on_a_run_folder_is_refused_by_name(tmp_path):
    import subprocess
    import sys
    import textwrap

    from attnbench.tuner import sweep
    from attnbench.tuner.errors import SweepError
    from attnbench.tuner.results import records

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / records.RUN_FILE).write_text("{}")
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from attnbench.tuner.results.lock import RunFolderLock
        with RunFolderLock({str(run_dir)!r}):
            print("held", flush=True)
            sys.stdin.read()
        """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(SweepError, match=rf"in use by pid {holder.pid} on "):
            sweep.resume_sweep(run_dir, install_winners=False, echo=lambda line: None)
    finally:
        holder.communicate("", timeout=30)
    # Released (as it is when the holder dies): the next owner gets in.
    from attnbench.tuner.results.lock import RunFolderLock
    with RunFolderLock(run_dir):
        pass


def test_duplicate_and_malformed_log_lines_are_merged_and_named(tmp_path):
    from attnbench.tuner.results import records

    path = tmp_path / records.LOG_FILE
    base = {"status": "ok"}
    lines = [dict(base, id="a", median_us=1.0), dict(base, id="b"), {}, [1], "1" * 5000,
             dict(base, id="a", median_us=2.0)]
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n"
                            for line in lines))
    with pytest.warns(UserWarning) as caught:
        got = records.read_records(path)
    assert [(r["id"], r.get("median_us")) for r in got] == [("a", 1.0), ("b", None)]
    messages = [str(w.message) for w in caught]
    assert any(f"{path}:3" in m and "'id'" in m for m in messages)
    assert any(f"{path}:4" in m for m in messages)
    assert any(f"{path}:5" in m for m in messages)  # 5000 digits: refused, not parsed


# ---- index arrays wider than int32 -----------------------------------------------------------

def test_int64_indices_are_checked_before_the_cast():
    _, (query, key, value, start, end) = _decode_inputs()
    wide_end = end.astype(np.int64)
    wide_end[1] = 2**32 + 4  # would wrap to 4
    for validate in (False, True):
        with pytest.raises(ValueError, match=r"sequence_end\[1\] = 4294967300 does not fit int32"):
            kernels.decode_attention(query, key, value, start, wide_end, validate=validate)
    # Wide arrays whose values fit are fine (numpy's default int is int64).
    out = kernels.decode_attention(query, key, value, start.astype(np.int64),
                                   end.astype(np.int64), variant="reference")
    assert np.isfinite(np.asarray(out)).all()

    _, (queries, kv, context, table, starts, num_seqs) = _paged_inputs(True)
    wide_table = table.astype(np.int64)
    wide_table[0, 1] = 2**32 + 5  # would read page 5
    with pytest.raises(ValueError, match=r"page_table\[0\]\[1\] = 4294967301 does not fit"):
        kernels.ragged_paged_attention(queries, kv, context, wide_table, starts, num_seqs)
    with pytest.raises(ValueError, match=r"num_seqs = 4294967298 does not fit int32"):
        kernels.ragged_paged_attention(queries, kv, context, table, starts, 2**32 + 2)


# ---- tables and sweep files: bounded parsing, bad entries skipped by name ---------------------

_GOOD_ENTRY = {
    "op": "decode", "variant": "xla_blocked", "config": {"kv_block_size": 64},
    "key": {"device_kind": "cpu", "op": "decode", "dtype": "float32", "q_heads": 4,
            "kv_heads": 2, "head_dim": 128, "features": [], "batch": 4, "max_len": 128}}
_BAD_ENTRIES = [
    dict(_GOOD_ENTRY, op=[]), dict(_GOOD_ENTRY, key={"op": {"a": 1}}),
    dict(_GOOD_ENTRY, key=dict(_GOOD_ENTRY["key"], features=[{}])),
    dict(_GOOD_ENTRY, config={"kv_block_size": 3}), dict(_GOOD_ENTRY, config={"nope": 1}),
    dict(_GOOD_ENTRY, variant="nope"), dict(_GOOD_ENTRY, variant="xla_decode"),
    dict(_GOOD_ENTRY, config={"num_kv_splits": 800}),
]


def test_malformed_table_entries_are_skipped_by_name_and_validate_agrees(tmp_path):
    from attnbench.kernels import table

    path = tmp_path / "t.json"
    path.write_text(json.dumps({"schema_version": 1, "meta": {},
                                "entries": _BAD_ENTRIES + [_GOOD_ENTRY]}))
    with pytest.warns(UserWarning) as caught:
        loaded = table.read_table(path)
    assert loaded.entries == (table.Entry(**_GOOD_ENTRY),)
    assert loaded.file_index(0) == len(_BAD_ENTRIES)
    skipped = [str(w.message) for w in caught]
    for index in range(len(_BAD_ENTRIES)):
        assert any(str(path) in m and f"entries[{index}]" in m for m in skipped), index
    problems = table.table_problems(json.loads(path.read_text()))
    assert {p.split(".")[0].split(":")[0] for p in problems} == {
        f"entries[{i}]" for i in range(len(_BAD_ENTRIES))}


@pytest.mark.parametrize("text,words", [
    ("[" * 5000 + "]" * 5000, "nested"),
    ('{"a": ' + "7" * 5000 + "}", "digits"),
    ("\x00\xff\xfe", "not UTF-8"),
])
def test_hostile_table_files_are_refused_quickly(tmp_path, text, words):
    from attnbench.kernels import table

    path = tmp_path / "t.json"
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(table.TableError, match=words):
        table.read_table(path)


def test_a_fifo_or_folder_is_never_read_as_a_table(tmp_path):
    import os

    from attnbench.kernels import lookup, table

    os.mkfifo(tmp_path / "a.json")
    (tmp_path / "b.json").mkdir()
    assert lookup.tables_in(tmp_path) == []  # returns at once: no open() of the FIFO
    for name, words in (("a.json", "not a regular file"), ("b.json", "a folder")):
        with pytest.raises(table.TableError, match=words):
            table.read_table(tmp_path / name)


def test_a_missing_tuned_path_is_named(tmp_path, monkeypatch):
    from attnbench.kernels import lookup

    monkeypatch.setenv(lookup.TUNED_ENV, str(tmp_path / "nowhere"))
    with pytest.warns(UserWarning, match="nowhere, which does not exist"):
        lookup.table_sources()


ALIAS_BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8))


@pytest.mark.parametrize("text,words", [
    (ALIAS_BOMB, "expands to more than"),
    ("a: " + "[" * 20000 + "]" * 20000, "nested"),
    ("name: big\ndevices: ['*']\nops:\n  decode:\n    problems:\n      - {q_heads: 8,"
     " kv_heads: 2, head_dim: 64, batch: &n [1, 2, 3, 4, 5, 6, 7, 8, 9], context: *n,"
     " sliding_window: *n, logits_soft_cap: *n, lengths: uniform, dtype: float32}\n"
     "    variants: {reference: {}}\n",
     "cross into"),
])
def test_hostile_sweep_files_are_refused_quickly(tmp_path, text, words):
    from attnbench.tuner.plan import sweep_file

    path = tmp_path / "s.yaml"
    path.write_text(text)
    problems = sweep_file.sweep_problems_in_file(path)
    assert any(words in p for p in problems), problems


@pytest.mark.parametrize("text,words", [
    ("(((9**256)**256)**256) > 1", "beyond 2\\*\\*64"),
    ("contraction * 10**12 != 1", "needs numbers"),
    ("2**62 * 4 > 0", "beyond 2\\*\\*63"),
])
def test_constraints_bound_every_intermediate(text, words):
    from attnbench.tuner.plan import expressions

    with pytest.raises(expressions.ExpressionError, match=words):
        expressions.parse(text).evaluate({"contraction": "fused_reduce"})


def test_compare_of_sides_with_nothing_in_common_fails(tmp_path):
    from attnbench.tuner.report.compare import CompareError, compare_paths

    other = dict(_GOOD_ENTRY, key=dict(_GOOD_ENTRY["key"], q_heads=8), time_us=3.0)
    for name, entry in (("a.json", dict(_GOOD_ENTRY, time_us=2.0)), ("b.json", other)):
        (tmp_path / name).write_text(json.dumps({"schema_version": 1, "meta": {},
                                                 "entries": [entry]}))
    with pytest.raises(CompareError, match="nothing was compared"):
        compare_paths(tmp_path / "a.json", tmp_path / "b.json", 0.05, echo=lambda line: None)


# ---- Degenerate shapes, bad scalars, NaN propagation --------------------------------------


def _decode_call(batch, max_len, head_dim=8, **kwargs):
    import jax.numpy as jnp

    from attnbench import kernels

    query = jnp.ones((batch, 4, head_dim), jnp.bfloat16)
    cache = jnp.ones((batch, max_len, 2, head_dim), jnp.bfloat16)
    start = jnp.zeros((batch,), jnp.int32)
    end = jnp.full((batch,), max_len, jnp.int32)
    return kernels.decode_attention(query, cache, cache, start, end, **kwargs)


def _paged_call(tokens, pages, page_size, max_seqs, pages_per_seq=4):
    import jax.numpy as jnp

    from attnbench import kernels

    return kernels.ragged_paged_attention(
        jnp.ones((tokens, 4, 8), jnp.float32), jnp.ones((pages, page_size, 4, 8), jnp.float32),
        jnp.zeros((max_seqs,), jnp.int32), jnp.zeros((max_seqs, pages_per_seq), jnp.int32),
        jnp.zeros((max_seqs + 1,), jnp.int32), 0)


@pytest.mark.parametrize("batch,max_len", [(0, 16), (2, 0)])
def test_empty_decode_calls_give_the_contracts_zeros(batch, max_len):
    import jax
    import numpy as np

    for out in (_decode_call(batch, max_len), jax.jit(lambda: _decode_call(batch, max_len))()):
        assert out.shape == (batch, 4, 8)
        assert not np.any(np.asarray(out, np.float32))


@pytest.mark.parametrize("sizes", [(0, 4, 16, 2), (3, 0, 16, 2), (3, 4, 0, 2), (3, 4, 16, 0),
                                   (3, 4, 16, 2, 0)])
def test_empty_paged_calls_give_the_contracts_zeros(sizes):
    import numpy as np

    out = _paged_call(*sizes)
    assert out.shape == (sizes[0], 4, 8)
    assert not np.any(np.asarray(out))


@pytest.mark.parametrize("keyword,value", [("logits_soft_cap", float("inf")),
                                           ("softmax_scale", float("inf")),
                                           ("softmax_scale", float("nan")),
                                           ("logits_soft_cap", -1.0)])
def test_non_finite_scalars_are_refused_by_name(keyword, value):
    with pytest.raises(ValueError, match=keyword):
        _decode_call(2, 16, **{keyword: value})


def test_zero_head_dim_is_named_and_a_huge_window_sees_every_key():
    import numpy as np

    with pytest.raises(ValueError, match="query must have a head dim"):
        _decode_call(2, 16, head_dim=0)
    wide = _decode_call(2, 16, sliding_window=10**30)
    plain = _decode_call(2, 16)
    np.testing.assert_array_equal(np.asarray(wide, np.float32), np.asarray(plain, np.float32))


@pytest.mark.parametrize("variant", ["reference", "xla_blocked", "xla_dense"])
def test_nan_in_a_valid_input_reaches_exactly_its_rows(variant):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from attnbench import kernels
    from attnbench.kernels.decode.problem import DecodeProblem

    problem = DecodeProblem(batch=3, max_len=64, q_heads=4, kv_heads=2, head_dim=16, sinks=True)
    args, kwargs = problem.make_inputs(0)
    query = args[0].at[1, 2].set(jnp.nan)
    out = np.asarray(kernels.decode_attention(query, *args[1:], variant=variant, **kwargs),
                     np.float32)
    rows, heads = np.nonzero(np.isnan(out).any(axis=-1))
    assert list(zip(rows, heads)) == [(1, 2)]
    sinks = kwargs["sinks"].at[0].set(jnp.nan)
    for call in (lambda *a: kernels.decode_attention(*a, sinks=sinks, variant=variant),
                 jax.jit(lambda *a: kernels.decode_attention(*a, sinks=sinks, variant=variant))):
        out = np.asarray(call(*args), np.float32)
        assert np.isnan(out[:, 0]).all() and not np.isnan(out[:, 1:]).any()


def test_validate_under_jit_reports_every_bad_value():
    import jax
    import jax.numpy as jnp

    from attnbench import kernels

    query = jnp.ones((2, 4, 8), jnp.float32)
    cache = jnp.ones((2, 16, 2, 8), jnp.float32)
    start = jnp.asarray([0, 3], jnp.int32)
    end = jnp.asarray([20, 1], jnp.int32)
    call = jax.jit(lambda *a: kernels.decode_attention(*a, validate=True))
    with pytest.raises(jax.errors.JaxRuntimeError) as raised:
        jax.block_until_ready(call(query, cache, cache, start, end))
    text = str(raised.value)
    assert "sequence_end[0] = 20 is beyond the cache length S = 16" in text
    assert "sequence_start[1] = 3 > sequence_end[1] = 1" in text


# ---- Leftovers and file modes ---------------------------------------------------------------


def test_an_install_cleans_up_what_a_killed_install_left_and_files_follow_the_umask(tmp_path):
    import os

    from attnbench.kernels.table import Entry
    from attnbench.tuner.results.install import install
    from attnbench.tuner.results.records import write_json_atomic

    leftover = tmp_path / ".cpu.json.k1ll3d.tmp"
    leftover.write_text("{half a table")
    key = {"device_kind": "cpu", "op": "decode", "dtype": "bfloat16", "q_heads": 8,
           "kv_heads": 2, "head_dim": 64, "page_size": None, "features": [], "batch": 2,
           "max_len": 256}
    entry = Entry(op="decode", variant="reference", key=key, config={}, time_us=1.0)
    previous = os.umask(0o022)
    try:
        path = install([entry], "cpu", {"run_id": "r"}, directory=tmp_path)
        assert not leftover.exists()
        assert path.stat().st_mode & 0o777 == 0o644
        os.umask(0o077)
        write_json_atomic(tmp_path / "private.json", {"a": 1})
        assert (tmp_path / "private.json").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(previous)


def test_a_command_error_is_one_line_unless_debug():
    import os
    import subprocess
    import sys

    command = [sys.executable, "-m", "attnbench.cli", "demo", "--dtype", "int8"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    ours = [line for line in done.stderr.splitlines() if line.startswith(("attnbench", "("))]
    assert done.returncode == 1
    assert ours == ["attnbench: error: query must have dtype in ['float32', 'bfloat16', "
                    "'float16'], got int8", "(run with --debug for the full traceback)"]
    assert "Traceback" not in done.stderr
    debug = subprocess.run(command[:3] + ["--debug"] + command[3:], capture_output=True,
                           text=True, env=env, timeout=300)
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_validate_refuses_a_context_no_kernel_can_address(tmp_path):
    from attnbench.tuner.plan.sweep_file import sweep_problems_in_file

    path = tmp_path / "huge.yaml"
    path.write_text("devices: ['*']\nops:\n  paged:\n    problems:\n"
                    "      - {q_heads: 8, kv_heads: 2, head_dim: 64, context: 1000000000000}\n"
                    "    variants: {reference: {}}\n")
    assert sweep_problems_in_file(path) == [
        "ops.paged.problems[0].context: must be below 2**31 (positions are int32 in every "
        "kernel), got 1000000000000"]
