"""Tuned-table lookup: sources, buckets, clamping, warnings and bad tables."""

import dataclasses
import json
import warnings

import pytest

from attnbench.kernels import lookup, registry
from attnbench.kernels import DecodeShape
from attnbench.kernels.decode.reference import decode_attention_reference
from attnbench.kernels.table import SCHEMA_VERSION, bucket, make_key
from attnbench.kernels.tunables import POWER_OF_TWO, KernelConfig, tunable
from attnbench.kernels.variant import UnsupportedError, Variant


@dataclasses.dataclass(frozen=True)
class ToyConfig(KernelConfig):
    block_size: int = tunable(64, (16, 32, 64, 128), POWER_OF_TWO)

    def invalid_reason(self, shape):
        if self.block_size > shape.max_len:
            return f"block_size {self.block_size} > S {shape.max_len}"
        return None

    def clamp(self, shape):
        return self.replace(block_size=min(self.block_size, bucket(shape.max_len) // 2 or 1))


TOY = Variant(name="toy", op="decode", platforms=("cpu",), interpretable=False,
              features=frozenset({"logits_soft_cap"}), config_class=ToyConfig,
              kernel=decode_attention_reference, heuristic=lambda shape: ToyConfig(),
              description="test-only")

SHAPE = DecodeShape(batch=8, max_len=4000, q_heads=8, kv_heads=2, head_dim=64,
                    dtype="bfloat16")


@pytest.fixture(autouse=True)
def toy_registered(monkeypatch):
    monkeypatch.setattr(registry, "VARIANTS", registry.VARIANTS + (TOY,))
    monkeypatch.setitem(registry.DEFAULT_VARIANT, ("decode", "cpu"), ("toy",))


def write_table(path, entries):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"schema_version": SCHEMA_VERSION, "meta": {"device_kind": "cpu"},
                                "entries": entries}))
    return path


def entry(block_size, *, batch=8, max_len=4096, time_us=100.0, variant="toy", **key_changes):
    key = make_key(SHAPE, "cpu") | {"batch": batch, "max_len": max_len} | key_changes
    return {"op": "decode", "variant": variant, "key": key, "config": {"block_size": block_size},
            "time_us": time_us, "source": {"run_id": "test"}}


def choose(**kwargs):
    return lookup.choose(SHAPE, device_kind="cpu", platform="cpu", **kwargs)


def test_exact_hit_from_user_folder():
    write_table(lookup.user_tuned_dir() / "cpu.json", [entry(32)])
    choice = choose()
    assert choice.variant.name == "toy"
    assert choice.config == ToyConfig(block_size=32)
    assert "user tuned folder" in choice.source and "entries[0]" in choice.source


def test_nearest_bucket_wins():
    # SHAPE buckets to batch 8, max_len 4096: 8192 is one doubling away, 1024 two.
    write_table(lookup.user_tuned_dir() / "cpu.json",
                [entry(16, max_len=1024), entry(128, max_len=8192), entry(32, batch=64)])
    assert choose().config.block_size == 128


def test_discrete_fields_must_match_exactly():
    write_table(lookup.user_tuned_dir() / "cpu.json",
                [entry(32, head_dim=128), entry(32, dtype="float16"),
                 entry(32, device_kind="tpu-v5e"), entry(32, features=["logits_soft_cap"]),
                 entry(32, q_heads=16, head_dim=128)])
    with pytest.warns(UserWarning, match="no tuned config for cpu/decode bfloat16 Hq=8"):
        choice = choose()
    assert choice.source == "heuristic default"
    assert choice.config == ToyConfig()


def test_no_match_warns_once_per_key():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        choose()
        choose()
        lookup.choose(dataclasses.replace(SHAPE, batch=3), device_kind="cpu", platform="cpu")
    messages = [str(w.message) for w in caught if "no tuned config" in str(w.message)]
    assert len(messages) == 2, messages  # batch 8 and batch 3 (bucket 4) are two keys


