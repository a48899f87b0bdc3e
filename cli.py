"""The `attnbench` command line: one small function per command.

Commands read and print; the work happens in attnbench.kernels and attnbench.tuner.
"""

from __future__ import annotations

import errno
import json
import os
import sys
import time
from pathlib import Path
from typing import Optional

import typer
import yaml

app = typer.Typer(
    help="Benchmark and autotune attention kernels for LLM inference in JAX.",
    no_args_is_help=True,
    add_completion=False,
    # An error is a line or two that says what to fix; the traceback is for --debug.
    pretty_exceptions_enable=False,
    # Help texts are plain text: "attnbench[ray]" must not be read as console markup.
    rich_markup_mode=None,
)

_DEBUG = {"on": False}


@app.callback()
def _options(debug: bool = typer.Option(False, "--debug",
                                        help="Show the full traceback of an error.")) -> None:
    _DEBUG["on"] = debug


def _prefer_cpu_without_accelerator() -> None:
    """On a host with no GPU or TPU, keep JAX from probing for CUDA (slow, noisy tracebacks
    when the CUDA plugin is installed only to cross-compile)."""
    # absl's INFO lines ("Could not find cuda drivers") are noise for a command-line user.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    if os.environ.get("JAX_PLATFORMS"):
        return
    has_accelerator = any(Path(p).exists() for p in ("/dev/nvidia0", "/dev/accel0", "/dev/vfio/0"))
    if not has_accelerator:
        os.environ["JAX_PLATFORMS"] = "cpu"


def _parse_features(features: str) -> frozenset[str]:
    from attnbench.kernels.inputs import FEATURES

    chosen = frozenset(f for f in features.split(",") if f) if features else frozenset()
    unknown = sorted(chosen - set(FEATURES))
    if unknown:
        raise typer.BadParameter(f"unknown feature(s) {unknown}; choose from {list(FEATURES)}",
                                 param_hint="--features")
    return chosen


@app.command("list")
def list_variants(
    op: Optional[str] = typer.Option(None, help="Only this operator (decode, paged, ...)."),
    format: str = typer.Option("text", help="text (for people) or json (for tools)."),
) -> None:
    """List every kernel variant: platforms, features and config space."""
    from attnbench.kernels import registry

    described = [v.describe() for v in registry.variants(op)]
    if format == "json":
        typer.echo(json.dumps(described, indent=2))
        return
    if format != "text":
        raise typer.BadParameter("must be text or json", param_hint="--format")
    for item in described:
        default_on = [p for (o, p), names in registry.DEFAULT_VARIANT.items()
                      if o == item["op"] and item["name"] in names]
        typer.echo(f"{item['op']}/{item['name']}: {item['description']}")
        typer.echo(f"  platforms: {', '.join(item['platforms'])}"
                   f"{'  (+ CPU interpreter)' if item['interpretable'] else ''}"
                   f"{'  default on: ' + ', '.join(default_on) if default_on else ''}")
        typer.echo(f"  features: {', '.join(item['features']) or 'none'};"
                   f" dtypes: {', '.join(item['dtypes'])}")
        if item["peer"]:
            peer = item["peer"]
            typer.echo(f"  peer: {peer['project']} {peer['version'] or '(not installed)'}, "
                       f"{peer['entry_point']}")
        if item["input_conversion"]:
            typer.echo(f"  input conversion: {item['input_conversion']}")
        if item["unavailable"]:
            typer.echo(f"  unavailable: {item['unavailable']}")
        if not item["config_space"]:
            typer.echo("  config: nothing to tune")
        for name, space in item["config_space"].items():
            typer.echo(f"  {name} = {space['default']!r}  ({space['rule']}; "
                       f"sweeps try {space['choices']})")
        typer.echo("")


