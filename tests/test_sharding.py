"""Every variant per shard (shard_map with heads, sequences or both split, the mesh=
keywords, GSPMD), each against its unsharded call, on 2 and 4 virtual CPU devices.

The checks run in tests/sharded_checks.py in a fresh process per device count: this
process's JAX backend already started with one device.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

CHECKS = Path(__file__).with_name("sharded_checks.py")


@pytest.mark.parametrize("devices", [2, 4])
def test_every_variant_per_shard(devices):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONWARNINGS="ignore")
    result = subprocess.run([sys.executable, str(CHECKS), str(devices)], env=env,
                            capture_output=True, text=True, timeout=900)
    lines = [line for line in result.stdout.splitlines()
             if line.startswith(("ok", "FAIL", "not run"))]
    report = "\n".join(lines) + "\n" + result.stderr[-3000:]
    assert result.returncode == 0, report
    assert not any(line.startswith("FAIL") for line in lines), report
    # Every variant of the operators that take mesh= was checked at least once per device
    # count (ragged_paged_attention_v3 refuses mesh= by name: test_v3_declines_mesh_by_name).
    import inspect

    from attnbench import kernels

    sharded_ops = {o.name for o in kernels.OPERATORS
                   if "mesh" in inspect.signature(o.function).parameters}
    assert sharded_ops == {"decode", "paged"}
    # Peers are checked as their projects ship them (tests/test_peers.py), not per shard.
    for variant in (v for v in kernels.VARIANTS if v.op in sharded_ops and v.peer is None):
        assert any(line.startswith(f"ok   {variant.op}/{variant.name} [") for line in lines), (
            f"{variant.op}/{variant.name} not checked on {devices} devices\n{report}")


def test_v3_declines_mesh_by_name():
    from attnbench import kernels

    with pytest.raises(ValueError, match="ragged_paged_attention_v3 does not take mesh="):
        kernels.get_operator("paged_v3").shard_specs("tp", ())
