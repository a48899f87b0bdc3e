"""Running a sweep: problems x candidates through worker processes, into a run folder.

    sweep file --(sweep_file)--> spec --(space)--> candidates per problem
        --(worker)--> one record per measurement --(records)--> run folder
        --(selection)--> winners --(install)--> the user's tuned table

Each problem gets a fresh worker process that keeps the problem's inputs and reference and
measures candidates one at a time under a per-config timeout. A config that hangs is
recorded `timeout`, one that kills its process `crashed`; the worker is replaced and the
sweep goes on. Each record is fsynced as soon as it exists and carries a stable id (problem,
variant, config, round), so `--resume` skips exactly what was done.
"""

from __future__ import annotations

import dataclasses
import datetime
import multiprocessing
import shutil
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from attnbench.kernels import registry
from attnbench.kernels.table import key_text, make_key

from . import records as run_files
from . import space, static_check, worker
from .install import install, run_table, write_table
from .selection import select_winners
from .sweep_file import SweepProblem, SweepSpec, load_sweep

Echo = Callable[[str], None]


class SweepError(RuntimeError):
    """A sweep that cannot start or go on; the message says what to do."""


# ---- Worker processes ---------------------------------------------------------------------


def _context():
    # spawn, not fork: the parent may hold JAX's threads, which a fork would copy half-way.
    return multiprocessing.get_context("spawn")


def _death(process) -> str:
    process.join(5)
    code = process.exitcode
    if code is None:
        return "the worker process stopped answering"
    if code < 0:
        try:
            return f"the worker process was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"the worker process was killed by signal {-code}"
    return f"the worker process exited with code {code}"


def probe_environment(measure_bandwidth: bool, timeout_s: float = 600.0) -> dict[str, Any]:
    """The device, versions and (optionally) read bandwidth, from a short-lived worker."""
    connection, child = _context().Pipe()
    process = _context().Process(target=worker.probe, args=(child, measure_bandwidth),
                                 daemon=True)
    process.start()
    child.close()
    try:
        if not connection.poll(timeout_s):
            process.kill()
            raise SweepError(f"probing the device took more than {timeout_s:.0f} s")
        status, payload = connection.recv()
    except EOFError:
        raise SweepError(f"probing the device failed: {_death(process)}") from None
    finally:
        process.join(10)
    if status != "ok":
        raise SweepError(f"probing the device failed:\n{payload}")
    return payload


class Worker:
    """One measuring process holding one problem's inputs."""

    def __init__(self, problem: SweepProblem, seed: int, tolerance: float,
                 bandwidth: float | None):
        self.connection, child = _context().Pipe()
        self.process = _context().Process(
            target=worker.serve, args=(child, problem.problem, seed, tolerance, bandwidth),
            daemon=True)
        self.process.start()
        child.close()

    def wait_ready(self, timeout_s: float) -> str | None:
        """None when the problem is prepared; otherwise why not."""
        try:
            if not self.connection.poll(timeout_s):
                self.stop()
                return f"preparing the problem took more than {timeout_s:.0f} s"
            status, payload = self.connection.recv()
        except EOFError:
            return f"preparing the problem failed: {_death(self.process)}"
        if status != "ready":
            self.stop()
            return f"preparing the problem failed: {payload}"
        return None

    def measure(self, task: worker.Task, timeout_s: float) -> dict[str, Any]:
        """The task's record; `timeout` or `crashed` (and this worker unusable) on failure."""
        try:
            self.connection.send(task)
            if not self.connection.poll(timeout_s):
                self.stop()
                return {"status": "timeout",
                        "reason": f"no result within the per-config timeout of {timeout_s:g} s"}
            _, record = self.connection.recv()
            return record
        except (EOFError, BrokenPipeError, ConnectionResetError):
            return {"status": "crashed", "reason": _death(self.process)}

    @property
    def alive(self) -> bool:
        return self.process.is_alive()

    def stop(self) -> None:
        if self.process.is_alive():
            try:
                self.connection.send(None)
            except (BrokenPipeError, OSError):
                pass
            self.process.join(2)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)
        self.connection.close()


# ---- Progress -------------------------------------------------------------------------------


