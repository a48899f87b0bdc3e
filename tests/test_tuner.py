"""The tuner: sweep files, the safe evaluator, sweeps end to end, failures, resume, merge."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import tuner_variants
from attnbench.kernels import lookup, registry
from attnbench.kernels.table import make_key, read_table
from attnbench.tuner import sweep as runner
from attnbench.tuner.plan import expressions, space
from attnbench.tuner.results import records, selection
from attnbench.tuner.measure.accuracy import RELATIVE_ERROR_BOUND
from attnbench.kernels.decode.problem import DecodeProblem
from attnbench.tuner.plan.sweep_file import (SweepFileError, load_sweep, sweep_problems_in_file,
                                        sweep_warnings_in_file)

TESTS_DIR = Path(__file__).resolve().parent
REPO = TESTS_DIR.parent
TINY = {"q_heads": 4, "kv_heads": 2, "head_dim": 32, "batch": 2, "context": 64,
        "dtype": "float32"}
FAST_TIMING = {"warmup": 1, "repeats": 3, "max_seconds": 0.2, "timeout_s": 20,
               "setup_timeout_s": 240}


@pytest.fixture
def test_variants(monkeypatch):
    monkeypatch.setattr(registry, "VARIANTS", registry.VARIANTS + tuner_variants.VARIANTS)


def write_sweep(path: Path, ops: dict, **top) -> Path:
    data = {"devices": ["cpu"], "timing": FAST_TIMING, "ops": ops, **top}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def by_config(run_records):
    return {(r["variant"], space.canonical(r["config"]), r["round"]): r for r in run_records}


# ---- The safe evaluator ---------------------------------------------------------------------


@pytest.mark.parametrize("text, names, value", [
    ("kv_pages_per_block * page_size <= 2048", {"kv_pages_per_block": 8, "page_size": 16}, True),
    ("kv_pages_per_block * page_size <= 2048", {"kv_pages_per_block": 256, "page_size": 16},
     False),
    ("1 < a <= 4 and not b", {"a": 4, "b": False}, True),
    ("min(a, 3) + max(a // 2, 1) ** 2 - a % 3", {"a": 5}, 3 + 4 - 2),
    ("a / 2 == 2.5 or a", {"a": 5}, True),
    ("-a + +a != 0", {"a": 1}, False),
])
def test_evaluator_computes(text, names, value):
    assert expressions.parse(text).evaluate(names) == value


@pytest.mark.parametrize("text, words", [
    ("a.__class__", "attribute"),
    ("().__class__.__bases__", "attribute"),
    ("__import__('os').system('true')", "only min"),
    ("open('x')", "only min"),
    ("a[0]", "subscript"),
    ("'text' == a", "numbers"),
    ("lambda: 1", "Lambda"),
    ("[x for x in a]", "ListComp"),
    ("min", "can only be called"),
    ("max(a, key=b)", "plain arguments"),
    ("a if b else c", "IfExp"),
    ("a = 1", "not a valid expression"),
])
def test_evaluator_refuses(text, words):
    with pytest.raises(expressions.ExpressionError, match=words):
        expressions.parse(text)


def test_evaluator_guards_at_run_time():
    with pytest.raises(expressions.ExpressionError, match="too large"):
        expressions.parse("2 ** a").evaluate({"a": 10**6})
    with pytest.raises(expressions.ExpressionError, match="unknown name"):
        expressions.parse("b > 1").evaluate({"a": 1})
    with pytest.raises(expressions.ExpressionError, match="division"):
        expressions.parse("1 // a").evaluate({"a": 0})
    assert expressions.parse("a * b > c").names == {"a", "b", "c"}


# ---- Sweep files ------------------------------------------------------------------------------


def test_bad_sweep_file_gives_located_errors(tmp_path, test_variants):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({
        "devices": "cpu",
        "timing": {"repeats": 0, "bogus": 1},
        "search": {"strategy": "annealing", "keep": 1.5},
        "tolerances": {"bfloat16": -1},
        "ops": {
            "decode": {
                "problems": [
                    {"model": "llama-9", "batch": [1, 8], "context": 128},
                    {"q_heads": 6, "kv_heads": 4, "head_dim": 32, "context": 64},
                    {"q_heads": 4, "kv_heads": 2, "batch": [2, "x"], "context": 64,
                     "lengths": "gaussian"},
                ],
                "variants": {
                    "test_good": {
                        "grid": {"block": [16, 32, -3], "extra_work": 3, "nonsense": [1]},
                        "constraints": ["block.real > 1", "block * widgets <= 4", "block >"],
                    },
                    "not_a_variant": {},
                },
            },
            "prefill": {},
        },
    }))
    problems = sweep_problems_in_file(path)
    text = "\n".join(problems)
    expected = [
        "devices: must be a non-empty list",
        "timing.repeats: must be a positive int, got 0",
        "timing.bogus: unknown field",
        "search.strategy: must be one of ['grid', 'random', 'halving'], got 'annealing'",
        "search.keep: must be a share in (0, 1), got 1.5",
        "tolerances.bfloat16: must be a number > 0, got -1",
        "ops.prefill: unknown field",
        "ops.decode.problems[0].model: unknown model preset 'llama-9'",
        "ops.decode.problems[1]: q_heads 6 must be a multiple of kv_heads 4",
        "ops.decode.problems[2]: needs `model` or an explicit `head_dim`",
        "ops.decode.problems[2].batch[1]: must be a positive int, got 'x'",
        "ops.decode.problems[2].lengths: must be one of ['fixed', 'uniform', 'long_tail']",
        "ops.decode.variants.test_good.grid.block[2]: must be a positive int, got -3",
        "ops.decode.variants.test_good.grid.extra_work: must be a non-empty list",
        "ops.decode.variants.test_good.grid.nonsense: 'test_good' has no tunable 'nonsense'",
        "ops.decode.variants.test_good.constraints[0]: 'block.real > 1' attribute access",
        "ops.decode.variants.test_good.constraints[1]: unknown name(s) ['widgets']",
        "ops.decode.variants.test_good.constraints[2]: 'block >' is not a valid expression",
    ]
    for line in expected:
        assert any(p.startswith(line) for p in problems), f"missing {line!r} in:\n{text}"
    with pytest.raises(SweepFileError) as raised:
        load_sweep(path)
    assert raised.value.problems == problems


def test_yaml_syntax_error_names_the_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("devices: [cpu]\nops:\n  decode: {problems: [\n")
    (problem,) = sweep_problems_in_file(path)
    assert problem.startswith("(line ") and "not valid YAML" in problem


def test_unregistered_variant_is_a_warning_and_presets_expand(tmp_path):
    path = write_sweep(tmp_path / "s.yaml", {
        "decode": {"problems": [{"model": ["mistral-7b", "gpt-oss-20b"], "batch": [1, 4],
                                 "context": [1024, 4096], "lengths": "long_tail"}],
                   "variants": {"no_such_variant_yet": {"samples": 2}}},
        "paged": {"problems": [{"model": "gemma-2-9b", "num_seqs": 4, "context": 2048,
                                "prefill_fraction": [0.0, 0.5], "page_size": 32}],
                  "variants": {"reference": {}}},
    })
    assert sweep_problems_in_file(path) == []
    (warning,) = sweep_warnings_in_file(path)
    assert "ops.decode.variants.no_such_variant_yet" in warning and "not registered" in warning
    spec = load_sweep(path)
    decode = [p.problem for p in spec.problems if p.op == "decode"]
    assert len(decode) == 8 and {p.sliding_window for p in decode} == {4096, 128}
    assert all(p.sinks == (p.head_dim == 64) for p in decode)
    paged = [p.problem for p in spec.problems if p.op == "paged"]
    assert [p.prefill_fraction for p in paged] == [0.0, 0.5]
    assert all(p.logits_soft_cap == 50.0 and p.page_size == 32 for p in paged)
    # The reference is measured even where the file does not name it (speedups need it).
    assert [v.variant.name for v in spec.variants["decode"]] == ["reference"]


def test_shipped_sweep_files_are_valid():
    files = sorted((REPO / "sweeps").glob("*.yaml"))
    assert {f.name for f in files} >= {"quick.yaml", "cpu.yaml", "nvidia-h100.yaml",
                                       "nvidia-a100.yaml", "tpu-v5e.yaml", "tpu-v6e.yaml"}
    for path in files:
        assert sweep_problems_in_file(path) == [], path


def test_candidates_prune_and_always_keep_the_default(tmp_path, test_variants):
    path = write_sweep(tmp_path / "s.yaml", {"decode": {
        "problems": [dict(TINY)],
        "variants": {"test_good": {"grid": {"extra_work": [1, 2, 3], "block": [32, 128]},
                                   "constraints": ["extra_work * block < 90"]}}}})
    spec = load_sweep(path)
    problem = spec.problems[0]
    candidates = space.problem_candidates(spec, problem, problem.problem.shape(), "cpu")
    good = [c for c in candidates if c.variant.name == "test_good"]
    default = good[0]
    assert default.is_default and default.config == {"extra_work": 0, "block": 16}
    runnable = {(c.config["extra_work"], c.config["block"]) for c in good if not c.skip_reason}
    assert runnable == {(0, 16), (1, 32), (2, 32)}
    reasons = {(c.config["extra_work"], c.config["block"]): c.skip_reason
               for c in good if c.skip_reason}
    assert reasons[(3, 32)] == "constraint `extra_work * block < 90` is false"
    assert reasons[(1, 128)] == "block 128 > S 64"


def test_problems_that_differ_only_in_sizes_sample_the_same_configs(tmp_path, test_variants):
    grid = {"extra_work": list(range(8)), "block": [16, 32, 64, 128]}
    sized = [dict(TINY, batch=2, context=64), dict(TINY, batch=8, context=128),
             dict(TINY, batch=2, context=64, q_heads=8)]
    path = write_sweep(tmp_path / "s.yaml", {"decode": {
        "problems": sized, "variants": {"test_good": {"grid": grid, "samples": 5}}}})
    spec = load_sweep(path)

    def sampled(problem):
        return {space.canonical(c.config) for c in space.problem_candidates(
            spec, problem, problem.problem.shape(), "cpu")
            if c.variant.name == "test_good" and not c.is_default and not c.skip_reason}

    small, large, other_heads = (sampled(p) for p in spec.problems)
    assert len(small) == len(large) == len(other_heads) == 5
    # Every config valid for both sizes (block <= 64) that the larger one drew, the smaller
    # one drew too: the sample depends on the model, not on the batch or context.
    assert {c for c in large if '"block":128' not in c} <= small
    assert other_heads != small  # another model draws its own sample


def test_selection_prefers_a_default_within_noise():
    def record(variant, config, median, default, problem="p", spread=0.01):
        return {"problem_id": problem, "round": 0, "status": "ok", "variant": variant,
                "config": config, "is_default": default, "median_us": median,
                "p20_us": median * (1 - spread), "p80_us": median * (1 + spread),
                "key": {"op": "decode", "k": problem}}

    runs = [record("reference", {}, 200.0, True), record("v", {"a": 1}, 100.0, True),
            record("v", {"a": 2}, 98.0, False)]
    (entry,) = selection.select_winners(runs, noise=0.03, platform="cpu", provenance={})
    assert (entry.variant, entry.config) == ("v", {"a": 1})
    assert "within noise" in entry.source["chosen"]
    runs[2] = record("v", {"a": 2}, 50.0, False)
    (entry,) = selection.select_winners(runs, noise=0.03, platform="cpu", provenance={})
    assert (entry.variant, entry.config) == ("v", {"a": 2})
    assert entry.source["speedup_vs_default"] == pytest.approx(2.0)
    assert entry.source["speedup_vs_reference"] == pytest.approx(4.0)
    # A wrong or failed config never wins, however fast it claims to be.
    runs.append({**record("v", {"a": 3}, 1.0, False), "status": "wrong"})
    (entry,) = selection.select_winners(runs, noise=0.03, platform="cpu", provenance={})
    assert entry.config == {"a": 2}


def test_log_repairs_a_half_written_line(tmp_path):
    path = tmp_path / records.LOG_FILE
    log = records.MeasurementLog(path)
    log.append({"id": "a"})
    log.close()
    with open(path, "a") as file:
        file.write('{"id": "b", "stat')
    log = records.MeasurementLog(path)
    assert log.repaired_bytes == len('{"id": "b", "stat')
    log.append({"id": "c"})
    log.close()
    assert [r["id"] for r in records.read_records(path)] == ["a", "c"]


# ---- Sweeps that run --------------------------------------------------------------------------


def test_sweep_end_to_end_with_failing_variants(tmp_path, test_variants):
    """YAML -> measurements -> table -> the operator's lookup picks the winner; each way a
    kernel can fail is recorded as such, never wins, and the sweep goes on after it."""
    sweep = write_sweep(tmp_path / "sweep.yaml", {"decode": {
        "problems": [dict(TINY)],
        "variants": {
            "reference": {},
            "test_good": {"grid": {"extra_work": [0, 6], "block": [16, 32, 128]}},
            "test_wrong": {},
            "test_compile_error": {},
            "test_hang": {},
            "test_crash": {},
        }}}, search={"strategy": "halving", "keep": 0.5, "rounds": 2, "first_repeats": 2},
        timing={**FAST_TIMING, "timeout_s": 8})
    lines = []
    run_dir = runner.start_sweep(sweep, out=tmp_path / "run", echo=lines.append)
    run_records = records.read_records(run_dir / records.LOG_FILE)
    assert len({r["id"] for r in run_records}) == len(run_records)
    found = by_config(run_records)

    wrong_scaled = found[("test_wrong", '{"mode":"scaled"}', 0)]
    assert wrong_scaled["status"] == "wrong"
    assert wrong_scaled["relative_error"] > RELATIVE_ERROR_BOUND["float32"]
    assert wrong_scaled["max_abs_error"] > 0
    wrong_nan = found[("test_wrong", '{"mode":"nan"}', 0)]
    assert wrong_nan["status"] == "wrong" and "NaN" in wrong_nan["reason"]
    failed = found[("test_compile_error", "{}", 0)]
    assert failed["status"] == "compile_error" and "never compiles" in failed["reason"]
    assert found[("test_hang", "{}", 0)]["status"] == "timeout"
    exited = found[("test_crash", '{"how":"exit"}', 0)]
    assert exited["status"] == "crashed" and "exited with code 3" in exited["reason"]
    segfault = found[("test_crash", '{"how":"segfault"}', 0)]
    assert segfault["status"] == "crashed" and "SIGSEGV" in segfault["reason"]
    skipped = found[("test_good", '{"block":128,"extra_work":0}', 0)]
    assert skipped["status"] == "skipped" and skipped["reason"] == "block 128 > S 64"
    # The sweep went on after each failure: later configs ran fine in fresh workers.
    assert len({r["worker_pid"] for r in run_records if "worker_pid" in r}) >= 4
    for config in ('{"block":16,"extra_work":0}', '{"block":32,"extra_work":6}'):
        ok = found[("test_good", config, 0)]
        assert ok["status"] == "ok", ok
        assert ok["relative_error"] <= RELATIVE_ERROR_BOUND["float32"]
        assert 0 < ok["p20_us"] <= ok["median_us"] <= ok["p80_us"]
        assert ok["compile_s"] > 0 and ok["samples"] == 2 and ok["bytes_moved"] > 0
    # Halving: round 1 holds the fastest half plus the defaults, timed longer.
    second = [r for r in run_records if r["round"] == 1]
    assert {r["variant"] for r in second} <= {"reference", "test_good"}
    assert ("test_good", '{"block":16,"extra_work":0}', 1) in found
    assert all(r["status"] == "ok" and r["samples"] == 3 for r in second)

    with open(run_dir / records.CSV_FILE, newline="") as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == len(run_records)
    for column in ("run_id", "device_kind", "op", "variant", "extra_work", "block", "batch",
                   "max_len", "dtype", "features", "status", "max_abs_error", "relative_error",
                   "compile_s", "median_us", "p20_us", "p80_us", "samples", "bytes_moved",
                   "floor_us", "fraction_of_floor", "speedup_vs_default", "speedup_vs_reference"):
        assert column in rows[0], column
    ok_rows = [r for r in rows if r["status"] == "ok" and r["variant"] == "test_good"]
    assert all(float(r["speedup_vs_reference"]) > 0 and float(r["floor_us"]) > 0 for r in ok_rows)

    environment = json.loads((run_dir / records.ENVIRONMENT_FILE).read_text())
    assert environment["device_kind"] == "cpu" and environment["read_bandwidth_bytes_per_s"] > 0
    (entry,) = read_table(run_dir / records.TABLE_FILE).entries
    assert entry.variant in ("reference", "test_good")
    final = [r for r in second if r["status"] == "ok"]
    assert entry.time_us <= min(r["median_us"] for r in final) * 1.5
    installed = read_table(lookup.user_tuned_dir() / "cpu.json")
    assert installed.entries == (entry,)
    assert entry.source["sweep_sha256"] == load_sweep(sweep).sha256
    assert entry.source["run_id"] == json.loads((run_dir / "run.json").read_text())["run_id"]

    shape = DecodeProblem(**{k: v for k, v in TINY.items() if k != "context"},
                          max_len=TINY["context"]).shape()
    choice = lookup.choose(shape, device_kind="cpu", platform="cpu")
    assert choice.source.startswith("user tuned folder")
    assert (choice.variant.name, choice.config.to_dict()) == (entry.variant, entry.config)
    assert entry.key == make_key(shape, "cpu")


def _driver(sweep: Path, out: Path) -> str:
    return (f"import sys; sys.path.insert(0, {str(TESTS_DIR)!r}); import tuner_variants; "
            "from attnbench.kernels import registry; "
            "registry.VARIANTS = registry.VARIANTS + tuner_variants.VARIANTS; "
            "from attnbench.tuner import sweep as runner; "
            f"runner.start_sweep({str(sweep)!r}, out={str(out)!r}, install_winners=False)")


def _process_gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "State:\tZ" in state or "State:\tX" in state


def test_sigkilled_sweep_resumes_with_each_measurement_once(tmp_path, test_variants):
    sweep = write_sweep(tmp_path / "sweep.yaml", {"decode": {
        "problems": [dict(TINY)],
        "variants": {"test_good": {"grid": {"extra_work": [0, 1, 2, 3, 4, 5],
                                            "block": [16, 32, 128]}}}}})
    out = tmp_path / "run"
    log_path = out / records.LOG_FILE
    process = subprocess.Popen([sys.executable, "-c", _driver(sweep, out)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    try:
        while time.monotonic() < deadline:
            done = [r for r in records.read_records(log_path) if r["status"] != "skipped"]
            if len(done) >= 3 or process.poll() is not None:
                break
            time.sleep(0.05)
        assert process.poll() is None, "the sweep ended before it could be killed"
        process.send_signal(signal.SIGKILL)
        process.wait(30)
    finally:
        if process.poll() is None:
            process.kill()
    before = records.read_records(log_path)
    measured = [r for r in before if r["status"] != "skipped"]
    assert 3 <= len(measured) < 13
    # The worker dies with its parent instead of running on as an orphan.
    worker_pid = measured[-1]["worker_pid"]
    deadline = time.monotonic() + 10
    while not _process_gone(worker_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _process_gone(worker_pid)
    with open(log_path, "a") as file:  # as if the kill had come in the middle of a write
        file.write('{"id": "half-writ')

    lines = []
    runner.resume_sweep(out, install_winners=False, echo=lines.append)
    assert any("repaired" in line for line in lines)
    after = records.read_records(log_path)
    ids = [r["id"] for r in after]
    assert len(ids) == len(set(ids))
    assert {r["id"]: r for r in before}.items() <= {r["id"]: r for r in after}.items()
    spec = load_sweep(sweep)
    problem = spec.problems[0]
    candidates = space.problem_candidates(spec, problem, problem.problem.shape(), "cpu")
    expected = {space.measurement_id(problem, c.variant.name, c.config, 0) for c in candidates}
    assert set(ids) == expected
    assert sum(r["status"] == "ok" for r in after) == 13  # 12 valid test_good + reference
    assert (out / records.TABLE_FILE).exists() and (out / records.CSV_FILE).exists()


def test_shards_merge_into_one_run(tmp_path, test_variants):
    sweep = write_sweep(tmp_path / "sweep.yaml", {"decode": {
        "problems": [{**TINY, "batch": [1, 4]}],
        "variants": {"reference": {}, "test_good": {"grid": {"extra_work": [0, 2]}}}}})
    shards = [runner.start_sweep(sweep, out=tmp_path / f"shard{i}", shard=(i, 2),
                                 install_winners=False, echo=lambda line: None)
              for i in range(2)]
    shard_records = [records.read_records(s / records.LOG_FILE) for s in shards]
    assert all(len({r["problem_id"] for r in rs}) == 1 for rs in shard_records)
    assert shard_records[0][0]["problem_id"] != shard_records[1][0]["problem_id"]
    merged = runner.merge_runs(shards, out=tmp_path / "merged", echo=lambda line: None)
    merged_records = records.read_records(merged / records.LOG_FILE)
    assert sorted(r["id"] for r in merged_records) == sorted(
        r["id"] for rs in shard_records for r in rs)
    table = read_table(merged / records.TABLE_FILE)
    assert sorted(e.key["batch"] for e in table.entries) == [1, 4]
    assert len(read_table(lookup.user_tuned_dir() / "cpu.json").entries) == 2
    with pytest.raises(runner.SweepError, match="already holds files"):
        runner.merge_runs(shards, out=tmp_path / "merged", echo=lambda line: None)


def _cli(*arguments, env):
    return subprocess.run([sys.executable, "-m", "attnbench.cli", *arguments],
                          capture_output=True, text=True, env=env, timeout=300)


def test_cli_quick_sweep_installs_what_lookup_reports(tmp_path):
    env = {**os.environ, "XDG_DATA_HOME": str(tmp_path / "xdg"), "JAX_PLATFORMS": "cpu"}
    env.pop(lookup.TUNED_ENV, None)
    dry = _cli("sweep", "--quick", "--dry-run", env=env)
    assert dry.returncode == 0, dry.stderr
    assert "total: 3 problems" in dry.stdout and "reference" in dry.stdout
    run = _cli("sweep", "--quick", "--out", str(tmp_path / "run"), env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    table = read_table(tmp_path / "run" / records.TABLE_FILE)
    decode = [e for e in table.entries if e.op == "decode"]
    assert len(table.entries) == 3 and len(decode) == 1
    shown = _cli("lookup", "--op", "decode", "--q-heads", "8", "--kv-heads", "2",
                 "--head-dim", "64", "--batch", "2", "--max-len", "256", env=env)
    assert shown.returncode == 0, shown.stderr
    assert "source:  user tuned folder" in shown.stdout
    assert f"variant: {decode[0].variant}" in shown.stdout
    # The v3 entry's key holds its cache dtype: lookup finds it only for that cache.
    v3 = ["lookup", "--op", "paged_v3", "--q-heads", "8", "--kv-heads", "2", "--head-dim", "64",
          "--tokens", "34", "--max-len", "128", "--page-size", "16", "--max-seqs", "4"]
    assert "source:  user tuned folder" in _cli(*v3, "--cache-dtype", "int8", env=env).stdout
    assert "source:  heuristic default" in _cli(*v3, env=env).stdout
    again = _cli("sweep", "--quick", "--out", str(tmp_path / "run"), env=env)
    assert again.returncode == 1 and "--resume" in again.stderr