@app.command()
def lookup(
    op: Optional[str] = typer.Option(None, help="The operator: decode, paged, ... (with --model: "
                                                "only this one; default every operator)."),
    dtype: str = typer.Option("bfloat16", help="Key/value dtype."),
    cache_dtype: Optional[str] = typer.Option(
        None, help="paged_v3: the cache's stored dtype (default: --dtype)."),
    q_heads: Optional[int] = typer.Option(None, min=1, help="Query heads Hq."),
    kv_heads: Optional[int] = typer.Option(None, min=1, help="Key/value heads Hkv."),
    head_dim: Optional[int] = typer.Option(None, min=1, help="Head dim D."),
    batch: Optional[list[int]] = typer.Option(
        None, min=1, help="decode: batch B (default 1); with --model, repeatable (default 1, 8, "
                          "32) and also the paged operators' decode sequences."),
    max_len: Optional[list[int]] = typer.Option(
        None, min=1, help="decode: cache length S; paged: longest context. With --model, "
                          "repeatable (default 2048, 8192, 32768)."),
    tokens: int = typer.Option(1, min=1, help="paged: query tokens T."),
    page_size: int = typer.Option(16, min=1, help="paged: page size."),
    max_seqs: Optional[int] = typer.Option(None, min=1,
                                           help="paged: page-table rows (default: tokens)."),
    features: str = typer.Option("", help="Comma list: sliding_window,logits_soft_cap,sinks."),
    variant: Optional[str] = typer.Option(None, help="Restrict to this variant."),
    device_kind: Optional[str] = typer.Option(None, help="Normalized device kind (default: this one)."),
    platform: Optional[str] = typer.Option(None, help="cpu, gpu or tpu (default: this one)."),
    tp: int = typer.Option(1, help="Tensor-parallel shards: heads split over N devices "
                                   "(mesh=); the key is the per-shard shape."),
    model: Optional[str] = typer.Option(
        None, help="Coverage of a model (a config.json, its folder, or a preset): for each "
                   "layer type, operator and size bucket, whether a tuned entry, a nearest "
                   "entry or the heuristic default would be used."),
) -> None:
    """Print the variant and config an operator call would use, where it came from, and the
    steps of the lookup; with --model, a coverage report of the model's layer types."""
    import warnings

    from attnbench.kernels import choose, get_operator
    from attnbench.kernels.table import key_text

    if model is not None:
        _lookup_coverage(model, op, dtype, cache_dtype, batch, max_len, page_size, variant,
                         device_kind, platform, tp,
                         given={"--q-heads": q_heads, "--kv-heads": kv_heads,
                                "--head-dim": head_dim, "--features": features or None})
        return
    for name, value in (("--op", op), ("--q-heads", q_heads), ("--kv-heads", kv_heads),
                        ("--head-dim", head_dim), ("--max-len", max_len)):
        if value is None:
            raise typer.BadParameter("is required (or give --model)", param_hint=name)
    for name, values in (("--batch", batch), ("--max-len", max_len)):
        if values is not None and len(values) > 1:
            raise typer.BadParameter("takes one value without --model", param_hint=name)
    feature_set = _parse_features(features)
    if q_heads % kv_heads:
        raise typer.BadParameter(f"--q-heads {q_heads} must be a multiple of --kv-heads "
                                 f"{kv_heads}", param_hint="--kv-heads")
    try:
        operator = get_operator(op)
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="--op") from None
    if tp < 1 or q_heads % tp or kv_heads % tp:
        raise typer.BadParameter(f"--tp {tp} must be >= 1 and divide --q-heads {q_heads} and "
                                 f"--kv-heads {kv_heads} (each shard holds whole heads)",
                                 param_hint="--tp")
    try:
        shape = operator.lookup_shape(
            q_heads=q_heads // tp, kv_heads=kv_heads // tp, head_dim=head_dim, dtype=dtype,
            features=feature_set, sizes={"batch": batch[0] if batch else 1,
                                         "max_len": max_len[0], "tokens": tokens,
                                         "page_size": page_size, "max_seqs": max_seqs,
                                         "cache_dtype": cache_dtype})
    except ValueError as error:
        raise typer.BadParameter(str(error)) from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the untuned case is reported below instead
        choice = choose(shape, variant=variant, device_kind=device_kind, platform=platform)
    if tp > 1:
        typer.echo(f"shards:  {tp}, each Hq={q_heads // tp} Hkv={kv_heads // tp} (the lookup "
                   "of a call made with mesh= or inside shard_map)")
    typer.echo(f"key:     {key_text(choice.key)}")
    typer.echo(f"variant: {choice.variant.name}")
    typer.echo(f"config:  {json.dumps(choice.config.to_dict())}")
    typer.echo(f"source:  {choice.source}")
    if choice.entry is not None:
        typer.echo(f"entry:   key {key_text(choice.entry.key)}; time {choice.entry.time_us} us; "
                   f"from {json.dumps(choice.entry.source)}")
    for position, step in enumerate(choice.chain, 1):
        typer.echo(f"{'chain:' if position == 1 else '':<8} {position}. {step}")


