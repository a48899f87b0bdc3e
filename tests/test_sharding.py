"""Every variant per shard (shard_map with heads, sequences or both split, the mesh=
keywords, GSPMD), each against its unsharded call, on 2 and 4 virtual CPU devices.

The checks run in tests/sharded_checks.py in a fresh process with 4 devices (the 2-device
meshes take two of them): this process's JAX backend already started with one device.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

CHECKS = Path(__file__).with_name("sharded_checks.py")


def test_every_variant_per_shard_on_2_and_4_devices():
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONWARNINGS="ignore")
    result = subprocess.run([sys.executable, str(CHECKS)], env=env, capture_output=True,
                            text=True, timeout=1200)
    lines = [line for line in result.stdout.splitlines() if line.startswith(("ok", "FAIL"))]
    report = "\n".join(lines) + "\n" + result.stderr[-3000:]
    assert result.returncode == 0, report
    assert not any(line.startswith("FAIL") for line in lines), report
    # Every variant of every operator was checked in every mode, on both device counts.
    from attnbench import kernels

    modes = {match.group(1) for match in re.finditer(r"^ok   \S+/\S+ \[([^\]]+)\]",
                                                     result.stdout, re.MULTILINE)}
    assert modes == {"tp=2 mesh keyword", "dp=2 shard_map", "gspmd tp=2",
                     "dp=2 x tp=2 shard_map", "gspmd dp=2 x tp=2"}, report
    # Peers are checked as their projects ship them (tests/test_peers.py), not per shard.
    for variant in (v for v in kernels.VARIANTS if v.peer is None):
        for mode in modes:
            assert f"ok   {variant.op}/{variant.name} [{mode}]" in result.stdout, (
                f"{variant.op}/{variant.name} [{mode}] not passed\n{report}")
    for devices in (2, 4):
        for operator in kernels.OPERATORS:
            assert (f"ok   {operator.name} lookups over 3 sharded calls on {devices} devices"
                    in result.stdout), report
        assert (f"ok   interpreted kernels on {devices} devices with PJRT_NPROC={devices} are "
                "refused" in result.stdout), report


def _v3_call(kv_heads, cache_dtype, **keywords):
    from jax.sharding import AbstractMesh

    from attnbench import kernels
    from attnbench.kernels.paged_v3.problem import PagedV3Problem

    problem = PagedV3Problem(num_seqs=2, max_len=16, q_heads=2 * kv_heads, kv_heads=kv_heads,
                             head_dim=32, page_size=8, dtype="float32", cache_dtype=cache_dtype)
    args, kwargs = problem.make_inputs(0)
    return lambda: kernels.ragged_paged_attention_v3(
        *args, **kwargs, mesh=AbstractMesh((2,), ("tp",)), **keywords)


def test_v3_head_split_the_packing_cannot_follow_names_kv_cache():
    # int8 packs 4 combined slots per row: 2 key/value heads are one row, which 2 shards
    # cannot share.
    with pytest.raises(ValueError, match=r"in_specs\[3\] \(kv_cache\).*axis 2 of size 1 over "
                                         r"2 shards.*pack to divide 2 \* Hkv / shards"):
        _v3_call(2, "int8")()


def test_v3_out_specs_name_both_outputs():
    from jax.sharding import PartitionSpec as P

    with pytest.raises(ValueError, match=r"out_specs must be a sequence of 2 PartitionSpecs, "
                                         r"one per output \(output, kv_cache\)"):
        _v3_call(2, "float32", out_specs=P(None, "tp", None))()


def test_v3_sharding_keywords_need_a_mesh():
    from jax.sharding import PartitionSpec as P

    from attnbench import kernels
    from attnbench.kernels.paged_v3.problem import PagedV3Problem

    args, kwargs = PagedV3Problem(num_seqs=1, max_len=8, q_heads=2, kv_heads=1, head_dim=32,
                                  page_size=8, dtype="float32").make_inputs(0)
    with pytest.raises(ValueError, match="out_specs needs mesh="):
        kernels.ragged_paged_attention_v3(*args, **kwargs, out_specs=(P(), P()))


def test_a_split_that_does_not_divide_an_axis_names_the_argument():
    from jax.sharding import AbstractMesh

    from attnbench import kernels
    from attnbench.kernels.decode.problem import DecodeProblem

    args, kwargs = DecodeProblem(batch=2, max_len=8, q_heads=2, kv_heads=1, head_dim=32,
                                 dtype="float32").make_inputs(0)
    with pytest.raises(ValueError, match=r"decode_attention over mesh \{'tp': 2\}: in_specs\[1\] "
                                         r"\(key\) = .* splits axis 2 of size 1 over 2 shards"):
        kernels.decode_attention(*args, **kwargs, mesh=AbstractMesh((2,), ("tp",)))