def test_corrupt_and_wrong_schema_tables_are_skipped_with_a_warning(tmp_path, monkeypatch):
    folder = tmp_path / "tables"
    folder.mkdir()
    (folder / "a_corrupt.json").write_text("{not json")
    (folder / "b_old.json").write_text(json.dumps({"schema_version": 0, "entries": []}))
    write_table(folder / "c_good.json", [entry(16)])
    monkeypatch.setenv(lookup.TUNED_ENV, str(folder))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        choice = choose()
    texts = " | ".join(str(w.message) for w in caught)
    assert "a_corrupt.json" in texts and "not valid JSON" in texts
    assert "b_old.json" in texts and "schema_version" in texts
    assert choice.config.block_size == 16


def test_env_override_beats_user_and_shipped(tmp_path, monkeypatch):
    write_table(lookup.user_tuned_dir() / "cpu.json", [entry(32)])
    override = write_table(tmp_path / "override.json", [entry(128)])
    monkeypatch.setenv(lookup.TUNED_ENV, str(override))
    choice = choose()
    assert choice.config.block_size == 128 and "$ATTNBENCH_TUNED" in choice.source


def test_user_folder_beats_shipped(monkeypatch, tmp_path):
    shipped = tmp_path / "shipped"
    write_table(shipped / "cpu.json", [entry(16)])
    monkeypatch.setattr(lookup, "shipped_tuned_dir", lambda: shipped)
    assert choose().config.block_size == 16
    write_table(lookup.user_tuned_dir() / "cpu.json", [entry(64)])
    assert choose().config.block_size == 64


def test_explicit_config_beats_every_table():
    write_table(lookup.user_tuned_dir() / "cpu.json", [entry(32)])
    choice = choose(config={"block_size": 128})
    assert choice.config.block_size == 128 and choice.source == "explicit config"
    with pytest.raises(ValueError, match="unknown tunable"):
        choose(config={"block": 128})
    with pytest.raises(ValueError, match="block_size must be a power of two"):
        choose(config={"block_size": 48})


def test_config_is_clamped_and_rechecked_for_the_actual_shape():
    small = dataclasses.replace(SHAPE, max_len=100)  # bucket 128
    write_table(lookup.user_tuned_dir() / "cpu.json", [entry(128, max_len=128)])
    choice = lookup.choose(small, device_kind="cpu", platform="cpu")
    assert choice.entry is not None and choice.config.block_size == 64  # clamped to S


def test_entries_of_unknown_or_unsupporting_variants_are_passed_over():
    write_table(lookup.user_tuned_dir() / "cpu.json",
                [entry(32, variant="from_the_future", time_us=1.0), entry(64)])
    assert choose().config.block_size == 64


def test_unsupported_feature_raises_naming_it():
    windowed = dataclasses.replace(SHAPE, features=frozenset({"sliding_window"}))
    with pytest.raises(UnsupportedError, match="'toy' does not support sliding_window"):
        lookup.choose(windowed, variant="toy", device_kind="cpu", platform="cpu")


def test_unknown_variant_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown decode variant 'nope'.*reference"):
        choose(variant="nope")


def test_operator_uses_the_table_at_trace_time(monkeypatch):
    import jax
    import jax.numpy as jnp

    from attnbench import kernels

    seen = []
    traced = dataclasses.replace(TOY, kernel=lambda args, config, interpret: seen.append(config)
                                 or decode_attention_reference(args))
    others = tuple(v for v in registry.VARIANTS if v is not TOY)
    monkeypatch.setattr(registry, "VARIANTS", others + (traced,))
    write_table(lookup.user_tuned_dir() / "cpu.json", [entry(32)])
    q = jnp.ones((8, 8, 64), jnp.bfloat16)
    kv = jnp.ones((8, 4000, 2, 64), jnp.bfloat16)
    lengths = jnp.full((8,), 10, jnp.int32)
    run = jax.jit(kernels.decode_attention)
    run(q, kv, kv, lengths * 0, lengths)
    run(q, kv, kv, lengths * 0, lengths)  # cached trace: the lookup does not run again
    assert seen == [ToyConfig(block_size=32)]
