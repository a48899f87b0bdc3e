"""The sweep's parent never creates a JAX backend: on a TPU, whoever does holds the chip."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import pytest
from jax._src import xla_bridge

from attnbench.kernels import jax_compat, tpu_limits
from attnbench.kernels.platform import lowering_for
from attnbench.tuner.plan.sweep_file import quick_sweep_path
from attnbench.tuner.results import records


class BackendTaken(RuntimeError):
    pass


@pytest.fixture
def no_backend_here(monkeypatch):
    """Makes every way into a JAX backend raise in this process (spawned workers are fresh
    interpreters and unaffected), and makes it look as if none was ever created."""
    def refuse(*args, **kwargs):
        raise BackendTaken("the parent process asked JAX for a backend")

    for name in ("backends", "get_backend", "_get_backend_uncached", "default_backend"):
        monkeypatch.setattr(xla_bridge, name, refuse)
    monkeypatch.setattr(jax_compat, "backends_initialized", lambda: False)
    with pytest.raises(BackendTaken):  # the trap itself works
        jax.devices()


def test_vmem_budget_never_creates_a_backend(no_backend_here):
    smallest = int(min(tpu_limits.SCOPED_VMEM_BYTES.values()) * tpu_limits.VMEM_SAFETY_FRACTION)
    assert tpu_limits.vmem_budget_bytes() == smallest
    with lowering_for("tpu", "tpu-v6e"):
        assert tpu_limits.vmem_budget_bytes() == int(
            tpu_limits.SCOPED_VMEM_BYTES["tpu-v6e"] * tpu_limits.VMEM_SAFETY_FRACTION)


def test_device_selftest_runs_a_whole_quick_sweep_with_the_parents_backend_refused(
        tmp_path, monkeypatch, no_backend_here):
    """`attnbench selftest --device` on this host, with the quick sweep: the checks and the
    sweep run in workers while every backend entry of this process raises."""
    from attnbench.tuner.device_selftest import REPORT_FILE, run_device_selftest

    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    lines = []
    report = run_device_selftest(tmp_path / "selftest", sweep_path=quick_sweep_path(),
                                 echo=lines.append)
    assert report == json.loads((tmp_path / "selftest" / REPORT_FILE).read_text())
    assert report["ok"], report
    assert report["environment"]["device_kind"] == "cpu"
    checked = {(row["op"], row["variant"]): row for row in report["variants"]}
    assert {("decode", "xla_blocked"), ("paged", "xla_blocked")} <= set(checked)
    assert all(row["status"] == "ok" and row["relative_error"] is not None
               for row in checked.values())
    timers = report["timers"]
    assert timers["profiler"]["timer"] == "profiler" and timers["wall"]["timer"] == "wall"
    assert timers["profiler"]["timer_note"] == ""
    # The device's time of a call is within the wall clock of that same call.
    assert 0 < timers["profiler"]["median_us"] <= timers["profiler"]["wall_median_us"]
    measured = records.read_records(Path(report["sweep"]["run_dir"]) / records.LOG_FILE)
    assert measured and {r["status"] for r in measured} <= {"ok", "skipped"}
    assert {r["timer"] for r in measured if r["status"] == "ok"} == {"wall"}
    assert {r["cache"] for r in measured if r["status"] == "ok"} <= {"warm", "cold"}
    from attnbench.tuner.plan.sweep_file import load_sweep

    # One winner per operator of the quick sweep.
    assert report["sweep"]["winners"] == len(load_sweep(quick_sweep_path()).variants)
