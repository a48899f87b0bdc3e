"""Peer variants (JAX's and ejkernel's kernels): registered and described like ours, gated in
the interpreters that can run them, their layout conversion kept out of the timed call,
their tuned entries kept apart from ours, and exported in their stacks' formats.

Each peer is here with its verdict on tiny problems: passes the gate, is judged wrong
(a finding, with the gate's reason), or cannot run in an interpreter (with the error).
Interpreted calls are slow, so the shapes are tiny.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from typer.testing import CliRunner

from attnbench.cli import app
from attnbench.kernels import decode_attention, lookup, registry
from attnbench.kernels.decode.problem import DecodeProblem
from attnbench.kernels.fingerprint import variant_fingerprint
from attnbench.kernels.paged import peer_jax_tpu
from attnbench.kernels.paged.problem import PagedProblem
from attnbench.kernels.peers import PeerOrigin
from attnbench.kernels.table import SCHEMA_VERSION, make_key, table_from_json
from attnbench.kernels.variant import UnsupportedError
from attnbench.tuner.measure.accuracy import judge
from attnbench.tuner.measure.bench import run_bench, side_by_side_markdown
from attnbench.tuner.measure.kernel_calls import KernelCall
from attnbench.tuner.results import export, selection
from checks import require_test_extra, run_and_compare

require_test_extra("ejkernel")

runner = CliRunner()
DECODE = DecodeProblem(batch=2, max_len=128, q_heads=4, kv_heads=2, head_dim=32,
                       dtype="float32", random_start=True)
PAGED = PagedProblem(num_seqs=3, max_len=64, page_size=16, q_heads=4, kv_heads=2, head_dim=32,
                     dtype="float32")
PAGED_MIXED = dataclasses.replace(PAGED, prefill_fraction=0.34, prefill_chunk=16)


def _verdict(problem, variant, config=None, *, interpret=False, seed=0):
    """The gate's verdict on `variant` (the judgement run_and_compare asserts on)."""
    operator = registry.get_operator(problem.op)
    args, kwargs = problem.make_inputs(seed)
    out = jax.jit(lambda *a: operator.function(*a, variant=variant, config=config,
                                               interpret=interpret, **kwargs))(*args)
    reference = jax.jit(lambda *a: operator.function(*a, variant="reference", **kwargs))(*args)
    return judge(out, reference, problem.dtype, zero_rows=operator.zero_rows(args),
                 key_ranges=operator.key_ranges(args, kwargs))


# ---- Registered and described ------------------------------------------------------------


def test_every_peer_names_its_project_version_and_entry_point():
    peers = {v.name: v for v in registry.peers()}
    assert {"jax_gpu_decode_attention", "jax_gpu_paged_attention",
            "jax_tpu_ragged_paged_attention", "ejkernel_ragged_decode_xla",
            "ejkernel_ragged_decode_triton", "ejkernel_ragged_decode_pallas_tpu",
            "ejkernel_rpa_v2_xla", "ejkernel_rpa_v2_triton",
            "ejkernel_rpa_v2_pallas_tpu"} <= set(peers)
    for variant in peers.values():
        described = variant.describe()["peer"]
        assert described["version"] == variant.peer.version() is not None, variant.name
        assert described["entry_point"].startswith(described["project"]), variant.name
        assert variant.unavailable_reason() is None, variant.name
        assert callable(variant.peer.load()), variant.name
    defaults = {name for names in registry.DEFAULT_VARIANT.values() for name in names}
    assert not defaults & set(peers)
    result = runner.invoke(app, ["list", "--op", "paged"])
    assert result.exit_code == 0, result.output
    assert f"peer: jax {jax.__version__}, jax.experimental.pallas.ops.gpu.paged_attention" \
        in result.output
    assert "input conversion: kv_pages [P, page_size, 2*Hkv, D] -> key and value pools" \
        in result.output