def _clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """Configs done, failures and the time left, on one line (a new line every few seconds
    when stderr is not a terminal)."""

    def __init__(self, total: int, done: int, stream=None):
        self.total, self.done, self.start_done = total, done, done
        self.failures = 0
        self.began = time.monotonic()
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.last_line = 0.0

    def grow(self, extra: int) -> None:
        self.total += extra

    def step(self, record: dict[str, Any], label: str) -> None:
        self.done += 1
        if record["status"] not in ("ok", "skipped", "skipped_static"):
            self.failures += 1
        self.show(f"{label} {record['variant']}: {record['status']}")

    def show(self, what: str, force: bool = False) -> None:
        elapsed = time.monotonic() - self.began
        measured = self.done - self.start_done
        left = elapsed / measured * (self.total - self.done) if measured else float("nan")
        left_text = _clock(left) if left == left else "?"
        width = 24
        filled = int(width * self.done / max(self.total, 1))
        line = (f"[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} configs, "
                f"{self.failures} failed, {_clock(elapsed)} elapsed, ~{left_text} left | {what}")
        if self.tty:
            self.stream.write("\r" + line[:160].ljust(160))
            self.stream.flush()
        elif force or time.monotonic() - self.last_line > 5:
            self.stream.write(line + "\n")
            self.stream.flush()
            self.last_line = time.monotonic()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


# ---- Planning -------------------------------------------------------------------------------


def shard_problems(problems: tuple[SweepProblem, ...], shard: tuple[int, int]) -> list[SweepProblem]:
    """Problem i goes to shard i % N: deterministic, and a problem's configs stay together
    (its defaults and reference are the baselines of its speedups)."""
    index, count = shard
    return [p for i, p in enumerate(problems) if i % count == index]


@dataclasses.dataclass
class _ProblemPlan:
    problem: SweepProblem
    shape: Any
    seed: int
    candidates: list[space.Candidate]

    @property
    def runnable(self) -> list[space.Candidate]:
        return [c for c in self.candidates if c.skip_reason is None]


def plan(spec: SweepSpec, shard: tuple[int, int], platform: str) -> list[_ProblemPlan]:
    plans = []
    for problem in shard_problems(spec.problems, shard):
        seed = space.problem_seed(spec, problem)
        shape = problem.problem.shape(seed)
        plans.append(_ProblemPlan(problem, shape, seed,
                                  space.problem_candidates(spec, problem, shape, platform)))
    return plans


def describe_plan(spec: SweepSpec, plans: list[_ProblemPlan]) -> list[str]:
    """What a dry run prints: per problem and variant, configs to run and skipped."""
    lines = []
    runs = skips = 0
    for item in plans:
        lines.append(f"{item.problem.label}  [{space.problem_id(item.problem)}]")
        by_variant: dict[str, list[int]] = {}
        for candidate in item.candidates:
            counts = by_variant.setdefault(candidate.variant.name, [0, 0])
            counts[candidate.skip_reason is not None] += 1
        for name, (run, skipped) in by_variant.items():
            reasons = {c.skip_reason for c in item.candidates
                       if c.variant.name == name and c.skip_reason}
            note = f"  (e.g. {sorted(reasons)[0]})" if reasons else ""
            lines.append(f"  {name:<20} {run:4d} to run, {skipped:4d} skipped{note}")
            runs += run
            skips += skipped
    rounds = space.round_count(spec.search)
    extra = ""
    if rounds > 1:
        later = sum(max(1, round(len(p.runnable) * spec.search.keep ** r))
                    for p in plans for r in range(1, rounds))
        extra = f" + about {later} in later halving rounds"
    lines.append(f"total: {len(plans)} problems, {runs} configs to run{extra}, "
                 f"{skips} skipped after pruning")
    return lines


# ---- Running --------------------------------------------------------------------------------


def _base_record(run: dict[str, Any], item: _ProblemPlan, candidate: space.Candidate,
                 round_index: int, repeats: int) -> dict[str, Any]:
    p = item.problem.problem
    shape = item.shape
    record = {
        "id": space.measurement_id(item.problem, candidate.variant.name, candidate.config,
                                   round_index),
        "run_id": run["run_id"], "device_kind": run["device_kind"], "op": item.problem.op,
        "problem_id": space.problem_id(item.problem), "problem": item.problem.label,
        "model": item.problem.model, "max_len": p.max_len, "lengths": p.lengths,
        "min_len": p.min_len, "q_heads": p.q_heads, "kv_heads": p.kv_heads,
        "head_dim": p.head_dim, "dtype": p.dtype, "features": sorted(shape.features),
        "variant": candidate.variant.name, "config": candidate.config,
        "is_default": candidate.is_default, "round": round_index, "repeats": repeats,
        "key": make_key(shape, run["device_kind"]),
    }
    if item.problem.op == "decode":
        record["batch"] = p.batch
    else:
        record.update(num_seqs=p.num_seqs, num_tokens=shape.num_tokens, page_size=p.page_size,
                      prefill_fraction=p.prefill_fraction, prefill_chunk=p.prefill_chunk)
    return record


