"""Running a sweep: problems x candidates through worker processes, into a run folder.

    sweep file --(plan)--> problems x candidate configs
        --(measure: a worker process per problem)--> one checked record per measurement
        --(results: records)--> run folder --(selection)--> winners --(install)--> table

Each problem gets a fresh worker process that keeps the problem's inputs and reference and
measures candidates one at a time under a per-config timeout (on this host, or on the actors
of a Ray cluster: see backends/). A config that hangs is
recorded `timeout`, one that kills its process `crashed`; the worker is replaced and the
sweep goes on. Each record is fsynced as soon as it exists and carries a stable id (problem,
variant, config, round), so `--resume` skips exactly what was done.

When the backend finds devices of several kinds that the sweep file is for (a mixed Ray
cluster), each kind gets a run folder of its own under the one asked for (RUN/<kind>/, each
a complete run with its log, CSV and table), the kinds measure at once on their own devices,
and RUN/kinds.json says which kinds are finished, so `--resume RUN` continues the others.
"""

from __future__ import annotations

import contextlib
import datetime
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from attnbench.kernels import registry
from attnbench.kernels.fingerprint import toolchain_versions
from attnbench.kernels.table import key_text

from .backends import LOCAL, BackendChoice, open_session
from .backends.state import KindRun, RunState, shared_progress
from .check import static_check
from .errors import SweepError
from .measure import processes
from .plan import space
from .plan.planning import describe_plan, plan
from .plan.sweep_file import SweepSpec, load_sweep
from .results import records as run_files
from .results.install import install, run_table, write_table
from .results.lock import RunFolderLock
from .results.selection import select_winners

Echo = Callable[[str], None]

__all__ = ["SweepError", "dry_run", "finish", "merge_runs", "resume_sweep", "start_sweep"]


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
    plans = plan(spec, shard, environment["platform"], environment["device_kind"])
    for line in describe_plan(spec, plans):
        echo(line)


def start_sweep(sweep_path: Path, *, out: Path | None = None, shard: tuple[int, int] = (0, 1),
                install_winners: bool = True, echo: Echo = print,
                backend: BackendChoice = LOCAL) -> Path:
    """Runs a sweep file into a new run folder; returns the folder."""
    _check_shard(shard)
    spec = load_sweep(sweep_path)
    for warning in spec.warnings:
        echo(f"warning: {warning}")
    with open_session(backend, echo) as session:
        return _start(session, sweep_path, spec, out, shard, install_winners, echo)


def _start(session, sweep_path: Path, spec: SweepSpec, out: Path | None,
           shard: tuple[int, int], install_winners: bool, echo: Echo) -> Path:
    echo(f"sweep {spec.name} ({sweep_path}): probing the device and its read bandwidth")
    environments = session.probe(spec.matches_device, measure_bandwidth=True)
    for environment in environments:
        kind = environment["device_kind"]
        if not spec.matches_device(kind, environment["device_kind_raw"]):
            raise SweepError(f"{sweep_path} is for devices {list(spec.devices)}, but this device "
                             f"is {kind!r} ({environment['device_kind_raw']})")
    kinds = [e["device_kind"] for e in environments]
    tag = _now_tag()
    shard_tag = f"-shard{shard[0]}of{shard[1]}" if shard[1] > 1 else ""
    run_dir = (Path(out) if out is not None
               else Path("results") / "runs" / f"{tag}-{'+'.join(kinds)}{shard_tag}")
    if run_dir.exists() and not run_dir.is_dir():
        raise SweepError(f"--out {run_dir} is a file, not a folder; choose another --out")
    if run_dir.exists() and any(run_dir.iterdir()):
        raise SweepError(f"{run_dir} already holds files; choose another --out, or continue "
                         f"that run with --resume {run_dir}")
    run_dir.mkdir(parents=True, exist_ok=True)
    with RunFolderLock(run_dir):
        if len(environments) == 1:
            _start_in(session, run_dir, sweep_path, spec, environments[0], shard,
                      f"{tag}-{kinds[0]}{shard_tag}", install_winners, echo)
        else:
            _start_kinds(session, run_dir, sweep_path, spec, environments, shard,
                         (tag, shard_tag), install_winners, echo)
    return run_dir


class _RunFolder(NamedTuple):
    """A run folder as read back: what `_execute` needs of it."""

    run_dir: Path
    spec: SweepSpec
    run: dict[str, Any]
    environment: dict[str, Any]