def _lookup_coverage(model: str, op: Optional[str], dtype: str, cache_dtype: Optional[str],
                     batch: Optional[list[int]], max_len: Optional[list[int]], page_size: int,
                     variant: Optional[str], device_kind: Optional[str],
                     platform: Optional[str], tp: int, given: dict) -> None:
    """`attnbench lookup --model`: per layer type, operator and size bucket, which kind of
    choice a decode step of that size gets."""
    import warnings

    from attnbench.kernels import choose, registry
    from attnbench.kernels.table import key_text
    from attnbench.kernels.variant import UnsupportedError
    from attnbench.tuner.plan.model_config import ModelConfigError, load_model

    for name, value in given.items():
        if value is not None:
            raise typer.BadParameter("the model's layer types give the heads and features; "
                                     "drop it or --model", param_hint=name)
    try:
        attention = load_model(model, tp)
    except ModelConfigError as error:
        raise typer.BadParameter(str(error), param_hint="--model") from None
    try:
        operators = [registry.get_operator(op)] if op is not None else list(registry.OPERATORS)
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="--op") from None
    batches, lengths = batch or [1, 8, 32], max_len or [2048, 8192, 32768]
    counts: dict[str, int] = {}
    typer.echo(f"model {attention.name}" + (f", per shard of {tp}" if tp > 1 else ""))
    for layer in attention.layer_types:
        typer.echo(f"layer {layer.describe()}")
        for operator in operators:
            for sequences in batches:
                for length in lengths:
                    sizes = {"batch": sequences, "max_len": length, "tokens": sequences,
                             "max_seqs": sequences, "page_size": page_size,
                             "cache_dtype": cache_dtype}
                    try:
                        shape = operator.lookup_shape(
                            q_heads=layer.q_heads, kv_heads=layer.kv_heads,
                            head_dim=layer.head_dim, dtype=dtype, features=layer.features,
                            sizes=sizes)
                        with warnings.catch_warnings():
                            warnings.simplefilter("ignore")  # the report says it instead
                            choice = choose(shape, variant=variant, device_kind=device_kind,
                                            platform=platform)
                    except UnsupportedError as error:
                        counts["unsupported"] = counts.get("unsupported", 0) + 1
                        typer.echo(f"  {operator.name:<9} {'':<24} unsupported: {error}")
                        continue
                    except ValueError as error:
                        raise typer.BadParameter(str(error)) from None
                    counts[choice.kind] = counts.get(choice.kind, 0) + 1
                    bucket = " ".join(f"{axis}={choice.key[axis]}"
                                      for axis in operator.size_axes)
                    typer.echo(f"  {operator.name:<9} {bucket:<24} {choice.kind:<9} "
                               f"{choice.variant.name} {json.dumps(choice.config.to_dict())}")
                    if choice.entry is not None:
                        typer.echo(f"{'':<12}from {choice.source}")
                        if choice.kind == "nearest":
                            typer.echo(f"{'':<12}tuned for {key_text(choice.entry.key)}")
    typer.echo("coverage: " + ", ".join(f"{counts.get(kind, 0)} {kind}"
                                        for kind in ("tuned", "nearest", "heuristic"))
               + (f", {counts['unsupported']} unsupported" if "unsupported" in counts else ""))


@app.command()
def validate(path: Path = typer.Argument(..., help="A tuned table (.json) or a sweep file (.yaml).")) -> None:
    """Check a tuned table or sweep file against its schema; print each problem with its location.
    A table's entries tuned on other code of their variant than the installed one are stale."""
    if not path.exists():
        typer.echo(f"{path}: no such file", err=True)
        raise typer.Exit(2)
    if path.suffix in (".yaml", ".yml"):
        from attnbench.tuner.plan import sweep_file

        problems = sweep_file.sweep_problems_in_file(path)
        for warning in [] if problems else sweep_file.sweep_warnings_in_file(path):
            typer.echo(f"{path}: warning: {warning}")
    else:
        from attnbench.kernels import limited_files
        from attnbench.kernels.table import table_problems

        try:
            problems = table_problems(limited_files.parse_json(limited_files.read_text(path)))
        except limited_files.FileLimitError as error:
            problems = [f"(file): {error}"]
        except json.JSONDecodeError as error:
            problems = [f"(file): not valid JSON: {error}"]
        if not problems:
            from attnbench.kernels.fingerprint import table_code_report
            from attnbench.kernels.table import read_table

            problems, notes = table_code_report(read_table(path))
            for note in notes:
                typer.echo(f"{path}: warning: {note}")
    for problem in problems:
        typer.echo(f"{path}: {problem}")
    if problems:
        raise typer.Exit(1)
    typer.echo(f"{path}: ok")