def test_a_missing_project_makes_its_peer_unavailable_with_the_reason():
    gone = PeerOrigin("nowhere", "attnbench-no-such-distribution", "nowhere.kernels", "f",
                      extra="peers")
    assert gone.missing_reason() == ("attnbench-no-such-distribution is not installed "
                                     "(pip install 'attnbench[peers]')")
    moved = PeerOrigin("jax", "jax", "jax.experimental.no_such_module", "f")
    assert "has no module jax.experimental.no_such_module" in moved.missing_reason()
    variant = dataclasses.replace(registry.get_variant("decode", "ejkernel_ragged_decode_xla"),
                                  peer=gone)
    assert "is not installed" in variant.unsupported_reason(DECODE.shape(0), "cpu", False)


def test_a_feature_a_peer_lacks_is_refused_naming_it():
    args, _ = DECODE.make_inputs(0)
    with pytest.raises(UnsupportedError, match="does not support sliding_window"):
        decode_attention(*args, sliding_window=16, variant="jax_gpu_decode_attention",
                         interpret=True)
    sinks = jnp.zeros((DECODE.q_heads,), jnp.float32)
    with pytest.raises(UnsupportedError, match="does not support sinks"):
        decode_attention(*args, sinks=sinks, variant="ejkernel_ragged_decode_triton")


# ---- The gate, in the interpreters -------------------------------------------------------


def test_jax_gpu_decode_passes_in_the_gpu_interpreter():
    run_and_compare(DECODE, "jax_gpu_decode_attention", {"k_splits": 2, "block_k": 32},
                    seed=0, interpret=True)
    run_and_compare(dataclasses.replace(DECODE, dtype="bfloat16"), "jax_gpu_decode_attention",
                    {"k_splits": 4, "block_k": 16}, seed=1, interpret=True)


def test_jax_gpu_paged_passes_decode_batches_and_is_wrong_on_prefill_rows():
    run_and_compare(PAGED, "jax_gpu_paged_attention",
                    {"k_splits": 2, "pages_per_compute_block": 2}, seed=0, interpret=True)
    verdict = _verdict(PAGED_MIXED, "jax_gpu_paged_attention",
                       {"k_splits": 2, "pages_per_compute_block": 2}, interpret=True)
    # A decode kernel: a prefill chunk's rows other than its last are not computed.
    assert not verdict.ok and "row error" in verdict.reason


def test_jax_tpu_ragged_paged_attention_does_not_run_in_the_tpu_interpreter():
    with pytest.raises(UnsupportedError, match="has no interpreter mode"):
        jax.jit(lambda *a: registry.get_operator("paged").function(
            *a, variant="jax_tpu_ragged_paged_attention", interpret=True))(
            *PAGED.make_inputs(0)[0])
    # The reason it is not declared interpretable; if this stops failing, declare it so.
    operator = registry.get_operator("paged")
    args, kwargs = dataclasses.replace(PAGED, head_dim=128).make_inputs(0)
    prepared, shape = operator.prepare(*args, **kwargs)
    with pytest.raises(Exception, match="ReshapeTransform"):
        jax.block_until_ready(peer_jax_tpu.jax_tpu_ragged_paged(
            prepared, peer_jax_tpu.heuristic(shape), interpret=True))


def test_ejkernel_pallas_tpu_peers_do_not_run_in_the_tpu_interpreter():
    for problem, variant, config in (
            (DECODE, "ejkernel_ragged_decode_pallas_tpu", None),
            (dataclasses.replace(PAGED, head_dim=128), "ejkernel_rpa_v2_pallas_tpu",
             {"num_kv_pages_per_block": 2, "num_queries_per_block": 8})):
        chosen = registry.get_variant(problem.op, variant)
        assert not chosen.interpretable
        operator = registry.get_operator(problem.op)
        args, kwargs = problem.make_inputs(0)
        prepared, shape = operator.prepare(*args, **kwargs)
        config = chosen.default_config(shape) if config is None else \
            chosen.config_class.from_mapping(config)
        with pytest.raises(Exception, match="safe_zip|ReshapeTransform"):
            jax.block_until_ready(chosen.kernel(prepared, config, interpret=True))


