"""Models' attention layer types from config.json, and the sweeps `sweep --model` makes."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from attnbench.cli import app
from attnbench.tuner.plan import sweep_file
from attnbench.tuner.plan.model_config import ModelConfigError, load_model, model_from_config
from attnbench.tuner.plan.model_sweep import model_sweep_data, write_model_sweep

MODELS = Path(__file__).parent / "data" / "models"
runner = CliRunner()


@pytest.mark.parametrize("name, expected", [
    ("llama-3-8b", ["full_attention: Hq=32 Hkv=8 D=128 (32 layers)"]),
    ("llama-2-7b", ["full_attention: Hq=32 Hkv=32 D=128 (32 layers)"]),
    # use_sliding_window false: its sliding_window field is not in force.
    ("qwen2-7b", ["full_attention: Hq=28 Hkv=4 D=128 (28 layers)"]),
    # No layer_types: Gemma-2 alternates windowed and full layers; the final soft cap is the
    # LM head's, not attention's.
    ("gemma-2-9b", ["full_attention: Hq=16 Hkv=8 D=256, soft cap 50 (21 layers)",
                    "sliding_attention: Hq=16 Hkv=8 D=256, window 4096, soft cap 50 (21 layers)"]),
    ("gpt-oss-20b", ["full_attention: Hq=64 Hkv=8 D=64, sinks (12 layers)",
                     "sliding_attention: Hq=64 Hkv=8 D=64, window 128, sinks (12 layers)"]),
])
def test_shipped_configs_give_their_layer_types(name, expected):
    model = load_model(str(MODELS / f"{name}.json"))
    assert model.name == name
    assert [layer.describe() for layer in model.layer_types] == expected


def test_tp_splits_the_heads_and_must_divide_them():
    model = load_model(str(MODELS / "llama-3-8b.json"), tp=4)
    assert (model.layer_types[0].q_heads, model.layer_types[0].kv_heads) == (8, 2)
    with pytest.raises(ModelConfigError, match="--tp 3 must be >= 1 and divide"):
        load_model(str(MODELS / "llama-3-8b.json"), tp=3)
    assert load_model("gemma-2b", tp=1).layer_types[0].kv_heads == 1  # a preset by name


BASE = {"num_attention_heads": 32, "num_key_value_heads": 8, "hidden_size": 4096}


@pytest.mark.parametrize("change, message", [
    ({"num_key_value_heads": None}, "field 'num_key_value_heads' must be a positive int"),
    ({"num_attention_heads": "32"}, "field 'num_attention_heads' must be a positive int"),
    ({"hidden_size": 4100}, "field 'hidden_size' 4100 is not a multiple"),
    ({"num_key_value_heads": 6}, "field 'num_key_value_heads' 6 does not divide"),
    ({"layer_types": ["full_attention", "linear_attention"], "sliding_window": 64},
     "field 'layer_types[1]' is 'linear_attention'"),
    ({"layer_types": ["sliding_attention"]}, "field 'sliding_window' is missing or null"),
    ({"layer_types": ["full_attention"], "num_hidden_layers": 2}, "lists 1 layers"),
    ({"kv_lora_rank": 512}, "field 'kv_lora_rank' asks for multi-head latent attention"),
    ({"attention_chunk_size": 8192}, "field 'attention_chunk_size' asks for chunked"),
    ({"attn_logit_softcapping": -1}, "field 'attn_logit_softcapping' must be a number > 0"),
])
def test_bad_fields_are_errors_naming_the_field(change, message):
    with pytest.raises(ModelConfigError) as raised:
        model_from_config({**BASE, **change})
    assert message in str(raised.value)


def test_missing_fields_are_named():
    with pytest.raises(ModelConfigError, match="missing field 'num_key_value_heads'"):
        model_from_config({"num_attention_heads": 8, "head_dim": 64})
    with pytest.raises(ModelConfigError, match="missing field 'head_dim'"):
        model_from_config({"num_attention_heads": 8, "num_key_value_heads": 8})
    with pytest.raises(ModelConfigError, match="neither a preset"):
        load_model("no-such-model")


def test_text_config_and_window_pattern():
    text = {"num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256,
            "sliding_window": 1024, "sliding_window_pattern": 6, "num_hidden_layers": 12}
    model = model_from_config({"model_type": "gemma3", "text_config": text})
    assert [(layer.name, layer.layers, layer.sliding_window) for layer in model.layer_types] == [
        ("full_attention", 2, None), ("sliding_attention", 10, 1024)]


def test_model_sweep_keeps_the_device_file_and_replaces_the_geometry(tmp_path):
    base, _, problems = sweep_file.read_sweep_data(sweep_file.sweeps_dir() / "cpu.yaml")
    assert not problems
    model = load_model(str(MODELS / "gemma-2-9b.json"))
    data = model_sweep_data(base, model, batch=[3], context=[1000], page_size=[32])
    assert data["ops"]["decode"]["variants"] == base["ops"]["decode"]["variants"]
    assert data["timing"] == base["timing"] and data["search"] == base["search"]
    decode = data["ops"]["decode"]["problems"]
    # Each template x each layer type, identical problems once.
    assert {(p["batch"], p["context"], p.get("sliding_window")) for p in decode} == {
        (3, 1000, None), (3, 1000, 4096)}
    assert all(p["head_dim"] == 256 and p["logits_soft_cap"] == 50.0 and "model" not in p
               and p.get("min_len", 0) <= 1000 for p in decode)
    assert all(p["num_seqs"] == 3 and p["page_size"] == 32
               for p in data["ops"]["paged"]["problems"])
    path = write_model_sweep(sweep_file.sweeps_dir() / "cpu.yaml", model, tmp_path)
    spec = sweep_file.load_sweep(path)
    assert spec.name == "cpu-gemma-2-9b"
    shapes = {(p.problem.q_heads, p.problem.kv_heads, p.problem.head_dim) for p in spec.problems}
    assert shapes == {(16, 8, 256)}
    # Without size options the device file's own sizes stay: its decode problems' batches.
    assert {p.problem.batch for p in spec.problems if p.op == "decode"} == {
        e["batch"] for e in base["ops"]["decode"]["problems"]}


def test_cli_sweep_model_dry_run_and_errors(tmp_path):
    config = tmp_path / "model" / "config.json"
    config.parent.mkdir()
    config.write_text(json.dumps({"num_attention_heads": 6, "num_key_value_heads": 3,
                                  "head_dim": 32, "model_type": "tiny"}))
    base = tmp_path / "tiny.yaml"
    base.write_text("devices: [cpu]\nops:\n  decode:\n    problems:\n"
                    "      - {model: llama-3-8b, batch: 8, context: 8192}\n"
                    "    variants:\n      reference: {}\n"
                    "      xla_blocked: {grid: {kv_block_size: [64]}}\n")
    result = runner.invoke(app, ["sweep", str(base), "--model", str(config.parent), "--batch",
                                 "2", "--context", "128", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "model model: full_attention: Hq=6 Hkv=3 D=32 (1 layer)" in result.output
    assert "decode Hq6/Hkv3/D32 B=2 S=128" in result.output
    assert "total: 1 problems, 3 configs to run" in result.output  # with the default
    bad = runner.invoke(app, ["sweep", "--quick", "--model", str(MODELS / "llama-3-8b.json"),
                              "--tp", "3", "--dry-run"])
    assert bad.exit_code != 0 and "--tp 3 must be >= 1 and divide" in bad.output
    sizes_alone = runner.invoke(app, ["sweep", "--quick", "--batch", "2", "--dry-run"])
    assert sizes_alone.exit_code != 0 and "--batch" in sizes_alone.output