@app.command()
def export(
    table: Path = typer.Argument(..., help="A tuned table (.json): a run's table.json or an "
                                           "installed one."),
    format: str = typer.Option(..., "--format",
                               help="easydel (EasyDeL's operation_configs: ejkernel config "
                                    "objects) or jax-rpa (JAX's TPU ragged paged attention "
                                    "tuned_block_sizes)."),
    out: Optional[Path] = typer.Option(None, help="Write here (easydel: a .py file builds the "
                                                  "objects, else JSON); default: print."),
) -> None:
    """Write a tuned table's peer entries in the format of the stack that calls the peer."""
    from attnbench.kernels.peers import EXPORT_FORMATS
    from attnbench.kernels.table import TableError, read_table
    from attnbench.tuner.results.export import ExportError, export_text

    if format not in EXPORT_FORMATS:
        raise typer.BadParameter(f"choose from {list(EXPORT_FORMATS)}, got {format!r}",
                                 param_hint="--format")
    if not table.exists():
        typer.echo(f"{table}: no such file", err=True)
        raise typer.Exit(2)
    try:
        text = export_text(read_table(table), format,
                           python=out is not None and out.suffix == ".py")
    except (TableError, ExportError) as error:  # each names the file itself
        typer.echo(str(error), err=True)
        raise typer.Exit(1) from None
    if out is None:
        typer.echo(text, nl=False)
        return
    out.write_text(text, encoding="utf-8")
    typer.echo(f"wrote {out}")


@app.command()
def demo(
    seed: int = typer.Option(0, help="Seed of the random inputs."),
    dtype: str = typer.Option("bfloat16", help="Input dtype."),
) -> None:
    """Run both operators on a small realistic problem, check them against the reference."""
    import jax

    from attnbench import kernels
    from attnbench.kernels.decode.problem import DecodeProblem
    from attnbench.kernels.paged.problem import PagedProblem
    from attnbench.kernels.registry import get_operator
    from attnbench.tuner.measure.accuracy import judge

    problems = [
        ("decode_attention", kernels.decode_attention,
         DecodeProblem(batch=4, max_len=1024, q_heads=8, kv_heads=2, head_dim=64, dtype=dtype)),
        ("ragged_paged_attention", kernels.ragged_paged_attention,
         PagedProblem(num_seqs=4, max_len=512, q_heads=8, kv_heads=2, head_dim=64, dtype=dtype,
                      prefill_fraction=0.5, prefill_chunk=64)),
    ]
    for name, operator, problem in problems:
        args, kwargs = problem.make_inputs(seed)
        run = jax.jit(lambda *a, op=operator, kw=kwargs: op(*a, **kw))
        reference = jax.jit(lambda *a, op=operator, kw=kwargs: op(*a, variant="reference", **kw))
        out = jax.block_until_ready(run(*args))
        began = time.perf_counter()
        out = jax.block_until_ready(run(*args))
        elapsed_us = (time.perf_counter() - began) * 1e6
        spec = get_operator(problem.op)
        accuracy = judge(out, reference(*args), dtype, zero_rows=spec.zero_rows(args),
                         key_ranges=spec.key_ranges(args, kwargs))
        typer.echo(f"{name}: {problem}\n  output {out.shape} {out.dtype}, {elapsed_us:.0f} us, "
                   f"worst row error {accuracy.row_error:.2e} "
                   f"({'ok' if accuracy.ok else 'WRONG: ' + accuracy.reason})")
        if not accuracy.ok:
            raise typer.Exit(1)