def test_ejkernel_xla_decode_passes_plain_and_is_wrong_with_window_cap_and_sinks():
    plain = dataclasses.replace(DECODE, dtype="bfloat16")
    run_and_compare(plain, "ejkernel_ragged_decode_xla", {"kv_blocksize": 64}, seed=0)
    featured = dataclasses.replace(plain, max_len=256, q_heads=8, head_dim=64,
                                   sliding_window=100, logits_soft_cap=30.0, sinks=True)
    verdict = _verdict(featured, "ejkernel_ragged_decode_xla")
    assert not verdict.ok and verdict.row_error > 3 * 0.0126, verdict


def test_ejkernel_xla_paged_is_wrong_even_in_float32():
    # Its default compute dtype is bfloat16, whatever the inputs' dtype.
    verdict = _verdict(PAGED_MIXED, "ejkernel_rpa_v2_xla")
    assert not verdict.ok and verdict.row_error > 10 * 2.4e-4, verdict


# ---- The conversion is outside the timed call ------------------------------------------------


def test_a_converting_peer_is_timed_on_arrays_converted_beforehand():
    operator = registry.get_operator("paged")
    variant = registry.get_variant("paged", "jax_gpu_paged_attention")
    args, kwargs = PAGED.make_inputs(0)
    prepared, shape = operator.prepare(*args, **kwargs)
    config = variant.default_config(shape)
    call = KernelCall(operator, variant, config, len(args), kwargs, interpret=True)
    (timed,) = call.timed_input_sets([tuple(args)])
    keys, values = timed[len(args):]
    pages = args[1].shape
    assert keys.shape == values.shape == (PAGED.kv_heads, pages[0], pages[1], PAGED.head_dim)
    run = jax.jit(call.run)
    direct = variant.kernel(prepared, config, interpret=True)
    np.testing.assert_array_equal(np.asarray(run(*timed)), np.asarray(direct))
    # The timed call reads the converted pools, not kv_pages: zero pools, zero attention.
    blank = run(*args, jnp.zeros_like(keys), jnp.zeros_like(values))
    assert float(jnp.max(jnp.abs(blank))) == 0.0 < float(jnp.max(jnp.abs(direct)))


# ---- bench --peers -----------------------------------------------------------------------


def test_bench_puts_peers_beside_ours_with_time_floor_and_error():
    problem = DecodeProblem(batch=2, max_len=256, q_heads=4, kv_heads=2, head_dim=32)
    rows = list(run_bench(problem, variant_names=["xla_blocked", "ejkernel_ragged_decode_xla",
                                                  "jax_gpu_decode_attention"],
                          sample=0, repeats=2, seed=0, peers=True))
    by_name = {}
    for row in rows:
        by_name.setdefault(row.variant, []).append(row)
    (gpu_only,) = by_name["jax_gpu_decode_attention"]
    assert gpu_only.status.startswith("unsupported: variant 'jax_gpu_decode_attention' runs "
                                      "on ['gpu'], not on cpu")
    assert gpu_only.peer == f"jax {jax.__version__}"
    ejkernel_rows = by_name["ejkernel_ragged_decode_xla"]
    assert ejkernel_rows[0].is_default and ejkernel_rows[0].peer.startswith("ejkernel 0.0.80")
    assert all(r.status == "ok" and r.fraction_of_floor > 0 for r in by_name["xla_blocked"])
    # Wrong or not, a peer that runs is timed; only a correct config can be its best.
    assert all(r.timing is not None and r.fraction_of_floor > 0 for r in ejkernel_rows)
    table = side_by_side_markdown(rows)
    assert table[0].startswith("| variant | from | default | us | x floor | rel err | best |")
    lines = {line.split(" | ")[0].strip("| "): line for line in table[2:] if line.startswith("|")}
    assert list(lines)[0] == "xla_blocked"  # ours first
    assert " | attnbench | ok | " in lines["xla_blocked"]
    assert f" | jax {jax.__version__} | unsupported | " in lines["jax_gpu_decode_attention"]
    status = ejkernel_rows[0].status.split(":")[0]
    assert lines["ejkernel_ragged_decode_xla"].startswith(
        f"| ejkernel_ragged_decode_xla | {ejkernel_rows[0].peer} | {status} | "
        f"{ejkernel_rows[0].timing.median_us:.0f} | ")
    assert any(note.startswith("- jax_gpu_decode_attention: unsupported:") for note in table)


