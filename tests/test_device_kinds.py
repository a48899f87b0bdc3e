"""The chips people have: device-kind names, sweep choice by kind/family/platform, and the
tuned-table fallback to a chip of the same family."""

from __future__ import annotations

import json

import pytest

from attnbench.kernels import DecodeShape, devices, lookup
from attnbench.kernels.platform import normalize_device_kind
from attnbench.kernels.table import SCHEMA_VERSION, make_key
from attnbench.tuner.plan.sweep_file import (choose_device_sweep, load_sweep,
                                             sweep_for_device)


@pytest.mark.parametrize("raw, kind", [
    ("NVIDIA H100 80GB HBM3", "nvidia-h100"), ("NVIDIA H200", "nvidia-h200"),
    ("NVIDIA GH200 480GB", "nvidia-gh200"), ("NVIDIA H20", "nvidia-h20"),
    ("NVIDIA H800", "nvidia-h800"), ("NVIDIA B200", "nvidia-b200"),
    ("NVIDIA GB200", "nvidia-gb200"), ("NVIDIA L40S", "nvidia-l40s"), ("NVIDIA L4", "nvidia-l4"),
    ("NVIDIA A10G", "nvidia-a10g"), ("NVIDIA GeForce RTX 4090", "nvidia-rtx-4090"),
    ("NVIDIA A100-SXM4-80GB", "nvidia-a100"), ("NVIDIA A100 80GB PCIe", "nvidia-a100"),
    ("NVIDIA A100-PCIE-40GB", "nvidia-a100"), ("TPU v4", "tpu-v4"), ("TPU v5 lite", "tpu-v5e"),
    ("TPU v5", "tpu-v5p"), ("TPU v5p", "tpu-v5p"), ("TPU v6 lite", "tpu-v6e"),
    ("TPU7x", "tpu-v7x"), ("cpu", "cpu"),
])
def test_device_kinds_normalize(raw, kind):
    assert normalize_device_kind(raw) == kind


def test_every_listed_chip_has_a_family_and_a_cache_size():
    for kind, chip in devices.CHIPS.items():
        assert chip.family and chip.cache_bytes >= 0, kind
        assert devices.platform_of_kind(kind) in ("gpu", "tpu")
    # Cold-cache flushes on an unknown GPU must still evict any listed GPU's L2.
    assert devices.cache_bytes("nvidia-t4", "gpu") >= devices.cache_bytes("nvidia-b200", "gpu")
    assert devices.cache_bytes("cpu", "cpu") == 0


@pytest.mark.parametrize("kind, file, match", [
    ("nvidia-h100", "nvidia-h100.yaml", "exact"),
    ("nvidia-h200", "nvidia-h100.yaml", "family nvidia-hopper"),
    ("nvidia-gh200", "nvidia-h100.yaml", "family nvidia-hopper"),
    ("nvidia-h20", "nvidia-h100.yaml", "family nvidia-hopper"),
    ("nvidia-h800", "nvidia-h100.yaml", "family nvidia-hopper"),
    ("nvidia-b200", "nvidia-blackwell.yaml", "pattern"),
    ("nvidia-gb200", "nvidia-blackwell.yaml", "pattern"),
    ("nvidia-l40s", "nvidia-ada.yaml", "pattern"),
    ("nvidia-l4", "nvidia-ada.yaml", "pattern"),
    ("nvidia-rtx-4090", "nvidia-ada.yaml", "pattern"),
    ("nvidia-a10g", "nvidia-a100.yaml", "family nvidia-ampere"),
    ("nvidia-a100", "nvidia-a100.yaml", "exact"),
    ("tpu-v5p", "tpu-v5e.yaml", "family tpu-v5"),
    ("tpu-v6e", "tpu-v6e.yaml", "exact"),
    ("tpu-v4", "tpu-v5e.yaml", "generic tpu"),
    ("tpu-v7x", "tpu-v5e.yaml", "generic tpu"),
    ("nvidia-t4", "gpu.yaml", "generic gpu"),
])
def test_sweep_choice_by_kind_then_family_then_platform(kind, file, match):
    chosen = choose_device_sweep(kind)
    assert (chosen.path.name, chosen.match) == (file, match)
    assert bool(chosen.warning) == match.startswith("generic")
    # The chosen file accepts the device when the sweep starts.
    assert load_sweep(chosen.path).matches_device(kind)


def test_an_unknown_gpu_by_platform_alone_gets_the_generic_sweep():
    chosen = choose_device_sweep("some-new-accelerator", platform="gpu")
    assert chosen.path.name == "gpu.yaml" and "generic gpu sweep" in chosen.warning


def test_an_unknown_non_gpu_kind_still_fails_clearly():
    with pytest.raises(FileNotFoundError, match="lists device 'mystery'"):
        sweep_for_device("mystery")


SHAPE = DecodeShape(batch=8, max_len=4000, q_heads=8, kv_heads=2, head_dim=64,
                    dtype="bfloat16")


def _table(path, device_kind, variant, config):
    entry = {"op": "decode", "variant": variant, "key": make_key(SHAPE, device_kind),
             "config": config, "time_us": 10.0, "source": {"run_id": "test"}}
    path.write_text(json.dumps({"schema_version": SCHEMA_VERSION,
                                "meta": {"device_kind": device_kind}, "entries": [entry]}))
    return path


def test_lookup_falls_back_to_a_table_of_the_same_family(tmp_path, monkeypatch):
    config = {"kv_block_size": 128}
    monkeypatch.setenv(lookup.TUNED_ENV, str(_table(tmp_path / "h100.json", "nvidia-h100",
                                                    "xla_blocked", config)))
    lookup.clear_caches()
    on_h200 = lookup.choose(SHAPE, device_kind="nvidia-h200", platform="cpu")
    assert on_h200.variant.name == "xla_blocked"
    assert on_h200.config.kv_block_size == 128
    assert "tuned on nvidia-h100, same chip family nvidia-hopper" in on_h200.source
    assert "no table for nvidia-h200" in on_h200.source
    assert on_h200.key["device_kind"] == "nvidia-h200"
    # Its own table wins when there is one; a chip of another family never borrows.
    assert lookup.choose(SHAPE, device_kind="nvidia-h100", platform="cpu").source.endswith(
        "entries[0]")
    on_l4 = lookup.choose(SHAPE, device_kind="nvidia-l4", platform="cpu")
    assert on_l4.source == "heuristic default"


@pytest.mark.parametrize("kind, target", [
    ("nvidia-h200", "sm_90"), ("nvidia-gh200", "sm_90"), ("nvidia-h800", "sm_90"),
    ("nvidia-h20", "sm_90"), ("nvidia-a800", "sm_80"), ("nvidia-a10g", "sm_86"),
    ("nvidia-l40s", "sm_89"), ("nvidia-rtx-4090", "sm_89"), ("nvidia-b200", None),
])
def test_chips_of_one_compute_capability_share_the_static_check_target(kind, target):
    from attnbench.tuner.check.static_check import target_for_device

    found = target_for_device(kind)
    assert (found.name if found else None) == target
