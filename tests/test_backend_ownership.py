"""The sweep's parent never creates a JAX backend: on a TPU, whoever does holds the chip."""

from __future__ import annotations

import jax
import pytest
from jax._src import xla_bridge

from attnbench.kernels import jax_compat, tpu_limits
from attnbench.kernels.platform import lowering_for
from attnbench.tuner import sweep as runner
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


def test_whole_quick_sweep_with_the_parents_backend_refused(tmp_path, monkeypatch,
                                                            no_backend_here):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    lines = []
    run_dir = runner.start_sweep(quick_sweep_path(), out=tmp_path / "run",
                                 install_winners=False, echo=lines.append)
    measured = records.read_records(run_dir / records.LOG_FILE)
    assert measured and all(r["status"] in ("ok", "skipped") for r in measured), [
        (r["variant"], r["status"], r.get("reason")) for r in measured
        if r["status"] not in ("ok", "skipped")]
    assert (run_dir / records.TABLE_FILE).exists()