# ---- Tables: peers' entries apart from ours ---------------------------------------------------


def _record(variant, config, median, default=True):
    return {"problem_id": "p", "round": 0, "status": "ok", "variant": variant,
            "config": config, "is_default": default, "median_us": median,
            "p20_us": median, "p80_us": median, "key": make_key(DECODE.shape(0), "cpu"),
            "fingerprint": variant_fingerprint(registry.get_variant("decode", variant))}


def test_a_faster_peer_gets_its_own_entry_and_never_the_keys_winner(tmp_path, monkeypatch):
    records = [_record("xla_blocked", {"kv_block_size": 256}, 100.0),
               _record("ejkernel_ragged_decode_xla", {"kv_blocksize": 256}, 50.0),
               _record("ejkernel_ragged_decode_xla", {"kv_blocksize": 64}, 40.0, False)]
    entries = selection.select_winners(records, noise=0.03, platform="cpu", provenance={})
    ours, peer = sorted(entries, key=lambda e: "peer" in e.source)
    assert (ours.variant, ours.time_us) == ("xla_blocked", 100.0)
    assert (peer.variant, peer.config, peer.time_us) == (
        "ejkernel_ragged_decode_xla", {"kv_blocksize": 64}, 40.0)
    assert peer.source["peer"].startswith("ejkernel 0.0.80")
    path = tmp_path / "table.json"
    path.write_text(json.dumps({"schema_version": SCHEMA_VERSION, "meta": {},
                                "entries": [peer.to_json()]}))
    monkeypatch.setenv(lookup.TUNED_ENV, str(path))
    lookup.clear_caches()
    shape = DECODE.shape(0)
    untuned = lookup.choose(shape, device_kind="cpu", platform="cpu")
    assert untuned.variant.name == registry.default_variant_name("decode", "cpu")
    assert untuned.source == "heuristic default"
    named = lookup.choose(shape, variant="ejkernel_ragged_decode_xla", device_kind="cpu",
                          platform="cpu")
    assert named.config.kv_blocksize == 64 and "$ATTNBENCH_TUNED" in named.source


# ---- Export ------------------------------------------------------------------------------

PAGED_KEY = {"device_kind": "tpu-v6e", "op": "paged", "dtype": "bfloat16", "q_heads": 32,
             "kv_heads": 8, "head_dim": 128, "page_size": 16, "features": [], "tokens": 8,
             "max_len": 8192}


def _peer_table():
    decode_key = make_key(dataclasses.replace(DECODE, dtype="bfloat16").shape(0), "cpu")
    entries = [
        {"op": "decode", "variant": "ejkernel_ragged_decode_xla", "key": decode_key,
         "config": {"kv_blocksize": 512}, "time_us": 10.0, "source": {"peer": "ejkernel"}},
        {"op": "paged", "variant": "ejkernel_rpa_v2_pallas_tpu", "key": PAGED_KEY,
         "config": {"num_kv_pages_per_block": 16, "num_queries_per_block": 32,
                    "vmem_limit_bytes": None}, "time_us": 5.0, "source": {}},
        {"op": "paged", "variant": "jax_tpu_ragged_paged_attention", "key": PAGED_KEY,
         "config": {"num_kv_pages_per_block": 8, "num_queries_per_block": 64,
                    "vmem_limit_bytes": None}, "time_us": 4.0, "source": {}},
        {"op": "decode", "variant": "xla_blocked", "key": decode_key,
         "config": {"kv_block_size": 256}, "time_us": 9.0, "source": {}},
    ]
    return table_from_json({"schema_version": SCHEMA_VERSION, "meta": {}, "entries": entries},
                           "peers.json")