@app.command()
def bench(
    problem: str = typer.Argument(
        "decode", help="decode, paged (decode-only batch), paged-mixed or paged-v3 (the paged "
                       "decode batch with the cache write fused in)."),
    variant: Optional[list[str]] = typer.Option(
        None, help="Only these variants (repeatable); `auto` is the choice a call makes with "
                   "no variant= or config= (timed first by default)."),
    sample: int = typer.Option(0, help="Also time this many random valid configs per variant."),
    repeats: int = typer.Option(10, help="Timed calls per config."),
    seed: int = typer.Option(0, help="Seed of the inputs and of the config sample."),
    set_: Optional[list[str]] = typer.Option(
        None, "--set", metavar="FIELD=VALUE",
        help="Change a field of the problem, named as in a sweep file's problem entry "
             "(repeatable): --set model=starcoder-15b --set context=4096 --set batch=1."),
    timer: str = typer.Option("auto", help="profiler (the device's clock), wall, or auto: "
                                           "profiler on GPU/TPU, wall on CPU."),
    cache: str = typer.Option("auto", help="cold (flush the device cache before each call), "
                                           "warm, or auto: cold on GPU."),
    peers: bool = typer.Option(False, "--peers",
                               help="Also the peer variants (JAX's and ejkernel's kernels), "
                                    "then a side-by-side table: each variant's default and "
                                    "best config, time, fraction of the floor, error."),
) -> None:
    """Time each variant on a benchmark problem; print median, memory and compute floors and
    their ratios."""
    from attnbench.tuner.measure import roofline
    from attnbench.tuner.measure.bench import (BENCH_PROBLEMS, bench_problem, run_bench,
                                               side_by_side_markdown)
    from attnbench.tuner.plan.sweep_file import SweepFileError

    from attnbench.tuner.measure.timing import CACHE_MODES, TIMERS

    if problem not in BENCH_PROBLEMS:
        raise typer.BadParameter(f"choose from {list(BENCH_PROBLEMS)}", param_hint="PROBLEM")
    if timer not in TIMERS:
        raise typer.BadParameter(f"choose from {list(TIMERS)}, got {timer!r}", param_hint="--timer")
    if cache not in CACHE_MODES:
        raise typer.BadParameter(f"choose from {list(CACHE_MODES)}, got {cache!r}",
                                 param_hint="--cache")
    overrides = {}
    for assignment in set_ or []:
        field, equals, value = assignment.partition("=")
        if not equals or not field.strip():
            raise typer.BadParameter(f"must be FIELD=VALUE, got {assignment!r}",
                                     param_hint="--set")
        # YAML scalars, as in a sweep file: 4096 is an int, true a bool, null None.
        overrides[field.strip()] = yaml.safe_load(value)
    try:
        spec = bench_problem(problem, overrides)
    except SweepFileError as error:
        raise typer.BadParameter("; ".join(error.problems), param_hint="--set") from None
    typer.echo(f"problem: {spec}")
    typer.echo(f"read bandwidth: {roofline.read_bandwidth() / 1e9:.1f} GB/s (measured); compute "
               f"floor: an XLA matmul of the same flops")
    best = auto = None
    rows = []
    for row in run_bench(spec, variant_names=variant, sample=sample, repeats=repeats, seed=seed,
                         timer=timer, cache=cache, peers=peers):
        rows.append(row)
        if row.timing is None:
            typer.echo(f"  {row.variant:<16} {json.dumps(row.config)}: {row.status}")
            continue
        if row.status != "ok":  # a wrong peer, timed for the comparison
            typer.echo(f"  {row.variant:<16} {json.dumps(row.config)}: median "
                       f"{row.timing.median_us:9.0f} us, {row.fraction_of_floor:5.2f}x floor, "
                       f"{row.status}")
            continue
        typer.echo(f"  {row.variant:<16} {json.dumps(row.config)}: median {row.timing.median_us:9.0f} us "
                   f"(p20 {row.timing.p20_us:.0f}, p80 {row.timing.p80_us:.0f}), "
                   f"{row.fraction_of_floor:5.2f}x floor, "
                   f"{row.fraction_of_compute_floor:5.2f}x compute floor, "
                   f"rel err {row.relative_error:.1e} "
                   f"[{row.timing.timer} timer, {row.timing.cache} cache"
                   + (f", wall {row.timing.wall_median_us:.0f} us"
                      if row.timing.wall_median_us is not None else "") + "]")
        if row.timing.timer_note:
            typer.echo(f"    note: {row.timing.timer_note}")
        if row.source:
            typer.echo(f"    the call's own choice ({row.source})")
        if row.source:
            auto = row
        if best is None or row.timing.median_us < best.timing.median_us:
            best = row
    if peers:
        typer.echo("")
        for line in side_by_side_markdown(rows):
            typer.echo(line)
        typer.echo("")
    if best is None:
        typer.echo("no variant ran correctly")
        raise typer.Exit(1)
    typer.echo(f"best: {best.variant} {json.dumps(best.config)}: {best.timing.median_us:.0f} us; "
               f"floor {best.floor_us:.0f} us; ratio {best.fraction_of_floor:.2f}x; compute floor "
               f"{best.compute_floor_us:.0f} us; ratio {best.fraction_of_compute_floor:.2f}x")
    if auto is not None:
        typer.echo(f"auto: {auto.variant}: {auto.fraction_of_floor:.2f}x floor, "
                   f"{auto.timing.median_us / best.timing.median_us:.2f}x the best timed here")


def _model_sweep_file(base: Path, model: str, batch, context, page_size, tp: int) -> Path:
    """Writes the sweep file of `model`'s layer types (tuner/plan/model_sweep.py)."""
    import tempfile

    from attnbench.tuner.plan.model_config import ModelConfigError, load_model
    from attnbench.tuner.plan.model_sweep import write_model_sweep

    try:
        attention = load_model(model, tp)
    except ModelConfigError as error:
        raise typer.BadParameter(str(error), param_hint="--model") from None
    for layer in attention.layer_types:
        typer.echo(f"model {attention.name}: {layer.describe()}")
    folder = Path(tempfile.mkdtemp(prefix="attnbench-model-sweep-"))
    path = write_model_sweep(base, attention, folder, batch=batch or [], context=context or [],
                             page_size=page_size or [])
    typer.echo(f"model sweep file: {path}")
    return path


