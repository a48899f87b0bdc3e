"""The commands outside the sweep: list, lookup, validate, demo, bench."""

import json

from typer.testing import CliRunner

from attnbench.cli import app
from attnbench.kernels import lookup, registry
from attnbench.kernels import DecodeShape
from attnbench.kernels.table import SCHEMA_VERSION, make_key

runner = CliRunner()


def test_list_json_describes_every_variant():
    result = runner.invoke(app, ["list", "--format", "json"])
    assert result.exit_code == 0, result.output
    listed = json.loads(result.output)
    assert {(v["op"], v["name"]) for v in listed} == {(v.op, v.name) for v in registry.VARIANTS}
    for item in listed:
        assert set(item) >= {"name", "op", "platforms", "interpretable", "features",
                             "config_space"}
        for space in item["config_space"].values():
            assert set(space) >= {"default", "choices", "rule"}


def test_list_text_shows_ops_and_platforms():
    result = runner.invoke(app, ["list"])
    assert result.exit_code == 0
    assert "decode/reference" in result.output and "paged/reference" in result.output
    assert "platforms: cpu, gpu, tpu" in result.output


def test_help_prints_bracketed_text_as_written():
    result = runner.invoke(app, ["sweep", "--help"], terminal_width=200)
    assert result.exit_code == 0
    assert "pip install 'attnbench[ray]'" in result.output


def test_lookup_reports_the_table_entry():
    shape = DecodeShape(batch=8, max_len=8192, q_heads=32, kv_heads=8, head_dim=128,
                        dtype="bfloat16")
    table = lookup.user_tuned_dir() / "cpu.json"
    table.parent.mkdir(parents=True)
    table.write_text(json.dumps({"schema_version": SCHEMA_VERSION, "meta": {}, "entries": [
        {"op": "decode", "variant": "reference", "key": make_key(shape, "cpu"), "config": {},
         "time_us": 12.5, "source": {"run_id": "run-42"}}]}))
    result = runner.invoke(app, ["lookup", "--op", "decode", "--q-heads", "32", "--kv-heads", "8",
                                 "--head-dim", "128", "--batch", "6", "--max-len", "8000",
                                 "--device-kind", "cpu"])
    assert result.exit_code == 0, result.output
    assert "variant: reference" in result.output
    assert f"{table} entries[0]" in result.output and "run-42" in result.output


def test_lookup_paged_without_table_uses_the_heuristic():
    result = runner.invoke(app, ["lookup", "--op", "paged", "--q-heads", "8", "--kv-heads", "2",
                                 "--head-dim", "64", "--tokens", "40", "--max-len", "2048",
                                 "--page-size", "16", "--features", "sinks"])
    assert result.exit_code == 0, result.output
    assert "source:  heuristic default" in result.output
    assert "page_size=16 features=sinks tokens=64 max_len=2048" in result.output


def test_lookup_tp_keys_on_the_per_shard_heads():
    base = ["lookup", "--op", "decode", "--q-heads", "32", "--kv-heads", "8", "--head-dim", "64",
            "--max-len", "1024", "--device-kind", "cpu"]
    result = runner.invoke(app, base + ["--tp", "4"])
    assert result.exit_code == 0, result.output
    assert "shards:  4, each Hq=8 Hkv=2" in result.output
    assert "Hq=8 Hkv=2 D=64" in result.output
    result = runner.invoke(app, base + ["--tp", "3"])
    assert result.exit_code != 0 and "--tp 3 must be >= 1 and divide" in result.output


def test_lookup_rejects_unknown_feature():
    result = runner.invoke(app, ["lookup", "--op", "decode", "--q-heads", "8", "--kv-heads", "2",
                                 "--head-dim", "64", "--max-len", "64", "--features", "alibi"])
    assert result.exit_code != 0 and "alibi" in result.output


def test_validate_table_reports_located_problems(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"schema_version": SCHEMA_VERSION, "meta": {}, "entries": [
        {"op": "decode", "variant": "x", "config": {}, "key": {
            "op": "decode", "device_kind": "cpu", "dtype": "float64", "q_heads": 8,
            "kv_heads": 2, "head_dim": 64, "page_size": None, "features": [],
            "batch": 6, "max_len": 64}}]}))
    result = runner.invoke(app, ["validate", str(bad)])
    assert result.exit_code == 1
    assert "entries[0].key.dtype: must be one of" in result.output
    assert "entries[0].key.batch: must be a power of two, got 6" in result.output
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"schema_version": SCHEMA_VERSION, "meta": {}, "entries": []}))
    result = runner.invoke(app, ["validate", str(good)])
    assert result.exit_code == 0 and "ok" in result.output


