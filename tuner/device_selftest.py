"""`attnbench selftest --device`: is this accelerator host ready to tune, offline?

With only the JAX already installed here (and the project, and jax-triton for the GPU
kernels), it checks in a worker process every variant that runs natively on this platform
against the reference on small problems, times one decode problem with both timers (the
profiler's device clock and the wall clock), then runs a short sweep of the detected device
(the first problem of each operator of its sweep file, a few configs per variant). Everything
goes into one JSON report. The parent, as in every sweep, never creates a JAX backend.
"""

from __future__ import annotations

import copy
import datetime
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from .errors import SweepError
from .measure import processes
from .plan import sweep_file as sweep_files

Echo = Callable[[str], None]
REPORT_FILE = "selftest.json"
# The timed problem: one Llama-3-8B decode row over 2048 keys, a call of a few MB that a
# GPU finishes in microseconds, below a jitted call's dispatch cost.
TIMED_PROBLEM = ("decode", {"batch": 1, "context": 2048})
SHORT_SWEEP_SAMPLES = 2


def _checks(connection, seed: int) -> None:
    """Worker entry: the native variants on small problems, and the two timers."""
    from .measure.worker import _die_with_parent

    _die_with_parent()
    try:
        connection.send(("ok", _run_checks(seed)))
    except Exception:  # noqa: BLE001 -- the parent reports it
        connection.send(("error", traceback.format_exc()[-4000:]))
    connection.close()


def _run_checks(seed: int) -> dict[str, Any]:
    from attnbench.kernels import registry
    from attnbench.kernels.platform import current_platform

    from .measure.accuracy import RELATIVE_ERROR_BOUND
    from .measure.bench import bench_problem
    from .measure.worker import Task, VariantRef, _Problem

    platform = current_platform()
    variants = []
    for item in sweep_files.load_sweep(sweep_files.quick_sweep_path()).problems:
        prepared = _Problem(item.problem, seed, RELATIVE_ERROR_BOUND[item.problem.dtype], None)
        shape = item.problem.shape(seed)
        for variant in registry.variants(item.problem.op):
            # Our variants that run this problem here: a peer's verdict is a finding about it,
            # not about this host, and a variant refuses shapes it does not read (by name).
            if (variant.name == "reference" or variant.peer is not None
                    or variant.unsupported_reason(shape, platform, False)):
                continue
            config = variant.default_config(shape).to_dict()
            record = prepared.measure(Task(VariantRef.of(variant), config, 1, 3, 1.0))
            variants.append({"op": item.problem.op, "variant": variant.name,
                             "problem": item.label, "config": config,
                             **{k: record.get(k) for k in (
                                 "status", "reason", "relative_error", "median_us", "timer",
                                 "cache", "timer_note")}})
    op, overrides = TIMED_PROBLEM
    problem = bench_problem(op, overrides)
    prepared = _Problem(problem, seed, RELATIVE_ERROR_BOUND[problem.dtype], None)
    variant = registry.default_variant(op, platform)
    config = variant.default_config(problem.shape(seed)).to_dict()
    timers = {}
    # The profiler first: on a CPU the compiled call is kept and only that compile asks
    # XLA for the events the profiler timer reads.
    for timer in ("profiler", "wall"):
        record = prepared.measure(Task(VariantRef.of(variant), config, 2, 10, 1.0, timer=timer))
        timers[timer] = {k: record.get(k) for k in ("status", "reason", "median_us", "p20_us",
                                                     "p80_us", "samples", "timer", "cache",
                                                     "timer_note", "wall_median_us")}
    # Wall over device on the same calls: what dispatch adds to this problem.
    profiled, walled = timers["profiler"].get("median_us"), timers["profiler"].get("wall_median_us")
    return {"variants": variants,
            "timers": {"problem": str(problem), "variant": variant.name, "config": config,
                       **timers,
                       "wall_over_device": (walled / profiled) if profiled and walled else None}}


def _in_worker(seed: int, timeout_s: float) -> dict[str, Any]:
    context = processes._context()
    connection, child = context.Pipe()
    process = context.Process(target=_checks, args=(child, seed), daemon=True)
    process.start()
    child.close()
    try:
        if not connection.poll(timeout_s):
            process.kill()
            raise SweepError(f"the variant checks took more than {timeout_s:.0f} s")
        status, payload = connection.recv()
    except EOFError:
        raise SweepError(f"the variant checks failed: {processes._death(process)}") from None
    finally:
        process.join(10)
    if status != "ok":
        raise SweepError(f"the variant checks failed:\n{payload}")
    return payload