def _new_run(run_dir: Path, sweep_path: Path, spec: SweepSpec, environment: dict[str, Any],
             shard: tuple[int, int], run_id: str, echo: Echo) -> _RunFolder:
    """Writes a new run folder's sweep copy, environment and run files."""
    kind = environment["device_kind"]
    shutil.copyfile(sweep_path, run_dir / run_files.SWEEP_COPY)
    run = {"run_id": run_id, "sweep_name": spec.name, "sweep_file": str(sweep_path),
           "sweep_sha256": spec.sha256, "device_kind": kind, "shard": list(shard),
           # The untuned choice at sweep time: reports measure speedups against it, and the
           # registry's defaults may change after the run.
           "default_variants": {op: registry.default_variant_name(op, environment["platform"])
                                for op in registry.OPERATOR_NAMES},
           "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "versions": toolchain_versions()}
    run_files.write_json_atomic(run_dir / run_files.ENVIRONMENT_FILE, environment)
    run_files.write_json_atomic(run_dir / run_files.RUN_FILE, run)
    echo(f"device {kind}; read bandwidth "
         f"{environment.get('read_bandwidth_bytes_per_s', 0) / 1e9:.1f} GB/s; run folder {run_dir}")
    return _RunFolder(run_dir, spec, run, environment)


def _start_in(session, run_dir: Path, sweep_path: Path, spec: SweepSpec,
              environment: dict[str, Any], shard: tuple[int, int], run_id: str,
              install_winners: bool, echo: Echo) -> None:
    folder = _new_run(run_dir, sweep_path, spec, environment, shard, run_id, echo)
    _execute(session, *folder, install_winners, echo)


def _start_kinds(session, parent: Path, sweep_path: Path, spec: SweepSpec,
                 environments: list[dict[str, Any]], shard: tuple[int, int],
                 tags: tuple[str, str], install_winners: bool, echo: Echo) -> None:
    """One run folder per device kind under `parent`, measured at once."""
    tag, shard_tag = tags
    with contextlib.ExitStack() as locks:
        folders = []
        for environment in environments:
            kind = environment["device_kind"]
            run_dir = parent / kind
            run_dir.mkdir()
            locks.enter_context(RunFolderLock(run_dir))
            folders.append(_new_run(run_dir, sweep_path, spec, environment, shard,
                                    f"{tag}-{kind}{shard_tag}", echo))
        # Written last: a parent holding it has every kind's run folder complete.
        run_files.write_json_atomic(parent / run_files.KINDS_FILE, {
            "sweep_name": spec.name, "sweep_file": str(sweep_path),
            "sweep_sha256": spec.sha256, "shard": list(shard),
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec="seconds"),
            "kinds": {f.run["device_kind"]: {"folder": f.run_dir.name, "finished": None}
                      for f in folders}})
        _execute_kinds(session, parent, folders, install_winners, echo)


def resume_sweep(run_dir: Path, *, install_winners: bool = True, echo: Echo = print,
                 backend: BackendChoice = LOCAL) -> Path:
    """Finishes an interrupted run: what its log holds is kept, the rest is measured (with
    either backend, whichever started it). Given the parent folder of a sweep over several
    device kinds, finishes each kind's run that is not finished."""
    run_dir = Path(run_dir)
    if (run_dir / run_files.KINDS_FILE).exists():
        _resume_kinds(run_dir, install_winners, echo, backend)
        return run_dir
    if not (run_dir / run_files.RUN_FILE).exists():
        raise SweepError(f"{run_dir} is not a run folder (no {run_files.RUN_FILE}, nor the "
                         f"{run_files.KINDS_FILE} of a sweep over several device kinds)")
    with RunFolderLock(run_dir), open_session(backend, echo) as session:
        _resume_in(session, run_dir, install_winners, echo)
    return run_dir


def _read_run(run_dir: Path, echo: Echo) -> _RunFolder:
    run = run_files.read_json(run_dir / run_files.RUN_FILE)
    environment = run_files.read_json(run_dir / run_files.ENVIRONMENT_FILE)
    spec = load_sweep(run_dir / run_files.SWEEP_COPY)
    if spec.sha256 != run["sweep_sha256"]:
        raise SweepError(f"{run_dir / run_files.SWEEP_COPY} changed since the run started")
    for warning in spec.warnings:
        echo(f"warning: {warning}")
    return _RunFolder(run_dir, spec, run, environment)


