"""The Mosaic compile check of the TPU sweeps' configs: libtpu's compile-only devices.

libtpu comes with the `test` extra; without it these fail loudly (a TPU kernel that stops
compiling must fail CI).
"""

import dataclasses

import libtpu  # noqa: F401 -- fails loudly without libtpu
import pytest

from attnbench.tuner.check import tpu_check, tpu_static_check
from attnbench.tuner.plan.sweep_file import sweeps_dir

V5E = tpu_check.TPU_TARGETS["v5e"]


def test_sweep_configs_compile_report_vmem_and_a_second_check_compiles_nothing(tmp_path,
                                                                              monkeypatch):
    sweep, cache, lines = sweeps_dir() / "tpu-v5e.yaml", tmp_path / "cache", []
    rows = tpu_static_check.run_check(sweep, [V5E], tmp_path / "a.csv", limit=1, jobs=1,
                                      cache_dir=cache, echo=lines.append)
    assert {(r["problem"].split()[0], r["variant"]) for r in rows} == {
        ("decode", "pallas_tpu"), ("paged", "pallas_tpu"), ("paged_v3", "pallas_tpu")}
    for row in rows:
        assert row["status"] == "ok", row["reason"]
        assert 0 < row["vmem_bytes"] < row["vmem_budget_bytes"] == 16 * 2**20
        assert row["vmem_source"] == "kernel estimate"
    assert any("VMEM ~" in line and "kernel estimate" in line for line in lines)
    assert len(list(cache.rglob("*.json"))) == 3  # one file per (op, variant)

    def no_compiles(*args, **kwargs):
        raise AssertionError("a cached program was compiled again")

    monkeypatch.setattr(tpu_check, "compile_program", no_compiles)
    again = tpu_static_check.run_check(sweep, [V5E], tmp_path / "b.csv", limit=1, jobs=1,
                                       cache_dir=cache, echo=lines.append)
    assert again == rows
    # On a chip with less VMEM than a config's estimate, the config cannot launch.
    small = dataclasses.replace(V5E, scoped_vmem_bytes=min(r["vmem_bytes"] for r in rows) - 1)
    refused = tpu_static_check.run_check(sweep, [small], tmp_path / "c.csv", limit=1, jobs=1,
                                         cache_dir=cache, echo=lines.append)
    assert {r["status"] for r in refused} == {"unlaunchable"}
    assert "bytes of VMEM" in refused[0]["reason"]


def test_a_mosaic_compile_error_is_a_verdict(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        return "MosaicError: no"

    monkeypatch.setattr(tpu_check, "compile_program", broken)
    rows = tpu_static_check.run_check(sweeps_dir() / "tpu-v5e.yaml", [V5E], tmp_path / "a.csv",
                                      limit=1, jobs=1, use_cache=False, echo=lambda line: None)
    assert {(r["status"], r["reason"]) for r in rows} == {("compile_error", "MosaicError: no")}


def test_unknown_tpu_target_names_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown TPU target 'tpu:v4'.*tpu:v5e"):
        tpu_check.parse_target("tpu:v4")


def test_the_cli_refuses_an_unknown_tpu_target_by_name():
    from typer.testing import CliRunner

    from attnbench.cli import app

    result = CliRunner().invoke(app, ["check", "--target", "tpu:v4"])
    assert result.exit_code == 2 and "unknown TPU target" in result.output
