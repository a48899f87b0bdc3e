"""Lookup of the nearest entry tuned for other head counts, and `attnbench lookup`'s chain."""

import dataclasses
import json

import pytest
from typer.testing import CliRunner

from attnbench.cli import app
from attnbench.kernels import DecodeShape, lookup, registry
from attnbench.kernels.decode.reference import decode_attention_reference
from attnbench.kernels.table import SCHEMA_VERSION, make_key, nearest_distance
from attnbench.kernels.tunables import POWER_OF_TWO, KernelConfig, tunable
from attnbench.kernels.variant import Variant

runner = CliRunner()


@dataclasses.dataclass(frozen=True)
class GroupConfig(KernelConfig):
    heads_per_step: int = tunable(1, (1, 2, 4, 8), POWER_OF_TWO)

    def invalid_reason(self, shape):
        group = shape.q_heads // shape.kv_heads
        if group % self.heads_per_step:
            return f"heads_per_step {self.heads_per_step} must divide the group size {group}"
        return None

    def clamp(self, shape):
        return self


GROUPED = Variant(name="grouped", op="decode", platforms=("cpu",), interpretable=False,
                  features=frozenset({"sinks", "sliding_window"}), config_class=GroupConfig,
                  kernel=decode_attention_reference, heuristic=lambda shape: GroupConfig(),
                  description="test-only")

# Group size 4: no entry below has these heads.
SHAPE = DecodeShape(batch=8, max_len=4000, q_heads=12, kv_heads=3, head_dim=64,
                    dtype="bfloat16")


@pytest.fixture(autouse=True)
def grouped_registered(monkeypatch, tmp_path):
    monkeypatch.setattr(registry, "VARIANTS", registry.VARIANTS + (GROUPED,))
    monkeypatch.setitem(registry.DEFAULT_VARIANT, ("decode", "cpu"), ("grouped",))
    # Only this module's tables: the shipped ones change with every CPU sweep.
    monkeypatch.setattr(lookup, "shipped_tuned_dir", lambda: tmp_path / "no-shipped-tables")


def entry(heads_per_step, q_heads, kv_heads, **key_changes):
    key = make_key(SHAPE, "cpu") | {"q_heads": q_heads, "kv_heads": kv_heads} | key_changes
    return {"op": "decode", "variant": "grouped", "key": key,
            "config": {"heads_per_step": heads_per_step}, "time_us": 10.0,
            "source": {"run_id": "test"}}


def write_table(entries):
    path = lookup.user_tuned_dir() / "cpu.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"schema_version": SCHEMA_VERSION, "meta": {},
                                "entries": entries}))
    return path


def choose():
    return lookup.choose(SHAPE, device_kind="cpu", platform="cpu")


def test_distance_ranks_group_size_then_kv_heads_then_sizes():
    key = make_key(SHAPE, "cpu")
    same_group_more_heads = nearest_distance(key, key | {"q_heads": 32, "kv_heads": 8})
    other_group = nearest_distance(key, key | {"q_heads": 16, "kv_heads": 2})
    assert same_group_more_heads[0] == 0 and other_group[0] == 1
    assert same_group_more_heads < other_group
    assert nearest_distance(key, key | {"head_dim": 128}) is None
    assert nearest_distance(key, key | {"features": ["sinks"]}) is None
    assert nearest_distance(key, key | {"dtype": "float16"}) is None


def test_nearest_entry_is_used_and_its_source_says_what_it_was_tuned_for():
    write_table([entry(2, 16, 8), entry(4, 32, 8), entry(1, 64, 1),
                 entry(4, 16, 4, head_dim=128)])
    choice = choose()
    assert choice.config == GroupConfig(heads_per_step=4)  # group 4 beats group 2 and 64
    assert choice.kind == "nearest"
    assert "entries[1] (nearest entry: tuned for Hq=32 Hkv=8 (group 4)" in choice.source
    assert "this call Hq=12 Hkv=3 (group 4)" in choice.source
    assert choice.chain[-1].startswith("nearest: user tuned folder")