def test_easydel_export_builds_ejkernels_config_objects(tmp_path):
    from ejkernel.modules.operations.configs import (RaggedDecodeAttentionConfig,
                                                     RaggedPageAttentionv2Config)
    from ejkernel.ops import FwdParams

    table = _peer_table()
    exported = json.loads(export.export_text(table, "easydel", python=False))
    built = export.build_easydel_configs(exported["operation_configs_by_key"])
    assert len(built) == 2  # one set per key; our own entry is left out
    decode_set = next(c for c in built.values() if "ragged_decode_attention" in c)
    decode = decode_set["ragged_decode_attention"]
    assert isinstance(decode, RaggedDecodeAttentionConfig)
    assert isinstance(decode.fwd_params, FwdParams) and decode.fwd_params.kv_blocksize == 512
    assert (decode.platform, decode.backend) == ("xla", "any")
    paged = next(c for c in built.values() if "ragged_page_attention_v2" in c)
    paged = paged["ragged_page_attention_v2"]
    assert isinstance(paged, RaggedPageAttentionv2Config)
    assert (paged.num_kv_pages_per_block, paged.num_queries_per_block, paged.platform,
            paged.backend) == (16, 32, "pallas", "tpu")
    # The Python form builds the same objects on import.
    namespace = {}
    exec(export.export_text(table, "easydel", python=True), namespace)  # noqa: S102
    assert namespace["OPERATION_CONFIGS_BY_KEY"] == built


def test_jax_rpa_export_is_keyed_as_jaxs_tuned_block_sizes(tmp_path):
    from jax.experimental.pallas.ops.tpu.ragged_paged_attention import kernel, tuned_block_sizes

    out = tmp_path / "tuned.py"
    result = runner.invoke(app, ["export", str(tmp_path / "peers.json"), "--format", "jax-rpa"])
    assert result.exit_code == 2 and "no such file" in result.output
    (tmp_path / "peers.json").write_text(json.dumps(_peer_table().to_json()))
    result = runner.invoke(app, ["export", str(tmp_path / "peers.json"), "--format", "jax-rpa",
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    namespace = {}
    exec(out.read_text(), namespace)  # noqa: S102
    sizes = namespace["TUNED_BLOCK_SIZES"]
    dtype = jnp.dtype("bfloat16")
    heads = kernel.get_min_heads_per_blk(32, 16, dtype, dtype)
    jax_key = tuned_block_sizes.simplify_key(
        (dtype, dtype, heads[0], heads[1] // 2, 128, 16, 8, 8192 // 16))
    assert sizes == {"TPU v6": {jax_key: (8, 64)}}


def test_export_of_a_table_without_peers_says_what_to_run(tmp_path):
    only_ours = {"schema_version": SCHEMA_VERSION, "meta": {}, "entries": [
        e for e in _peer_table().to_json()["entries"] if e["variant"] == "xla_blocked"]}
    path = tmp_path / "ours.json"
    path.write_text(json.dumps(only_ours))
    result = runner.invoke(app, ["export", str(path), "--format", "easydel"])
    assert result.exit_code == 1
    assert "has no tuned entry of a peer that easydel takes" in result.output
    result = runner.invoke(app, ["export", str(path), "--format", "vllm"])
    assert result.exit_code == 2 and "easydel" in result.output
