"""Tuned entries record the code they were measured on; lookup and validate notice a change."""

import json
import sys
import warnings

from typer.testing import CliRunner

from attnbench.cli import app
from attnbench.kernels import fingerprint, lookup, registry
from attnbench.kernels.decode.inputs import DecodeShape
from attnbench.kernels.table import SCHEMA_VERSION, make_key
from attnbench.tuner.results import selection

SHAPE = DecodeShape(batch=8, max_len=4096, q_heads=8, kv_heads=2, head_dim=64, dtype="bfloat16")
VARIANT = registry.get_variant("decode", "xla_blocked")


def entry(**source):
    config = VARIANT.default_config(SHAPE).to_dict()
    return {"op": "decode", "variant": VARIANT.name, "key": make_key(SHAPE, "cpu"),
            "config": config, "time_us": 1.0, "source": {"run_id": "t", **source}}


def write(path, *entries):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"schema_version": SCHEMA_VERSION, "meta": {"device_kind": "cpu"},
                                "entries": list(entries)}))
    return path


def choose_recording():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = lookup.choose(SHAPE, variant=VARIANT.name, device_kind="cpu", platform="cpu")
        second = lookup.choose(SHAPE.__class__(**{**SHAPE.__dict__, "batch": 7}),
                               variant=VARIANT.name, device_kind="cpu", platform="cpu")
    return first, second, [str(w.message) for w in caught]


def test_a_current_entry_is_used_without_a_word():
    write(lookup.user_tuned_dir() / "cpu.json",
          entry(fingerprint=fingerprint.variant_fingerprint(VARIANT)))
    first, _, messages = choose_recording()
    assert "user tuned folder" in first.source
    assert not [m for m in messages if "provenance" in m or "tuned on code" in m]


def test_an_entry_of_other_code_is_skipped_with_one_warning_naming_its_key():
    write(lookup.user_tuned_dir() / "cpu.json", entry(fingerprint="0123456789abcdef"))
    first, _, messages = choose_recording()
    assert first.source == "heuristic default"
    stale = [m for m in messages if "tuned on code 0123456789abcdef" in m]
    assert len(stale) == 1 and "entries[0]" in stale[0], stale
    assert "batch=8 max_len=4096" in stale[0]
    assert "re-tune" in stale[0]


def test_an_entry_without_a_fingerprint_is_used_with_one_warning_per_table():
    write(lookup.user_tuned_dir() / "cpu.json", entry())
    first, second, messages = choose_recording()
    assert "user tuned folder" in first.source and "user tuned folder" in second.source
    unknown = [m for m in messages if "provenance is unknown" in m]
    assert len(unknown) == 1 and "cpu.json" in unknown[0]


def test_the_fingerprint_covers_the_kernel_module_and_its_kernels_sibling(tmp_path, monkeypatch):
    (tmp_path / "toy_variant.py").write_text("def kernel(args, config):\n    return 1\n")
    (tmp_path / "toy_variant_kernels.py").write_text("BODY = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import toy_variant

    class Toy:
        name, kernel = "toy", toy_variant.kernel

    assert {p.name for p in fingerprint.variant_files(Toy)} == {"toy_variant.py",
                                                                "toy_variant_kernels.py"}
    before = fingerprint.variant_fingerprint(Toy)
    (tmp_path / "toy_variant_kernels.py").write_text("BODY = 2  # a different kernel\n")
    assert fingerprint.variant_fingerprint(Toy) != before
    del sys.modules["toy_variant"]


def test_shipped_variants_have_distinct_fingerprints_of_their_own_files():
    prints = {(v.op, v.name): fingerprint.variant_fingerprint(v) for v in registry.variants(None)}
    assert len(set(prints.values())) == len(prints)
    triton = registry.get_variant("decode", "triton_splitkv")
    assert "triton_splitkv_kernels.py" in {p.name for p in fingerprint.variant_files(triton)}


def test_selection_records_the_measured_fingerprint_and_mixed_code_is_never_current():
    def record(fp, problem="p"):
        return {"problem_id": problem, "round": 0, "status": "ok", "variant": VARIANT.name,
                "config": {"a": 1}, "is_default": True, "median_us": 1.0, "p20_us": 1.0,
                "p80_us": 1.0, "key": {"op": "decode", "k": 1}, "fingerprint": fp}

    provenance = {"versions": fingerprint.toolchain_versions()}
    (one,) = selection.select_winners([record("aa")], noise=0.0, platform="cpu",
                                      provenance=provenance)
    assert one.source["fingerprint"] == "aa" and one.source["versions"]["jax"]
    (mixed,) = selection.select_winners([record("aa"), record("bb", "q")], noise=0.0,
                                        platform="cpu", provenance=provenance)
    assert mixed.source["fingerprint"] == "mixed:aa+bb"
    assert fingerprint.code_status(mixed.source, VARIANT)[0] == "stale"


def test_validate_reports_stale_entries_and_warns_about_unknown_ones(tmp_path):
    runner = CliRunner()
    old_triton = {"versions": {**fingerprint.toolchain_versions(), "jax": "0.0.1"}}
    current = entry(fingerprint=fingerprint.variant_fingerprint(VARIANT), **old_triton)
    path = write(tmp_path / "t.json", current, entry(fingerprint="0123456789abcdef"), entry())
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 1, result.output
    assert "entries[1] (xla_blocked for cpu/decode" in result.output and "stale" in result.output
    assert "entries[0]" not in result.output.split("stale")[0].split("warning")[0]
    assert "1 of 3 entries record no fingerprint" in result.output
    assert "were tuned with jax 0.0.1" in result.output
    fine = write(tmp_path / "u.json", current)
    result = runner.invoke(app, ["validate", str(fine)])
    assert result.exit_code == 0 and result.output.strip().endswith("ok"), result.output


def test_the_shipped_cpu_table_still_loads_and_validates():
    result = CliRunner().invoke(app, ["validate", str(lookup.shipped_tuned_dir() / "cpu.json")])
    assert result.exit_code == 0, result.output
    assert "unknown provenance" in result.output or "no fingerprint" not in result.output


def test_the_native_variants_fingerprint_their_cpp_source():
    for op in ("decode", "paged"):
        names = {p.name for p in fingerprint.variant_files(registry.get_variant(op, "cpu_native"))}
        assert "attention.cc" in names, names
