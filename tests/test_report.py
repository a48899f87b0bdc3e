"""`attnbench report` and `attnbench compare` on synthetic run folders (written the way the
runner writes them) and on one tiny real sweep."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread
from typer.testing import CliRunner

from attnbench.cli import app
from attnbench.kernels import DecodeShape, PagedShape
from attnbench.kernels.table import make_key
from attnbench.tuner.report import load_run, write_report
from attnbench.tuner.report.plots import speedup_points
from attnbench.tuner.report.summary import summarize_problems
from attnbench.tuner.results import records as run_files
from attnbench.tuner.results.install import run_table, write_table
from attnbench.tuner.results.selection import select_winners

cli = CliRunner()

DEFAULT_BLOCKED = {"kv_block_size": 128, "num_kv_splits": 1}
BLOCK_SIZES = (64, 128, 256)
SPLITS = (1, 2)
DECODE_SIZES = [(1, 256), (4, 256), (1, 1024), (4, 1024)]  # (batch, max_len)


def _environment() -> dict:
    return {"device_kind": "cpu", "device_kind_raw": "cpu", "platform": "cpu", "host": "test",
            "cpu_count": 2, "read_bandwidth_bytes_per_s": 20e9,
            "versions": {"attnbench": "0.1.0", "jax": "0.10.2", "jaxlib": "0.10.2"}}


def _decode_record(batch: int, max_len: int, variant: str, config: dict, *, status="ok",
                   median=None, spread=0.02, is_default=False, reason="", rel_error=1e-3):
    shape = DecodeShape(batch=batch, max_len=max_len, q_heads=8, kv_heads=2, head_dim=64,
                        dtype="bfloat16")
    problem_id = f"decode-{batch}-{max_len}"
    bytes_moved = batch * max_len * 2 * 64 * 2 * 2
    record = {
        "id": f"{problem_id}-{variant}-{json.dumps(config, sort_keys=True)}",
        "run_id": "synthetic", "device_kind": "cpu", "op": "decode", "problem_id": problem_id,
        "problem": f"decode Hq8/Hkv2/D64 B={batch} S={max_len} uniform bfloat16", "model": "",
        "batch": batch, "sequences": batch, "max_len": max_len, "lengths": "uniform",
        "min_len": 1, "q_heads": 8, "kv_heads": 2, "head_dim": 64, "dtype": "bfloat16",
        "features": [], "variant": variant, "config": config, "is_default": is_default,
        "round": 0, "repeats": 5,
        "key": make_key(shape, "cpu"), "status": status, "reason": reason,
        "bytes_moved": bytes_moved, "floor_us": bytes_moved / 20e9 * 1e6,
    }
    if status in ("ok", "wrong"):
        record.update(relative_error=rel_error, max_abs_error=rel_error * 3, compile_s=0.5)
    if status == "ok":
        record.update(median_us=median, p20_us=median * (1 - spread), p80_us=median * (1 + spread),
                      samples=5)
    return record


def _paged_record(variant: str, config: dict, median: float, is_default: bool):
    shape = PagedShape(num_tokens=40, max_seqs=3, pages_per_seq=8, page_size=16, num_pages=24,
                       q_heads=8, kv_heads=2, head_dim=64, dtype="bfloat16")
    return {
        "id": f"paged-{variant}-{json.dumps(config, sort_keys=True)}", "run_id": "synthetic",
        "device_kind": "cpu", "op": "paged", "problem_id": "paged-3-128",
        "problem": "paged Hq8/Hkv2/D64 seqs=3 ctx=128 page=16 prefill=0.34 uniform bfloat16",
        "model": "", "num_seqs": 3, "sequences": 3, "num_tokens": 40, "page_size": 16,
        "prefill_fraction": 0.34, "prefill_chunk": 16, "max_len": 128, "lengths": "uniform",
        "min_len": 1, "q_heads": 8,
        "kv_heads": 2, "head_dim": 64, "dtype": "bfloat16", "features": [], "variant": variant,
        "config": config, "is_default": is_default, "round": 0, "repeats": 5,
        "key": make_key(shape, "cpu"), "status": "ok", "reason": "", "relative_error": 1e-3,
        "max_abs_error": 3e-3, "compile_s": 0.5, "median_us": median, "p20_us": median * 0.98,
        "p80_us": median * 1.02, "samples": 5, "bytes_moved": 300_000, "floor_us": 15.0,
    }


def synthetic_records(scale: dict | None = None, spread: float = 0.02,
                      sizes=DECODE_SIZES) -> list[dict]:
    """A decode grid (6 configs x 4 problems, one wrong, one compile failure, one timeout,
    one skipped per problem) and one paged problem. `scale` multiplies the times of the
    problems it names (problem id -> factor)."""
    scale = scale or {}
    records = []
    for batch, max_len in sizes:
        factor = scale.get(f"decode-{batch}-{max_len}", 1.0)
        base = 0.05 * batch * max_len
        records.append(_decode_record(batch, max_len, "reference", {}, is_default=True,
                                      median=4 * base * factor, spread=spread))
        for block in BLOCK_SIZES:
            for splits in SPLITS:
                config = {"kv_block_size": block, "num_kv_splits": splits}
                # Fastest: block 256 with 2 splits on long contexts, block 128/1 on short ones.
                penalty = 1 + abs(block - (256 if max_len > 512 else 128)) / 256 + (
                    0.1 * (splits == 1) if max_len > 512 else 0.1 * (splits == 2))
                records.append(_decode_record(batch, max_len, "xla_blocked", config,
                                              median=base * penalty * factor, spread=spread,
                                              is_default=config == DEFAULT_BLOCKED))
        records.append(_decode_record(batch, max_len, "xla_blocked",
                                      {"kv_block_size": 512, "num_kv_splits": 1}, status="wrong",
                                      reason="relative error 0.5 above 0.02",
                                      rel_error=0.5 if batch == 1 else 0.25))
        records.append(_decode_record(batch, max_len, "xla_blocked",
                                      {"kv_block_size": 512, "num_kv_splits": 2},
                                      status="compile_error", reason="ValueError: too big"))
        records.append(_decode_record(batch, max_len, "xla_blocked",
                                      {"kv_block_size": 512, "num_kv_splits": 4},
                                      status="timeout", reason="no result within 10 s"))
        records.append(_decode_record(batch, max_len, "xla_blocked",
                                      {"kv_block_size": 1024, "num_kv_splits": 4},
                                      status="skipped", reason="kv_block_size above max_len"))
    paged_factor = scale.get("paged-3-128", 1.0)
    records.append(_paged_record("reference", {}, 400.0 * paged_factor, True))
    records.append(_paged_record("xla_decode", {"kv_pages_per_block": 8}, 150.0 * paged_factor,
                                 True))
    records.append(_paged_record("xla_decode", {"kv_pages_per_block": 16}, 120.0 * paged_factor,
                                 False))
    return records


def write_run(run_dir: Path, records: list[dict], finished: bool = True) -> Path:
    """A run folder as the runner leaves it: metadata, log, and (finished) CSV and table."""
    run_dir.mkdir(parents=True)
    run_files.write_json_atomic(run_dir / run_files.RUN_FILE, {
        "run_id": run_dir.name, "sweep_name": "synthetic", "sweep_file": "synthetic.yaml",
        "sweep_sha256": "0" * 64, "device_kind": "cpu", "shard": [0, 1],
        "started": "2026-01-02T03:04:05+00:00"})
    run_files.write_json_atomic(run_dir / run_files.ENVIRONMENT_FILE, _environment())
    log = run_files.MeasurementLog(run_dir / run_files.LOG_FILE)
    for record in records:
        log.append(record, sync=False)
    log.sync()
    log.close()
    if finished:
        run_files.write_csv(records, run_dir / run_files.CSV_FILE)
        entries = select_winners(records, noise=0.03, platform="cpu",
                                 provenance={"run_id": run_dir.name})
        write_table(run_dir / run_files.TABLE_FILE,
                    run_table(entries, {"device_kind": "cpu", "run_id": run_dir.name}))
    return run_dir


@pytest.fixture
def run_dir(tmp_path):
    return write_run(tmp_path / "run-a", synthetic_records())


def _check_png(path: Path) -> None:
    image = imread(path)
    height, width = image.shape[:2]
    assert 250 <= height <= 6000 and 300 <= width <= 6000, (path, image.shape)
    assert image.shape[2] in (3, 4)
    assert np.ptp(image[..., :3]) > 0.3, f"{path} looks blank"


def test_report_writes_summary_plots_and_offline_html(run_dir, tmp_path):
    out = tmp_path / "report"
    result = cli.invoke(app, ["report", str(run_dir), "--out", str(out)])
    assert result.exit_code == 0, result.output
    names = {p.name for p in out.iterdir()}
    assert {"summary.md", "index.html", "times_decode.png", "times_paged.png", "bandwidth.png",
            "speedup.png"} <= names
    heatmaps = sorted(out.glob("heatmap_decode_xla_blocked_*.png"))
    assert len(heatmaps) == 1  # one family: all four decode problems share heads and dtype
    pngs = sorted(out.glob("*.png"))
    for png in pngs:
        _check_png(png)
    page = (out / "index.html").read_text()
    assert page.count('src="data:image/png;base64,') == len(pngs)
    assert "http://" not in page and "https://" not in page  # nothing fetched from outside
    assert "<table>" in page and "xla_blocked" in page
    summary = (out / "summary.md").read_text()
    assert "## decode" in summary and "## paged" in summary and "## Worst failures" in summary


def test_report_defaults_to_a_folder_in_the_run(run_dir):
    result = cli.invoke(app, ["report", str(run_dir)])
    assert result.exit_code == 0, result.output
    assert (run_dir / "report" / "summary.md").exists()


def _summary_rows(summary: str) -> dict[str, list[str]]:
    rows = {}
    for line in summary.split("## Worst failures")[0].splitlines():
        if line.startswith("| decode") or line.startswith("| paged"):
            cells = [c.strip() for c in line.strip("|").split(" | ")]
            rows[cells[0]] = cells
    return rows


def test_summary_numbers_match_the_csv(run_dir, tmp_path):
    write_report(run_dir, tmp_path / "out", echo=lambda line: None)
    rows = _summary_rows((tmp_path / "out" / "summary.md").read_text())
    with open(run_dir / run_files.CSV_FILE, newline="") as file:
        csv_rows = list(csv.DictReader(file))
    table = json.loads((run_dir / run_files.TABLE_FILE).read_text())
    assert len(rows) == 5
    for entry in table["entries"]:
        label = entry["source"]["problems"][0]
        cells = rows[label]
        winner = next(r for r in csv_rows if r["problem"] == label and r["variant"] == entry["variant"]
                      and json.loads(r["config"]) == entry["config"])
        assert cells[1] == entry["variant"]
        assert cells[3].startswith(f"{float(winner['median_us']):.1f} (")
        assert cells[4] == f"{float(winner['fraction_of_floor']):.2f}"
        gigabytes = float(winner["bytes_moved"]) / float(winner["median_us"]) / 1e3
        assert cells[5] == f"{gigabytes:.1f}"
        assert cells[6] == f"{float(winner['speedup_vs_default']):.2f}"
        assert cells[7] == f"{float(winner['speedup_vs_reference']):.2f}"
        mine = [r for r in csv_rows if r["problem"] == label]
        count = {s: sum(r["status"] == s for r in mine) for s in run_files.STATUSES}
        assert cells[8:14] == [str(len(mine) - count["skipped"]), str(count["skipped"]),
                               str(count["wrong"]), str(count["compile_error"]),
                               str(count["timeout"]), str(count["error"] + count["crashed"])]
    # The long-context problems are won by block 256 with 2 splits, the short ones by the
    # default (block 128, 1 split), as the synthetic times say.
    assert "kv_block_size=256 num_kv_splits=2" in rows["decode Hq8/Hkv2/D64 B=4 S=1024 uniform bfloat16"][2]
    assert rows["decode Hq8/Hkv2/D64 B=4 S=256 uniform bfloat16"][6] == "1.00"


def test_summary_lists_the_worst_failures(run_dir, tmp_path):
    write_report(run_dir, tmp_path / "out", echo=lambda line: None)
    summary = (tmp_path / "out" / "summary.md").read_text()
    failures = summary.split("## Worst failures")[1]
    wrong_lines = [line for line in failures.splitlines() if "| 0.500 |" in line or "| 0.250 |" in line]
    assert len(wrong_lines) == 4
    assert failures.index("| 0.500 |") < failures.index("| 0.250 |")  # largest error first
    assert "compile_error | 4 | ValueError: too big" in failures
    assert "timeout | 4 |" in failures


def test_measurements_keep_logged_types_and_mark_missing_figures(run_dir):
    measurements = load_run(run_dir).measurements
    paged = measurements[measurements["op"] == "paged"]
    decode = measurements[measurements["op"] == "decode"]
    # A size only one operator has stays an int where it is logged (labels, file names).
    assert set(map(type, paged["page_size"])) == {int} and decode["page_size"].isna().all()
    failed = measurements[measurements["status"] != "ok"]
    assert failed["median_us"].isna().all() and measurements["median_us"].dtype == float


def test_speedup_points_count_sequences_whatever_the_operator(run_dir):
    points = speedup_points(summarize_problems(load_run(run_dir)))
    by_op = points.groupby("op")["sequences"].unique()
    assert sorted(by_op["decode"]) == [1, 4] and list(by_op["paged"]) == [3]


def _compare(a: Path, b: Path, *extra: str):
    return cli.invoke(app, ["compare", str(a), str(b), *extra])


def test_compare_flags_a_20_percent_regression_not_a_2_percent_one(run_dir, tmp_path):
    slower = write_run(tmp_path / "run-b", synthetic_records(scale={"decode-4-1024": 1.20}))
    result = _compare(run_dir, slower)
    assert result.exit_code == 1, result.output
    regressions = result.output.split("REGRESSIONS (1)")[1].split("\n\n")[0]
    assert "batch=4 max_len=1024" in regressions and "x1.200" in regressions

    close = write_run(tmp_path / "run-c", synthetic_records(scale={"decode-4-1024": 1.02}))
    result = _compare(run_dir, close)
    assert result.exit_code == 0, result.output
    assert "no regressions" in result.output and "x1.020" in result.output

    same = _compare(run_dir, run_dir)
    assert same.exit_code == 0 and "no regressions" in same.output
    assert "\x1b[" not in same.output  # not a terminal: no colours, no cursor codes


def test_compare_ignores_a_slowdown_inside_the_noise_band(tmp_path):
    noisy = {"spread": 0.3}  # p20 and p80 30% either side: a 20% shift is within noise
    a = write_run(tmp_path / "a", synthetic_records(**noisy))
    b = write_run(tmp_path / "b", synthetic_records(scale={"decode-4-1024": 1.2}, **noisy))
    result = _compare(a, b)
    assert result.exit_code == 0, result.output
    assert "x1.200" in result.output
    # Beyond the noise band it is flagged even with noisy timings.
    c = write_run(tmp_path / "c", synthetic_records(scale={"decode-4-1024": 2.0}, **noisy))
    assert _compare(a, c).exit_code == 1


def test_compare_threshold_option(run_dir, tmp_path):
    slower = write_run(tmp_path / "run-b", synthetic_records(scale={"decode-1-256": 1.2}))
    assert _compare(run_dir, slower, "--threshold", "25%").exit_code == 0
    assert _compare(run_dir, slower, "--threshold", "0.1").exit_code == 1
    bad = _compare(run_dir, slower, "--threshold", "fast")
    assert bad.exit_code == 2 and "threshold" in bad.output


def test_compare_lists_one_sided_keys_and_changed_winners(run_dir, tmp_path):
    fewer = synthetic_records(sizes=DECODE_SIZES[:3])
    for record in fewer:
        if record["op"] == "paged" and record["config"] == {"kv_pages_per_block": 8}:
            record["median_us"], record["p20_us"], record["p80_us"] = 60.0, 59.0, 61.0
    b = write_run(tmp_path / "run-b", fewer)
    result = _compare(run_dir, b)
    assert result.exit_code == 0, result.output  # faster and fewer keys: no regression
    only_a = result.output.split("keys only in A (1)")[1]
    assert "batch=4 max_len=1024" in only_a
    assert "only in B" not in result.output
    changed = result.output.split("changed winners (1), A | B")[1]
    assert "A: xla_decode kv_pages_per_block=16" in changed
    assert "B: xla_decode kv_pages_per_block=8" in changed
    assert "improvements (1)" in result.output


def test_compare_accepts_tuned_tables(run_dir, tmp_path):
    slower = write_run(tmp_path / "run-b", synthetic_records(scale={"paged-3-128": 1.5}))
    result = _compare(run_dir / run_files.TABLE_FILE, slower / run_files.TABLE_FILE)
    assert result.exit_code == 1, result.output
    assert "REGRESSIONS (1)" in result.output and "paged" in result.output.split("REGRESSIONS")[1]
    mixed = _compare(run_dir / run_files.TABLE_FILE, run_dir)
    assert mixed.exit_code == 0 and "5 shared keys" in mixed.output


def test_every_config_failed(tmp_path):
    records = [dict(r, status="compile_error", reason="ValueError: no", median_us=None)
               for r in synthetic_records() if r["op"] == "decode" and r["variant"] != "reference"]
    run_dir = write_run(tmp_path / "failed", records)
    result = cli.invoke(app, ["report", str(run_dir), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "no config ran correctly" in result.output
    assert not list((tmp_path / "out").glob("*.png"))
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert summary.count("no correct config") == 4 and "ValueError: no" in summary
    # A run whose every config failed, against one that had winners: a regression.
    good = write_run(tmp_path / "good", synthetic_records())
    result = _compare(good, run_dir)
    assert result.exit_code == 1, result.output
    assert "B measured it but no config was correct" in result.output


def test_empty_and_unfinished_runs_give_clear_messages(tmp_path):
    empty = write_run(tmp_path / "empty", [], finished=False)
    result = cli.invoke(app, ["report", str(empty)])
    assert result.exit_code == 2
    assert "holds no measurements yet" in result.output and "Traceback" not in result.output
    result = _compare(empty, empty)
    assert result.exit_code == 2 and "no measurements yet" in result.output

    not_a_run = tmp_path / "plain"
    not_a_run.mkdir()
    result = cli.invoke(app, ["report", str(not_a_run)])
    assert result.exit_code == 2 and "is not a run folder" in result.output
    assert _compare(not_a_run, tmp_path / "missing").exit_code == 2

    # Still running: half the log, no CSV or table yet, and a half-written last line.
    partial = write_run(tmp_path / "partial", synthetic_records()[:20], finished=False)
    with open(partial / run_files.LOG_FILE, "a") as file:
        file.write('{"id": "half-writ')
    result = cli.invoke(app, ["report", str(partial), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "unfinished" in result.output
    assert "**This run is unfinished**" in (tmp_path / "out" / "summary.md").read_text()
    for png in (tmp_path / "out").glob("*.png"):
        _check_png(png)
    result = _compare(partial, partial)
    assert result.exit_code == 0 and "A is an unfinished run" in result.output


def test_broken_table_gives_a_clear_message(tmp_path, run_dir):
    broken = tmp_path / "broken.json"
    broken.write_text('{"schema_version": 1, "meta": {}, "entries": [{"op": "x"}]}')
    result = _compare(run_dir, broken)
    assert result.exit_code == 2
    assert "broken.json" in result.output and "Traceback" not in result.output


_TINY_SWEEP = """
name: tiny-report
devices: ["*"]
seed: 0
timing: {warmup: 1, repeats: 3, max_seconds: 0.2, timeout_s: 120, setup_timeout_s: 300}
search: {strategy: grid}
ops:
  decode:
    problems:
      - {q_heads: 4, kv_heads: 1, head_dim: 32, batch: 2, context: 128, dtype: float32}
    variants:
      reference: {}
      xla_blocked:
        grid: {kv_block_size: [32, 64], num_kv_splits: [1, 2]}