def test_a_nearest_config_invalid_for_the_shape_gives_way_to_the_next():
    # Group 8 is nearest to 4 on the KV heads too, but its config does not divide 4.
    write_table([entry(8, 24, 3), entry(2, 4, 2)])
    choice = choose()
    assert choice.config == GroupConfig(heads_per_step=2)
    assert "tuned for Hq=4 Hkv=2 (group 2)" in choice.source
    assert any("passed over" in step and "must divide the group size 4" in step
               for step in choice.chain), choice.chain


def test_an_exact_entry_beats_any_nearest_one():
    write_table([entry(4, 24, 6), entry(1, 12, 3, batch=64, max_len=65536)])
    choice = choose()
    assert choice.kind == "tuned" and choice.config == GroupConfig(heads_per_step=1)


def test_no_compatible_entry_leaves_the_heuristic():
    write_table([entry(4, 24, 6, head_dim=128), entry(4, 24, 6, features=["sinks"])])
    choice = choose()
    assert choice.kind == "heuristic" and choice.source == "heuristic default"
    assert "nearest: no entry on this device" in " ".join(choice.chain)


def test_cli_lookup_prints_the_chain(tmp_path, monkeypatch):
    path = write_table([entry(8, 24, 3), entry(2, 4, 2)])
    result = runner.invoke(app, ["lookup", "--op", "decode", "--q-heads", "12", "--kv-heads",
                                 "3", "--head-dim", "64", "--batch", "8", "--max-len", "4000",
                                 "--device-kind", "cpu", "--platform", "cpu"])
    assert result.exit_code == 0, result.output
    assert f"source:  user tuned folder: {path} entries[1] (nearest entry" in result.output
    assert "chain:   1. exact: no entry in the user tuned folder" in result.output
    assert "passed over" in result.output and "must divide the group size 4" in result.output


def test_cli_coverage_report_of_a_model(tmp_path):
    # gpt-oss: full layers (sinks) and windowed ones (sinks, window 128); one tuned entry for
    # the full layers' own heads, one for other heads, none for the windowed layers.
    key = {"device_kind": "cpu", "op": "decode", "dtype": "bfloat16", "head_dim": 64,
           "page_size": None, "features": ["sinks"], "batch": 8, "max_len": 4096}
    entries = [{"op": "decode", "variant": "grouped", "key": key | {"q_heads": 64, "kv_heads": 8},
                "config": {"heads_per_step": 8}, "source": {}},
               {"op": "decode", "variant": "grouped", "key": key | {"q_heads": 32, "kv_heads": 8},
                "config": {"heads_per_step": 4}, "source": {}}]
    write_table(entries)
    model = "tests/data/models/gpt-oss-20b.json"
    common = ["lookup", "--model", model, "--op", "decode", "--batch", "8", "--max-len", "4096",
              "--device-kind", "cpu", "--platform", "cpu"]
    result = runner.invoke(app, common)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    full = lines.index("layer full_attention: Hq=64 Hkv=8 D=64, sinks (12 layers)")
    assert "tuned" in lines[full + 1] and '"heads_per_step": 8' in lines[full + 1]
    window = next(i for i, line in enumerate(lines) if line.startswith("layer sliding"))
    assert "heuristic" in lines[window + 1]
    assert "coverage: 1 tuned, 0 nearest, 1 heuristic" in result.output
    # Per shard of 2 the full layers have 32/4 heads: group 8 again, now a nearest entry.
    result = runner.invoke(app, common + ["--tp", "2"])
    assert result.exit_code == 0, result.output
    assert "coverage: 0 tuned, 1 nearest, 1 heuristic" in result.output
    assert "tuned for cpu/decode bfloat16 Hq=64 Hkv=8 D=64" in result.output


def test_a_paged_entry_of_another_page_size_is_never_used():
    from attnbench.kernels.registry import get_operator

    paged = get_operator("paged")
    shape = paged.lookup_shape(q_heads=40, kv_heads=8, head_dim=128, dtype="bfloat16",
                               features=frozenset(), sizes={"max_len": 3072, "tokens": 12,
                                                            "page_size": 32})
    key = make_key(shape, "cpu")
    # Blocks are counted in pages: 16 pages of 16 positions are not 16 pages of 32.
    assert nearest_distance(key, key | {"q_heads": 32, "page_size": 16}) is None
    assert nearest_distance(key, key | {"q_heads": 32})[0] > 0
    assert nearest_distance(key, make_key(SHAPE, "cpu")) is None  # another op's key