def short_sweep_file(source: Path, out: Path) -> Path:
    """A copy of a sweep file cut down to minutes: the first problem of each operator (its
    first value on every list axis), the grid search, and at most SHORT_SWEEP_SAMPLES
    configs per variant."""
    data = copy.deepcopy(yaml.safe_load(Path(source).read_text()))
    data["name"] = f"{data.get('name', Path(source).stem)}-short"
    data["search"] = {"strategy": "grid"}
    timing = dict(data.get("timing") or {})
    timing.update(repeats=min(int(timing.get("repeats", 10)), 20),
                  max_seconds=min(float(timing.get("max_seconds") or 0.5), 0.5))
    data["timing"] = timing
    for op_entry in (data.get("ops") or {}).values():
        first = dict(op_entry["problems"][0])
        op_entry["problems"] = [{k: (v[0] if isinstance(v, list) else v) for k, v in first.items()}]
        variants = op_entry.get("variants") or {"*": {}}
        for name, plan in list(variants.items()):
            plan = dict(plan or {})
            if name != "reference":
                plan["samples"] = min(int(plan.get("samples") or SHORT_SWEEP_SAMPLES),
                                      SHORT_SWEEP_SAMPLES)
            variants[name] = plan
        op_entry["variants"] = variants
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(data, sort_keys=False))
    return out


def _our_winners(table_path) -> int:
    """Entries of our variants in a run's table (peers' best configs are entries too)."""
    from .results import records

    if not table_path.exists():
        return 0
    return sum("peer" not in entry.get("source", {})
               for entry in records.read_json(table_path)["entries"])


def run_device_selftest(out_dir: Path, *, sweep_path: Path | None = None, seed: int = 0,
                        echo: Echo = print) -> dict[str, Any]:
    """Runs the checks, the timer comparison and the short sweep; writes out_dir/selftest.json
    and returns the report (``ok`` says whether everything passed)."""
    from .results import records
    from . import sweep as runner

    began = time.perf_counter()
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise SweepError(f"{out_dir} already holds files; choose another --out")
    out_dir.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    environment = processes.probe_environment(measure_bandwidth=False)
    report["environment"] = environment
    echo(f"device {environment['device_kind']} ({environment['device_kind_raw']}), "
         f"platform {environment['platform']}, jax {environment['versions'].get('jax')}")
    checks = _in_worker(seed, timeout_s=900)
    report.update(checks)
    for row in checks["variants"]:
        echo(f"  {row['op']}/{row['variant']}: {row['status']}"
             + (f" (relative error {row['relative_error']:.1e})" if row.get("relative_error") is not None else "")
             + (f": {row['reason']}" if row.get("reason") else ""))
    timers = checks["timers"]
    for timer in ("profiler", "wall"):
        row = timers[timer]
        echo(f"  timed {timers['variant']} with the {timer} timer: "
             + (f"median {row['median_us']:.1f} us [{row['timer']} timer, {row['cache']} cache]"
                if row.get("median_us") is not None else f"{row['status']}: {row.get('reason')}")
             + (f" ({row['timer_note']})" if row.get("timer_note") else ""))
    if timers.get("wall_over_device"):
        echo(f"  on the same calls the wall clock reads {timers['wall_over_device']:.2f}x the "
             "device time")

    if sweep_path is None:
        chosen = sweep_files.choose_device_sweep(environment["device_kind"],
                                                 environment["device_kind_raw"],
                                                 environment["platform"])
        sweep_path = chosen.path
        report["sweep_choice"] = {"file": str(chosen.path), "match": chosen.match,
                                  "warning": chosen.warning}
    short = short_sweep_file(sweep_path, out_dir / "short-sweep.yaml")
    echo(f"short sweep from {sweep_path}")
    sweep_began = time.perf_counter()
    run_dir = runner.start_sweep(short, out=out_dir / "sweep", install_winners=False, echo=echo)
    measured = records.read_records(run_dir / records.LOG_FILE)
    statuses: dict[str, int] = {}
    for record in measured:
        statuses[record["status"]] = statuses.get(record["status"], 0) + 1
    timers_used = sorted({r.get("timer") for r in measured if r.get("timer")})
    report["sweep"] = {"file": str(sweep_path), "run_dir": str(run_dir),
                       "seconds": round(time.perf_counter() - sweep_began, 1),
                       "statuses": statuses, "timers": timers_used,
                       "winners": _our_winners(run_dir / records.TABLE_FILE)}
    bad_variants = [r for r in checks["variants"] if r["status"] != "ok"]
    # A config that cannot compile here is a result; a wrong or crashing one is a failure.
    failed = {s: n for s, n in statuses.items() if s in ("wrong", "crashed", "timeout", "error")}
    report["sweep"]["failed"] = failed
    report["ok"] = (not bad_variants and not failed and report["sweep"]["winners"] > 0
                    and timers["profiler"].get("status") == "ok"
                    and timers["wall"].get("status") == "ok")
    report["seconds"] = round(time.perf_counter() - began, 1)
    records.write_json_atomic(out_dir / REPORT_FILE, report)
    echo(f"report: {out_dir / REPORT_FILE} ({'ok' if report['ok'] else 'FAILED'}, "
         f"{report['seconds']:.0f} s)")
    return report