def _parse_shard(shard: str) -> tuple[int, int]:
    try:
        index, count = (int(part) for part in shard.split("/"))
    except ValueError:
        raise typer.BadParameter("must be I/N, e.g. 0/4", param_hint="--shard") from None
    if count < 1 or not 0 <= index < count:
        raise typer.BadParameter(f"need 0 <= I < N, got {shard}", param_hint="--shard")
    return index, count


@app.command()
def sweep(
    sweep_file: Optional[Path] = typer.Argument(
        None, help="A sweep file (.yaml). Default: the shipped one for this device."),
    quick: bool = typer.Option(False, "--quick", help="Run the tiny sweep (sweeps/quick.yaml)."),
    out: Optional[Path] = typer.Option(
        None, help="Run folder (default results/runs/<time>-<device>). A Ray cluster with "
                   "devices of several kinds gets one run folder per kind inside it (<kind>/)."),
    resume: Optional[Path] = typer.Option(
        None, help="Finish the interrupted run in this folder (the parent folder of a sweep "
                   "over several device kinds: every kind's run not finished yet)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print problems and configs after pruning; run nothing."),
    shard: str = typer.Option("0/1", help="Run share I of N (problem i goes to shard i % N)."),
    install: bool = typer.Option(True, "--install/--no-install",
                                 help="Install the winners into the user's tuned table."),
    check_only: bool = typer.Option(False, "--check-only",
                                    help="Only compile the sweep's GPU configs for the CUDA "
                                         "targets of its devices (attnbench check); run nothing."),
    backend: str = typer.Option("local", help="local: one device of this host. ray: one actor "
                                "per accelerator of a Ray cluster (pip install 'attnbench[ray]')."),
    address: Optional[str] = typer.Option(None, help="Ray cluster to join (auto or HOST:PORT); "
                                          "default: start Ray on this host. Needs --backend ray."),
    workers: Optional[int] = typer.Option(None, help="Ray actors at most; on a CPU-only cluster, "
                                          "how many CPU actors (default: one per CPU)."),
    model: Optional[str] = typer.Option(
        None, help="Tune this model's attention layer types: a Hugging Face config.json (or its "
                   "folder) or a preset name; the sweep file supplies variants, grids, timing "
                   "and the sizes its problems use."),
    batch: Optional[list[int]] = typer.Option(
        None, min=1, help="With --model: sequences per call (repeatable; default: the sweep "
                          "file's)."),
    context: Optional[list[int]] = typer.Option(
        None, min=1, help="With --model: cache length / longest context (repeatable)."),
    page_size: Optional[list[int]] = typer.Option(
        None, min=1, help="With --model: page size of the paged operators (repeatable)."),
    tp: int = typer.Option(1, help="With --model: tensor-parallel shards; the sweep tunes the "
                                   "heads one shard holds (Hq / tp, Hkv / tp)."),
) -> None:
    """Tune this device: run a sweep file, record every measurement, install the winners."""
    from attnbench.tuner import sweep as runner
    from attnbench.tuner.backends import BackendChoice
    from attnbench.tuner.measure.processes import probe_environment
    from attnbench.tuner.plan import sweep_file as sweep_files

    try:
        choice = BackendChoice(backend, address, workers)
        if resume is not None:
            if sweep_file is not None or quick or model is not None:
                raise typer.BadParameter("--resume takes no sweep file, no --quick and no "
                                         "--model (the run folder keeps its sweep file)")
            runner.resume_sweep(resume, install_winners=install, echo=typer.echo, backend=choice)
            return
        if quick:
            path = sweep_files.quick_sweep_path()
        elif sweep_file is not None:
            path = sweep_file
        else:
            environment = probe_environment(measure_bandwidth=False)
            chosen = sweep_files.choose_device_sweep(environment["device_kind"],
                                                     environment["device_kind_raw"],
                                                     environment["platform"])
            path = chosen.path
            if chosen.warning:
                typer.echo(f"warning: {chosen.warning}", err=True)
            typer.echo(f"device {environment['device_kind']}: using {path} ({chosen.match})")
        if model is not None:
            path = _model_sweep_file(path, model, batch, context, page_size, tp)
        else:
            for name, given in (("--batch", batch), ("--context", context),
                                ("--page-size", page_size), ("--tp", tp != 1)):
                if given:
                    raise typer.BadParameter("sizes are for --model only; a sweep file "
                                             "names its own", param_hint=name)
        if choice.name != "local" and (dry_run or check_only):
            raise typer.BadParameter("--dry-run and --check-only run nothing on a backend; "
                                     "drop --backend", param_hint="--backend")
        if dry_run:
            runner.dry_run(path, shard=_parse_shard(shard), echo=typer.echo)
            return
        if check_only:
            from attnbench.tuner.check import static_check

            targets = static_check.targets_of_sweep(sweep_files.load_sweep(path))
            if not targets:
                typer.echo(f"{path} names no device with a known CUDA target", err=True)
                raise typer.Exit(1)
            csv_path = out or static_check.default_csv_path(path, targets)
            static_check.run_check(Path(path), targets, csv_path, shard=_parse_shard(shard),
                                   echo=typer.echo)
            return
        runner.start_sweep(path, out=out, shard=_parse_shard(shard), install_winners=install,
                           echo=typer.echo, backend=choice)
    except (sweep_files.SweepFileError, runner.SweepError, FileNotFoundError) as error:
        typer.echo(str(error), err=True)
        raise typer.Exit(1) from None