def _resume_in(session, run_dir: Path, install_winners: bool, echo: Echo) -> None:
    folder = _read_run(run_dir, echo)
    run = folder.run
    here = session.probe(lambda kind, raw: kind == run["device_kind"],
                         measure_bandwidth=False)[0]
    if here["device_kind"] != run["device_kind"]:
        raise SweepError(f"{run_dir} was measured on {run['device_kind']!r}; this device is "
                         f"{here['device_kind']!r}")
    echo(f"resuming {run['run_id']} in {run_dir}")
    _execute(session, *folder, install_winners, echo)


def _resume_kinds(parent: Path, install_winners: bool, echo: Echo,
                  backend: BackendChoice) -> None:
    """Resumes every unfinished kind's run under `parent` that has devices here; then raises
    SweepError naming the kinds that had none."""
    with RunFolderLock(parent):
        kinds = run_files.read_json(parent / run_files.KINDS_FILE)["kinds"]
        unfinished = {kind: parent / entry["folder"] for kind, entry in kinds.items()
                      if not entry.get("finished")}
        if not unfinished:
            echo(f"every device kind's run in {parent} is finished "
                 f"({', '.join(sorted(kinds))}); nothing to resume")
            return
        with contextlib.ExitStack() as stack:
            for run_dir in unfinished.values():
                stack.enter_context(RunFolderLock(run_dir))
            folders = {kind: _read_run(run_dir, echo) for kind, run_dir in unfinished.items()}
            session = stack.enter_context(open_session(backend, echo))
            environments = session.probe(lambda kind, raw: kind in unfinished,
                                         measure_bandwidth=False)
            found = sorted({e["device_kind"] for e in environments})
            here = [kind for kind in found if kind in unfinished]
            missing = sorted(set(unfinished) - set(here))
            if not here:
                raise SweepError(f"{parent}'s unfinished runs are for {missing}, but the "
                                 f"devices here are {found}")
            echo(f"resuming {', '.join(here)} in {parent}")
            _execute_kinds(session, parent, [folders[kind] for kind in here], install_winners,
                           echo)
    if missing:
        raise SweepError(f"no device of kind {', '.join(missing)} here, so {parent}'s runs for "
                         f"{'it' if len(missing) == 1 else 'them'} stay unfinished; continue "
                         f"with --resume {parent} where there is one")


def _prepare(run_dir: Path, spec: SweepSpec, run: dict[str, Any],
             environment: dict[str, Any], echo: Echo) -> KindRun:
    """The run's plans and state, as a backend measures them."""
    plans = plan(spec, tuple(run["shard"]), environment["platform"], run["device_kind"])
    if environment["platform"] == "gpu":
        verdicts = static_check.check_before_sweep(run_dir / run_files.SWEEP_COPY, run_dir,
                                                   run["device_kind"], tuple(run["shard"]), echo)
        if verdicts:
            echo(f"{static_check.prune(plans, verdicts)} configs skipped: they cannot compile "
                 "or launch on this GPU (skipped_static)")
    return KindRun(RunState(run_dir, spec, run, environment, echo), plans)


def _execute(session, run_dir: Path, spec: SweepSpec, run: dict[str, Any],
             environment: dict[str, Any], install_winners: bool, echo: Echo) -> None:
    work = _prepare(run_dir, spec, run, environment, echo)
    progress = work.state.new_progress(work.plans)
    try:
        try:
            session.run([work], progress)
            progress.show("done", force=True)
        finally:
            progress.close()
            work.state.log.close()
    except KeyboardInterrupt:
        echo(f"\ninterrupted; continue with: attnbench sweep --resume {run_dir}")
        raise
    finish(run_dir, install_winners=install_winners, echo=echo)


def _execute_kinds(session, parent: Path, folders: list[_RunFolder], install_winners: bool,
                   echo: Echo) -> None:
    """Measures the kinds' runs at once; each is finished (table, install, marked so in
    kinds.json) as soon as its own measurements are all in."""
    works = [_prepare(*folder, echo) for folder in folders]

    def finished(work: KindRun) -> None:
        work.state.log.close()
        finish(work.state.run_dir, install_winners=install_winners, echo=echo)
        path = parent / run_files.KINDS_FILE
        manifest = run_files.read_json(path)
        manifest["kinds"][work.kind]["finished"] = datetime.datetime.now(
            datetime.timezone.utc).isoformat(timespec="seconds")
        run_files.write_json_atomic(path, manifest)

    progress = shared_progress(works)
    try:
        try:
            session.run(works, progress, finished)
            progress.show("done", force=True)
        finally:
            progress.close()
            for work in works:
                work.state.log.close()
    except KeyboardInterrupt:
        echo(f"\ninterrupted; continue with: attnbench sweep --resume {parent}")
        raise


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