def test_demo_runs_both_operators_correctly():
    result = runner.invoke(app, ["demo", "--dtype", "float32"])
    assert result.exit_code == 0, result.output
    assert result.output.count("(ok)") == 2


def test_bench_problem_overrides_use_sweep_field_names():
    from attnbench.tuner.measure.bench import bench_problem
    from attnbench.kernels.decode.problem import DecodeProblem

    assert bench_problem("decode") == DecodeProblem(
        batch=8, max_len=8192, q_heads=32, kv_heads=8, head_dim=128, dtype="bfloat16",
        lengths="uniform", min_len=100)
    mqa = bench_problem("decode", {"model": "starcoder-15b", "context": 4096})
    assert (mqa.q_heads, mqa.kv_heads, mqa.max_len, mqa.batch) == (48, 1, 4096, 8)
    paged = bench_problem("paged-mixed", {"num_seqs": 4})
    assert paged.num_seqs == 4 and paged.prefill_fraction == 0.25


def test_bench_prints_the_ratio_to_the_floor_for_a_changed_problem():
    result = runner.invoke(app, [
        "bench", "decode", "--variant", "xla_blocked", "--variant", "auto", "--repeats", "2",
        "--set", "context=512", "--set", "batch=2", "--set", "min_len=16"])
    assert result.exit_code == 0, result.output
    assert "max_len=512" in result.output and "batch=2" in result.output
    best = [line for line in result.output.splitlines() if line.startswith("best: ")]
    assert len(best) == 1 and "x" in best[0].rsplit("ratio", 1)[1]
    # Both floors: the memory floor and an XLA matmul of the call's flops.
    memory_floor = float(best[0].split("; floor ")[1].split(" us")[0])
    compute_floor = float(best[0].split("compute floor ")[1].split(" us")[0])
    assert memory_floor > 0 and compute_floor > 0
    # The call's own choice is timed too, and said where it came from.
    # (Llama-3-8B's heads: the shipped CPU table's entries for them, at other sizes.)
    assert "the call's own choice (tuned: shipped tables: " in result.output
    auto = [line for line in result.output.splitlines() if line.startswith("auto: ")]
    assert len(auto) == 1 and "x the best timed here" in auto[0]


def test_bench_refuses_a_bad_field_by_name():
    result = runner.invoke(app, ["bench", "decode", "--set", "context=0"])
    assert result.exit_code != 0
    assert "context" in result.output and "positive int" in result.output
    result = runner.invoke(app, ["bench", "decode", "--set", "heads=4"])
    assert result.exit_code != 0 and "heads" in result.output and "unknown field" in result.output
    result = runner.invoke(app, ["bench", "decode", "--set", "context"])
    assert result.exit_code != 0 and "FIELD=VALUE" in result.output


def test_the_compute_floor_counts_every_valid_logit_and_weighted_value():
    import numpy as np

    from attnbench.kernels.decode.problem import DecodeProblem
    from attnbench.kernels.paged.problem import PagedProblem
    from attnbench.tuner.measure import roofline

    decode = DecodeProblem(batch=3, max_len=64, q_heads=8, kv_heads=2, head_dim=32,
                           dtype="float32", random_start=True)
    args, kwargs = decode.make_inputs(0)
    valid = int(np.sum(np.asarray(args[4]) - np.asarray(args[3])))  # end - start per row
    # q.k and p.v, two flops per multiply-add, for each query head of each valid key.
    assert roofline.flops("decode", args, kwargs) == valid * 8 * 32 * 4
    # One prefill chunk of 4 rows over a context of 10: causal, so 7 + 8 + 9 + 10 keys.
    paged = PagedProblem(num_seqs=1, max_len=16, q_heads=4, kv_heads=1, head_dim=16,
                         page_size=8, dtype="float32", prefill_fraction=1.0, prefill_chunk=4)
    args, kwargs = paged.make_inputs(0)
    context = int(np.asarray(args[2])[0])
    rows = int(np.asarray(args[4])[1] - np.asarray(args[4])[0])
    pairs = sum(context - rows + r + 1 for r in range(rows))
    assert roofline.flops("paged", args, kwargs) == pairs * 4 * 16 * 4
    assert roofline.compute_floor_us(10**9, "float32") > 0