@app.command()
def check(
    sweep_file: Optional[Path] = typer.Argument(
        None, help="A sweep file (.yaml). Default: the shipped sweep of each target's GPU."),
    target: list[str] = typer.Option(["cuda:sm_90"], help="CUDA target, e.g. cuda:sm_90, or TPU target tpu:v5e|tpu:v6e (repeatable)."),
    out: Optional[Path] = typer.Option(None, help="CSV of the results (default results/checks/<sweep>-<targets>.csv)."),
    shard: str = typer.Option("0/1", help="Check share I of N of the sweep's problems."),
    limit: Optional[int] = typer.Option(None, help="Check at most this many configs per variant."),
    jobs: Optional[int] = typer.Option(None, min=1, help="Compile processes (default: one per core, at most 16)."),
    cache: bool = typer.Option(True, "--cache/--no-cache",
                               help="Reuse and keep kernel compile results in the user's cache folder."),
) -> None:
    """Compile every GPU config a sweep would run for real CUDA targets, or every TPU kernel
    config through Mosaic for TPU targets (no GPU or TPU needed); report shared memory,
    registers and spills (GPU) or VMEM (TPU), and which configs cannot launch."""
    from attnbench.tuner.check import cuda_check, static_check, tpu_check, tpu_static_check
    from attnbench.tuner.plan import sweep_file as sweep_files

    try:
        targets = [tpu_check.parse_target(t) if t.startswith("tpu:")
                   else cuda_check.parse_target(t) for t in target]
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="--target") from None
    runs = []
    for checker, kind in ((static_check, cuda_check.CudaTarget),
                          (tpu_static_check, tpu_check.TpuTarget)):
        of_kind = [t for t in targets if isinstance(t, kind)]
        if of_kind and sweep_file is not None:
            runs.append((checker, sweep_file, of_kind))
        for each in of_kind if sweep_file is None else []:
            runs.append((checker, sweep_files.sweeps_dir() / f"{each.device_kind}.yaml", [each]))
    try:
        for checker, path, path_targets in runs:
            csv_path = checker.default_csv_path(path, path_targets)
            if out is not None:  # one file per run when the targets need several runs
                names = "-".join(t.name for t in path_targets)
                csv_path = out if len(runs) == 1 else out.with_stem(f"{out.stem}-{names}")
            checker.run_check(path, path_targets, csv_path, shard=_parse_shard(shard),
                              limit=limit, echo=typer.echo, jobs=jobs, use_cache=cache)
    except (sweep_files.SweepFileError, FileNotFoundError) as error:
        typer.echo(str(error), err=True)
        raise typer.Exit(1) from None


@app.command()
def merge(
    run_dirs: list[Path] = typer.Argument(..., help="Run folders of one sweep (e.g. its shards)."),
    out: Optional[Path] = typer.Option(None, help="The merged run folder."),
    install: bool = typer.Option(True, "--install/--no-install",
                                 help="Install the merged winners into the user's tuned table."),
) -> None:
    """Join the runs of one sweep file (its --shard runs, say) into one run folder and table."""
    from attnbench.tuner import sweep as runner
    from attnbench.tuner.plan.sweep_file import SweepFileError

    try:
        runner.merge_runs(run_dirs, out=out, install_winners=install, echo=typer.echo)
    except (SweepFileError, runner.SweepError) as error:
        typer.echo(str(error), err=True)
        raise typer.Exit(1) from None


@app.command()
def report(
    run_dir: Path = typer.Argument(..., help="A run folder (from attnbench sweep or merge)."),
    out: Optional[Path] = typer.Option(None, help="Where to write (default RUN_DIR/report)."),
) -> None:
    """Write summary.md, PNG plots and an offline index.html for one sweep run."""
    from attnbench.tuner.report import ReportError, write_report

    try:
        result = write_report(run_dir, out, echo=typer.echo)
    except ReportError as error:
        typer.echo(str(error), err=True)
        raise typer.Exit(2) from None
    typer.echo(f"wrote {len(result.files)} files into {result.out}; open "
               f"{result.out / 'index.html'}")