class _Run:
    """The state of one sweep execution over a run folder."""

    def __init__(self, run_dir: Path, spec: SweepSpec, run: dict[str, Any],
                 environment: dict[str, Any], echo: Echo):
        self.run_dir, self.spec, self.run, self.environment = run_dir, spec, run, environment
        self.echo = echo
        self.log = run_files.MeasurementLog(run_dir / run_files.LOG_FILE)
        if self.log.repaired_bytes:
            echo(f"repaired the measurement log: cut a half-written last line "
                 f"({self.log.repaired_bytes} bytes)")
        self.done = {r["id"]: r for r in run_files.read_records(self.log.path)}

    def record(self, record: dict[str, Any], progress: Progress, label: str,
               sync: bool = True) -> None:
        record["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds")
        self.log.append(record, sync=sync)
        self.done[record["id"]] = record
        progress.step(record, label)

    def run_problem(self, item: _ProblemPlan, progress: Progress) -> None:
        spec, timing = self.spec, self.spec.timing
        label = item.problem.label
        tolerance = spec.tolerances[item.problem.problem.dtype]
        bandwidth = self.environment.get("read_bandwidth_bytes_per_s")
        current: Worker | None = None
        setup_failure: str | None = None
        for candidate in item.candidates:
            if candidate.skip_reason is not None:
                record = _base_record(self.run, item, candidate, 0, 0)
                if record["id"] not in self.done:
                    record.update(status=candidate.skip_status, reason=candidate.skip_reason)
                    self.record(record, progress, label, sync=False)
        self.log.sync()
        round_candidates = item.runnable
        try:
            for round_index in range(space.round_count(spec.search)):
                if round_index > 0:
                    previous = {space.canonical([r["variant"], r["config"]]): r
                                for r in self.done.values()
                                if r["problem_id"] == space.problem_id(item.problem)
                                and r["round"] == round_index - 1}
                    round_candidates = space.survivors(round_candidates, previous,
                                                       spec.search.keep)
                repeats = space.round_repeats(spec.search, timing, round_index)
                if round_index > 0:
                    progress.grow(sum(
                        1 for c in round_candidates
                        if _base_record(self.run, item, c, round_index, repeats)["id"]
                        not in self.done))
                for candidate in round_candidates:
                    record = _base_record(self.run, item, candidate, round_index, repeats)
                    if record["id"] in self.done:
                        continue
                    if setup_failure is None and (current is None or not current.alive):
                        current = Worker(item.problem, item.seed, tolerance, bandwidth)
                        setup_failure = current.wait_ready(timing.setup_timeout_s)
                        if setup_failure:
                            self.echo(f"\n{label}: {setup_failure}")
                    if setup_failure:
                        record.update(status="crashed", reason=setup_failure)
                    else:
                        task = worker.Task(worker.VariantRef.of(candidate.variant),
                                           candidate.config, timing.warmup, repeats,
                                           timing.max_seconds)
                        record["worker_pid"] = current.process.pid
                        record.update(current.measure(task, timing.timeout_s))
                    self.record(record, progress, label)
        finally:
            if current is not None:
                current.stop()

    def execute(self, plans: list[_ProblemPlan]) -> None:
        # Later halving rounds join the total as they start (their size depends on results).
        total = sum(len(p.candidates) for p in plans)
        done_round0 = sum(1 for r in self.done.values() if r["round"] == 0)
        done_later = sum(1 for r in self.done.values() if r["round"] > 0)
        progress = Progress(total + done_later, done_round0 + done_later)
        try:
            for item in plans:
                self.run_problem(item, progress)
            progress.show("done", force=True)
        finally:
            progress.close()
            self.log.close()


def _now_tag() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")


def _provenance(run: dict[str, Any]) -> dict[str, Any]:
    return {"run_id": run["run_id"], "sweep": run["sweep_name"],
            "sweep_file": run["sweep_file"], "sweep_sha256": run["sweep_sha256"]}


