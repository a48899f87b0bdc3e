"""Running a sweep: problems x candidates through worker processes, into a run folder.

    sweep file --(plan)--> problems x candidate configs
        --(measure: a worker process per problem)--> one checked record per measurement
        --(results: records)--> run folder --(selection)--> winners --(install)--> table

Each problem gets a fresh worker process that keeps the problem's inputs and reference and
measures candidates one at a time under a per-config timeout. A config that hangs is
recorded `timeout`, one that kills its process `crashed`; the worker is replaced and the
sweep goes on. Each record is fsynced as soon as it exists and carries a stable id (problem,
variant, config, round), so `--resume` skips exactly what was done.
"""

from __future__ import annotations

import datetime
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from attnbench.kernels import registry
from attnbench.kernels.fingerprint import toolchain_versions, variant_fingerprint
from attnbench.kernels.table import key_text, make_key

from .check import static_check
from .errors import SweepError
from .measure import processes, worker
from .measure.accuracy import RELATIVE_ERROR_BOUND
from .plan import space
from .plan.planning import ProblemPlan, describe_plan, plan
from .plan.sweep_file import SweepSpec, load_sweep
from .progress import SweepProgress
from .results import records as run_files
from .results.install import install, run_table, write_table
from .results.lock import RunFolderLock
from .results.selection import select_winners

Echo = Callable[[str], None]

__all__ = ["SweepError", "dry_run", "finish", "merge_runs", "resume_sweep", "start_sweep"]


# ---- Running --------------------------------------------------------------------------------


def _base_record(run: dict[str, Any], item: ProblemPlan, candidate: space.Candidate,
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
        # The code measured, so a table entry can tell when its variant has changed since.
        "fingerprint": variant_fingerprint(candidate.variant),
    }
    record.update(p.record_fields(shape))
    # How many sequences the problem serves, whatever the op calls them (batch, num_seqs):
    # reports plot against it without knowing the op.
    record["sequences"] = p.sequences
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

    def record(self, record: dict[str, Any], progress: SweepProgress, label: str,
               sync: bool = True) -> None:
        record["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds")
        self.log.append(record, sync=sync)
        self.done[record["id"]] = record
        progress.step(record, label)

    def run_problem(self, item: ProblemPlan, progress: SweepProgress) -> None:
        spec, timing = self.spec, self.spec.timing
        label = item.problem.label
        dtype = item.problem.problem.dtype
        tolerance = spec.tolerances.get(dtype, RELATIVE_ERROR_BOUND[dtype])
        bandwidth = self.environment.get("read_bandwidth_bytes_per_s")
        current: processes.Worker | None = None
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
                                if r.get("problem_id") == space.problem_id(item.problem)
                                and r.get("round") == round_index - 1}
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
                        current = processes.Worker(item.problem, item.seed, tolerance, bandwidth)
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

    def execute(self, plans: list[ProblemPlan]) -> None:
        # Later halving rounds join the total as they start (their size depends on results).
        total = sum(len(p.candidates) for p in plans)
        done_round0 = sum(1 for r in self.done.values() if r.get("round", 0) == 0)
        done_later = len(self.done) - done_round0
        progress = SweepProgress(total + done_later, done_round0 + done_later)
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
            "sweep_file": run["sweep_file"], "sweep_sha256": run["sweep_sha256"],
            "versions": run.get("versions")}


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
        status = str(record.get("status"))
        counts[status] = counts.get(status, 0) + 1
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
    environment = processes.probe_environment(measure_bandwidth=False)
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
    environment = processes.probe_environment(measure_bandwidth=True)
    kind = environment["device_kind"]
    if not spec.matches_device(kind, environment["device_kind_raw"]):
        raise SweepError(f"{sweep_path} is for devices {list(spec.devices)}, but this device is "
                         f"{kind!r} ({environment['device_kind_raw']})")
    run_id = f"{_now_tag()}-{kind}" + (f"-shard{shard[0]}of{shard[1]}" if shard[1] > 1 else "")
    run_dir = Path(out) if out is not None else Path("results") / "runs" / run_id
    if run_dir.exists() and not run_dir.is_dir():
        raise SweepError(f"--out {run_dir} is a file, not a folder; choose another --out")
    if run_dir.exists() and any(run_dir.iterdir()):
        raise SweepError(f"{run_dir} already holds files; choose another --out, or continue "
                         f"that run with --resume {run_dir}")
    run_dir.mkdir(parents=True, exist_ok=True)
    with RunFolderLock(run_dir):
        _start_in(run_dir, sweep_path, spec, environment, shard, run_id, install_winners, echo)
    return run_dir


def _start_in(run_dir: Path, sweep_path: Path, spec: SweepSpec, environment: dict[str, Any],
              shard: tuple[int, int], run_id: str, install_winners: bool, echo: Echo) -> None:
    kind = environment["device_kind"]
    shutil.copyfile(sweep_path, run_dir / run_files.SWEEP_COPY)
    run = {"run_id": run_id, "sweep_name": spec.name, "sweep_file": str(sweep_path),
           "sweep_sha256": spec.sha256, "device_kind": kind, "shard": list(shard),
           # The untuned choice at sweep time: reports measure speedups against it, and the
           # registry's defaults may change after the run.
           "default_variants": {op: registry.DEFAULT_VARIANT.get((op, environment["platform"]))
                                for op in registry.OPERATOR_NAMES},
           "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "versions": toolchain_versions()}
    run_files.write_json_atomic(run_dir / run_files.ENVIRONMENT_FILE, environment)
    run_files.write_json_atomic(run_dir / run_files.RUN_FILE, run)
    echo(f"device {kind}; read bandwidth "
         f"{environment.get('read_bandwidth_bytes_per_s', 0) / 1e9:.1f} GB/s; run folder {run_dir}")
    _execute(run_dir, spec, run, environment, install_winners, echo)


def resume_sweep(run_dir: Path, *, install_winners: bool = True, echo: Echo = print) -> Path:
    """Finishes an interrupted run: what its log holds is kept, the rest is measured."""
    run_dir = Path(run_dir)
    if not (run_dir / run_files.RUN_FILE).exists():
        raise SweepError(f"{run_dir} is not a run folder (no {run_files.RUN_FILE})")
    with RunFolderLock(run_dir):
        _resume_in(run_dir, install_winners, echo)
    return run_dir


def _resume_in(run_dir: Path, install_winners: bool, echo: Echo) -> None:
    run = run_files.read_json(run_dir / run_files.RUN_FILE)
    environment = run_files.read_json(run_dir / run_files.ENVIRONMENT_FILE)
    spec = load_sweep(run_dir / run_files.SWEEP_COPY)
    if spec.sha256 != run["sweep_sha256"]:
        raise SweepError(f"{run_dir / run_files.SWEEP_COPY} changed since the run started")
    for warning in spec.warnings:
        echo(f"warning: {warning}")
    here = processes.probe_environment(measure_bandwidth=False)
    if here["device_kind"] != run["device_kind"]:
        raise SweepError(f"{run_dir} was measured on {run['device_kind']!r}; this device is "
                         f"{here['device_kind']!r}")
    echo(f"resuming {run['run_id']} in {run_dir}")
    _execute(run_dir, spec, run, environment, install_winners, echo)


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
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SweepError(f"{out} already holds files; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    with RunFolderLock(out):
        _merge_into(out, run_dirs, runs, run_id, install_winners, echo)
    return out


def _merge_into(out: Path, run_dirs: list[Path], runs: list[dict[str, Any]], run_id: str,
                install_winners: bool, echo: Echo) -> None:
    first = runs[0]
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