@app.command()
def compare(
    a: Path = typer.Argument(..., help="The baseline: a run folder or a tuned table (.json)."),
    b: Path = typer.Argument(..., help="The candidate: a run folder or a tuned table (.json)."),
    threshold: str = typer.Option("5%", help="Slowdown that counts as a regression, e.g. 5%."),
) -> None:
    """Compare B's winners with A's; exit code 1 when B regressed (for CI)."""
    from attnbench.tuner.report.compare import CompareError, compare_paths, parse_threshold

    try:
        limit = parse_threshold(threshold)
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="--threshold") from None
    try:
        comparison = compare_paths(a, b, limit, echo=typer.echo)
    except CompareError as error:
        typer.echo(str(error), err=True)
        raise typer.Exit(2) from None
    if comparison.regressed:
        raise typer.Exit(1)


@app.command()
def selftest(
    sweep_file: Optional[Path] = typer.Argument(
        None, help="Whose problems to test on (default: the shipped CPU sweep, sweeps/cpu.yaml)."),
    seed: int = typer.Option(0, help="Seed of the inputs."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="One line per mutant."),
    device: bool = typer.Option(
        False, "--device",
        help="Instead: check this host's accelerator offline: every native variant against "
             "the reference, one problem timed with both timers, a short sweep of the device "
             "(from SWEEP_FILE if given, else the device's own); writes one JSON report."),
    out: Optional[Path] = typer.Option(
        None, help="With --device: the report folder (default results/selftest/<time>)."),
) -> None:
    """Test the correctness gate: run deliberately wrong kernels (one bad key, window, soft
    cap, sinks, GQA, causal, page table) on a sweep's problems; count how many it catches.
    With --device, test this host's accelerator instead."""
    from attnbench.tuner.measure.mutants import run_mutants
    from attnbench.tuner.plan import sweep_file as sweep_files

    if device:
        _device_selftest(sweep_file, out, seed)
        return
    if out is not None:
        raise typer.BadParameter("--out is for --device only", param_hint="--out")

    path = sweep_file or sweep_files.sweeps_dir() / "cpu.yaml"
    try:
        spec = sweep_files.load_sweep(path)
    except (sweep_files.SweepFileError, FileNotFoundError) as error:
        typer.echo(str(error), err=True)
        raise typer.Exit(1)
    caught = total = 0
    kinds: dict[str, list[int]] = {}
    for item in spec.problems:
        began = time.perf_counter()
        catches = run_mutants(item.problem, seed)
        hits = sum(c.caught for c in catches)
        caught, total = caught + hits, total + len(catches)
        typer.echo(f"{item.label}: caught {hits} of {len(catches)} "
                   f"({time.perf_counter() - began:.1f} s)")
        for catch in catches:
            kind = kinds.setdefault(catch.kind.split(" (size")[0], [0, 0])
            kind[0] += catch.caught
            kind[1] += 1
            if verbose or not catch.caught:
                mark = "caught" if catch.caught else "MISSED"
                typer.echo(f"  {mark} {catch.kind} [{catch.detail}]: {catch.reason}")
    typer.echo(f"mutant classes: {sum(c == t for c, t in kinds.values())} of {len(kinds)} "
               f"always caught")
    typer.echo(f"gate caught {caught} of {total} mutants on {len(spec.problems)} problems of "
               f"{path}")
    if caught < total:
        raise typer.Exit(1)


def _device_selftest(sweep_file: Optional[Path], out: Optional[Path], seed: int) -> None:
    import datetime

    from attnbench.tuner.device_selftest import run_device_selftest
    from attnbench.tuner.errors import SweepError
    from attnbench.tuner.plan.sweep_file import SweepFileError

    if out is None:
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
        out = Path("results") / "selftest" / stamp
    try:
        report = run_device_selftest(out, sweep_path=sweep_file, seed=seed, echo=typer.echo)
    except (SweepError, SweepFileError, FileNotFoundError) as error:
        typer.echo(str(error), err=True)
        raise typer.Exit(1)
    if not report["ok"]:
        raise typer.Exit(1)


def _one_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        text += ("; free some space: a sweep keeps every finished measurement, and "
                 "`attnbench sweep --resume RUN_DIR` finishes it")
    elif isinstance(error, OSError):
        text += " (check the path and its permissions)"
    return text


def main() -> None:
    _prefer_cpu_without_accelerator()
    try:
        app()
    except Exception as error:  # noqa: BLE001 -- every command's errors end here
        if _DEBUG["on"]:
            raise
        typer.echo(f"attnbench: error: {_one_line(error)}", err=True)
        typer.echo("(run with --debug for the full traceback)", err=True)
        sys.exit(1)


if __name__ == "__main__":
    sys.exit(main())