def finish(run_dir: Path, *, install_winners: bool, echo: Echo) -> list:
    """Writes the CSV and the run's table from the log; installs the winners if asked."""
    run = run_files.read_json(run_dir / run_files.RUN_FILE)
    environment = run_files.read_json(run_dir / run_files.ENVIRONMENT_FILE)
    spec = load_sweep(run_dir / run_files.SWEEP_COPY)
    records = run_files.read_records(run_dir / run_files.LOG_FILE)
    run_files.write_csv(records, run_dir / run_files.CSV_FILE)
    entries = select_winners(records, noise=spec.noise, platform=environment["platform"],
                             provenance=_provenance(run))
    meta = {"device_kind": run["device_kind"], **_provenance(run),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    write_table(run_dir / run_files.TABLE_FILE, run_table(entries, meta))
    counts: dict[str, int] = {}
    for record in records:
        counts[record["status"]] = counts.get(record["status"], 0) + 1
    echo(f"{len(records)} measurements: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    for entry in entries:
        echo(f"  {key_text(entry.key)}: {entry.variant} {space.canonical(entry.config)} "
             f"{entry.time_us:.1f} us ({entry.source.get('chosen')})")
    echo(f"run folder: {run_dir}")
    if install_winners and entries:
        path = install(entries, run["device_kind"], _provenance(run))
        echo(f"installed {len(entries)} tuned entries into {path}")
    return entries


def _check_shard(shard: tuple[int, int]) -> None:
    index, count = shard
    if count < 1 or not 0 <= index < count:
        raise SweepError(f"--shard must be I/N with 0 <= I < N, got {index}/{count}")


def dry_run(sweep_path: Path, *, shard: tuple[int, int] = (0, 1), echo: Echo = print) -> None:
    """Prints the problems and configs a sweep would run after pruning; runs nothing."""
    _check_shard(shard)
    spec = load_sweep(sweep_path)
    for warning in spec.warnings:
        echo(f"warning: {warning}")
    environment = probe_environment(measure_bandwidth=False)
    for line in describe_plan(spec, plan(spec, shard, environment["platform"])):
        echo(line)


def start_sweep(sweep_path: Path, *, out: Path | None = None, shard: tuple[int, int] = (0, 1),
                install_winners: bool = True, echo: Echo = print) -> Path:
    """Runs a sweep file into a new run folder; returns the folder."""
    _check_shard(shard)
    spec = load_sweep(sweep_path)
    for warning in spec.warnings:
        echo(f"warning: {warning}")
    echo(f"sweep {spec.name} ({sweep_path}): probing the device and its read bandwidth")
    environment = probe_environment(measure_bandwidth=True)
    kind = environment["device_kind"]
    if not spec.matches_device(kind, environment["device_kind_raw"]):
        raise SweepError(f"{sweep_path} is for devices {list(spec.devices)}, but this device is "
                         f"{kind!r} ({environment['device_kind_raw']})")
    run_id = f"{_now_tag()}-{kind}" + (f"-shard{shard[0]}of{shard[1]}" if shard[1] > 1 else "")
    run_dir = Path(out) if out is not None else Path("results") / "runs" / run_id
    if run_dir.exists() and any(run_dir.iterdir()):
        raise SweepError(f"{run_dir} already holds files; choose another --out, or continue "
                         f"that run with --resume {run_dir}")
    run_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(sweep_path, run_dir / run_files.SWEEP_COPY)
    run = {"run_id": run_id, "sweep_name": spec.name, "sweep_file": str(sweep_path),
           "sweep_sha256": spec.sha256, "device_kind": kind, "shard": list(shard),
           # The untuned choice at sweep time: reports measure speedups against it, and the
           # registry's defaults may change after the run.
           "default_variants": {op: registry.DEFAULT_VARIANT.get((op, environment["platform"]))
                                for op in ("decode", "paged")},
           "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    run_files.write_json_atomic(run_dir / run_files.ENVIRONMENT_FILE, environment)
    run_files.write_json_atomic(run_dir / run_files.RUN_FILE, run)
    echo(f"device {kind}; read bandwidth "
         f"{environment.get('read_bandwidth_bytes_per_s', 0) / 1e9:.1f} GB/s; run folder {run_dir}")
    _execute(run_dir, spec, run, environment, install_winners, echo)
    return run_dir


def resume_sweep(run_dir: Path, *, install_winners: bool = True, echo: Echo = print) -> Path:
    """Finishes an interrupted run: what its log holds is kept, the rest is measured."""
    run_dir = Path(run_dir)
    if not (run_dir / run_files.RUN_FILE).exists():
        raise SweepError(f"{run_dir} is not a run folder (no {run_files.RUN_FILE})")
    run = run_files.read_json(run_dir / run_files.RUN_FILE)
    environment = run_files.read_json(run_dir / run_files.ENVIRONMENT_FILE)
    spec = load_sweep(run_dir / run_files.SWEEP_COPY)
    if spec.sha256 != run["sweep_sha256"]:
        raise SweepError(f"{run_dir / run_files.SWEEP_COPY} changed since the run started")
    for warning in spec.warnings:
        echo(f"warning: {warning}")
    here = probe_environment(measure_bandwidth=False)
    if here["device_kind"] != run["device_kind"]:
        raise SweepError(f"{run_dir} was measured on {run['device_kind']!r}; this device is "
                         f"{here['device_kind']!r}")
    echo(f"resuming {run['run_id']} in {run_dir}")
    _execute(run_dir, spec, run, environment, install_winners, echo)
    return run_dir


def _execute(run_dir: Path, spec: SweepSpec, run: dict[str, Any], environment: dict[str, Any],
             install_winners: bool, echo: Echo) -> None:
    plans = plan(spec, tuple(run["shard"]), environment["platform"])
    if environment["platform"] == "gpu":
        verdicts = static_check.check_before_sweep(run_dir / run_files.SWEEP_COPY, run_dir,
                                                   run["device_kind"], tuple(run["shard"]), echo)
        if verdicts:
            echo(f"{static_check.prune(plans, verdicts)} configs skipped: they cannot compile "
                 "or launch on this GPU (skipped_static)")
    state = _Run(run_dir, spec, run, environment, echo)
    try:
        state.execute(plans)
    except KeyboardInterrupt:
        echo(f"\ninterrupted; continue with: attnbench sweep --resume {run_dir}")
        raise
    finish(run_dir, install_winners=install_winners, echo=echo)


def merge_runs(run_dirs: list[Path], *, out: Path | None = None, install_winners: bool = True,
               echo: Echo = print) -> Path:
    """Joins runs of one sweep file on one device kind (e.g. its shards) into one run folder."""
    if not run_dirs:
        raise SweepError("merge needs at least one run folder")
    runs = []
    for run_dir in run_dirs:
        path = Path(run_dir) / run_files.RUN_FILE
        if not path.exists():
            raise SweepError(f"{run_dir} is not a run folder (no {run_files.RUN_FILE})")
        runs.append(run_files.read_json(path))
    first = runs[0]
    for run_dir, run in zip(run_dirs[1:], runs[1:]):
        for field in ("sweep_sha256", "device_kind"):
            if run[field] != first[field]:
                raise SweepError(f"cannot merge {run_dir}: its {field} {run[field]!r} differs "
                                 f"from {run_dirs[0]}'s {first[field]!r}")
    run_id = f"{_now_tag()}-{first['device_kind']}-merged"
    out = Path(out) if out is not None else Path("results") / "runs" / run_id
    if out.exists() and any(out.iterdir()):
        raise SweepError(f"{out} already holds files; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(Path(run_dirs[0]) / run_files.SWEEP_COPY, out / run_files.SWEEP_COPY)
    environment = run_files.read_json(Path(run_dirs[0]) / run_files.ENVIRONMENT_FILE)
    run_files.write_json_atomic(out / run_files.ENVIRONMENT_FILE, environment)
    merged = {**first, "run_id": run_id, "shard": [0, 1],
              "merged_from": [r["run_id"] for r in runs]}
    run_files.write_json_atomic(out / run_files.RUN_FILE, merged)
    log = run_files.MeasurementLog(out / run_files.LOG_FILE)
    seen = set()
    for run_dir in run_dirs:
        for record in run_files.read_records(Path(run_dir) / run_files.LOG_FILE):
            if record["id"] not in seen:
                seen.add(record["id"])
                log.append(record, sync=False)
    log.sync()
    log.close()
    echo(f"merged {len(seen)} measurements from {len(run_dirs)} runs")
    finish(out, install_winners=install_winners, echo=echo)
    return out