"""


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    """One tiny real sweep (about 20 s): the reference and four xla_blocked configs."""
    from attnbench.tuner import sweep as runner

    folder = tmp_path_factory.mktemp("real")
    sweep = folder / "tiny.yaml"
    sweep.write_text(_TINY_SWEEP)
    return runner.start_sweep(sweep, out=folder / "run", install_winners=False,
                              echo=lambda line: None)


def test_report_and_compare_on_a_real_run(real_run, tmp_path):
    result = cli.invoke(app, ["report", str(real_run), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    for png in (tmp_path / "out").glob("*.png"):
        _check_png(png)
    assert list((tmp_path / "out").glob("heatmap_decode_xla_blocked_*.png"))
    rows = _summary_rows((tmp_path / "out" / "summary.md").read_text())
    table = json.loads((real_run / run_files.TABLE_FILE).read_text())
    (entry,) = table["entries"]
    cells = rows[entry["source"]["problems"][0]]
    assert cells[1] == entry["variant"] and cells[3].startswith(f"{entry['time_us']:.1f} (")

    assert _compare(real_run, real_run).exit_code == 0
    # The same run with every time ten times longer: far outside any timing noise.
    slower = tmp_path / "slower"
    shutil.copytree(real_run, slower)
    records = run_files.read_records(slower / run_files.LOG_FILE)
    for record in records:
        for field in ("median_us", "p20_us", "p80_us"):
            if record.get(field) is not None:
                record[field] *= 10
    (slower / run_files.LOG_FILE).write_text("".join(json.dumps(r) + "\n" for r in records))
    result = _compare(real_run, slower)
    assert result.exit_code == 1, result.output
    assert "x10.000" in result.output


def test_report_has_a_vs_peers_table_and_plot_per_problem(tmp_path):
    records = synthetic_records(sizes=DECODE_SIZES[:1])
    batch, max_len = DECODE_SIZES[0]
    peer = {"peer": "ejkernel 0.0.80.3"}
    records += [
        {**_decode_record(batch, max_len, "ejkernel_ragged_decode_xla", {"kv_blocksize": 256},
                          median=900.0, is_default=True), **peer},
        {**_decode_record(batch, max_len, "ejkernel_ragged_decode_xla", {"kv_blocksize": 512},
                          median=700.0), **peer},
        {**_decode_record(batch, max_len, "ejkernel_ragged_decode_xla", {"kv_blocksize": 64},
                          status="wrong", reason="row error 0.09 > bound 0.0126 at row 1 head 3",
                          rel_error=0.09), **peer},
    ]
    run = write_run(tmp_path / "run-peers", records)
    table = json.loads((run / run_files.TABLE_FILE).read_text())
    peer_entries = [e for e in table["entries"] if "peer" in e["source"]]
    assert [(e["variant"], e["config"]) for e in peer_entries] == [
        ("ejkernel_ragged_decode_xla", {"kv_blocksize": 512})]
    out = tmp_path / "report"
    result = cli.invoke(app, ["report", str(run), "--out", str(out)])
    assert result.exit_code == 0, result.output
    _check_png(out / "peers.png")
    summary = (out / "summary.md").read_text()
    section = summary.split("## vs peers", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ")]
    assert rows[1].startswith("| ours: winner | attnbench | xla_blocked |")
    assert any(r.startswith("| peer: default | ejkernel 0.0.80.3 | ejkernel_ragged_decode_xla "
                            "| kv_blocksize=256 | ok | 900.0 |") for r in rows)
    assert any(r.startswith("| peer: best | ejkernel 0.0.80.3 | ejkernel_ragged_decode_xla "
                            "| kv_blocksize=512 | ok | 700.0 |") for r in rows)
    # The peer never becomes the key's winner, however the table lists its best.
    assert "## decode" in summary and "| ejkernel_ragged_decode_xla |" not in \
        summary.split("## decode", 1)[1].split("\n## ", 1)[0]
