"""Sweeps on the Ray backend, on a real local Ray cluster of two CPUs shared by the tests:
the same results as the local backend, and every measurement exactly once through dead
workers, dead actors and a killed driver."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray  # the test extra installs it: a missing Ray fails here, loudly
import yaml

import ray_kinds
import tuner_variants
from attnbench.kernels import registry
from attnbench.kernels.table import read_table
from attnbench.tuner import sweep as runner
from attnbench.tuner.backends import BackendChoice
from attnbench.tuner.backends.ray_backend import RaySession
from attnbench.tuner.plan import space
from attnbench.tuner.plan.sweep_file import load_sweep
from attnbench.tuner.report.load import ReportError, load_run
from attnbench.tuner.results import records

TESTS_DIR = Path(__file__).resolve().parent
TINY = {"q_heads": 4, "kv_heads": 2, "head_dim": 32, "batch": 2, "context": 64,
        "dtype": "float32"}
FAST_TIMING = {"warmup": 1, "repeats": 3, "max_seconds": 0.2, "timeout_s": 20,
               "setup_timeout_s": 240}
RAY = BackendChoice("ray", workers=2)


@pytest.fixture(scope="module")
def cluster():
    """One Ray instance for the module (starting one takes seconds). Its workers inherit
    this environment, so they import attnbench and the test-only variants as the tests do."""
    with pytest.MonkeyPatch.context() as patch:
        paths = [str(TESTS_DIR), *filter(None, os.environ.get("PYTHONPATH", "").split(":"))]
        patch.setenv("PYTHONPATH", ":".join(paths))
        context = ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                           object_store_memory=100 * 1024 * 1024)
        try:
            yield context.address_info["address"]
        finally:
            ray.shutdown()


@pytest.fixture
def test_variants(monkeypatch):
    monkeypatch.setattr(registry, "VARIANTS", registry.VARIANTS + tuner_variants.VARIANTS)


def write_sweep(path: Path, ops: dict, **top) -> Path:
    data = {"devices": ["cpu"], "timing": FAST_TIMING, "ops": ops, **top}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def log_lines(run_dir: Path) -> list[dict]:
    """Every complete line of the log, duplicates included (read_records merges them)."""
    text = (run_dir / records.LOG_FILE).read_text()
    return [json.loads(line) for line in text.splitlines() if line.endswith("}")]


def expected_round0_ids(sweep: Path) -> set[str]:
    spec = load_sweep(sweep)
    ids = set()
    for problem in spec.problems:
        shape = problem.problem.shape(space.problem_seed(spec, problem))
        for candidate in space.problem_candidates(spec, problem, shape, "cpu"):
            ids.add(space.measurement_id(problem, candidate.variant.name, candidate.config, 0))
    return ids


def assert_each_once(run_dir: Path) -> list[dict]:
    lines = log_lines(run_dir)
    ids = [r["id"] for r in lines]
    assert len(ids) == len(set(ids)), "a measurement was written twice"
    return lines


def test_ray_sweep_matches_the_local_one(tmp_path, cluster, test_variants):
    """Halving across actors, a wrong and a crashing variant: the same ids, statuses and
    winners as the local backend; on Ray the crash is tried on a second worker, then recorded.
    (Every config that runs ok survives to round 1, so which ones do is no matter of noise.)"""
    sweep = write_sweep(tmp_path / "sweep.yaml", {"decode": {
        "problems": [dict(TINY)],
        "variants": {
            "test_good": {"grid": {"extra_work": [0, 3, 7], "block": [16]}},
            "test_wrong": {"grid": {"mode": ["scaled"]}},
            "test_crash": {"grid": {"how": ["exit"]}},
        }}}, search={"strategy": "halving", "keep": 0.9, "rounds": 2, "first_repeats": 2})
    local = runner.start_sweep(sweep, out=tmp_path / "local", install_winners=False,
                               echo=lambda line: None)
    on_ray = runner.start_sweep(sweep, out=tmp_path / "ray", install_winners=False,
                                echo=lambda line: None, backend=RAY)
    local_records = {r["id"]: r for r in assert_each_once(local)}
    ray_records = {r["id"]: r for r in assert_each_once(on_ray)}
    assert set(ray_records) == set(local_records)
    assert any(r["round"] == 1 for r in ray_records.values())
    assert {i: r["status"] for i, r in ray_records.items()} == {
        i: r["status"] for i, r in local_records.items()}
    (crashed,) = [r for r in ray_records.values() if r["status"] == "crashed"]
    assert "twice" in crashed["reason"] and crashed["reason"].count("exited with code 3") == 2
    # Both actors measured.
    assert len({r["actor_pid"] for r in ray_records.values() if "actor_pid" in r}) == 2

    def winner(run_dir):
        (entry,) = read_table(run_dir / records.TABLE_FILE).entries
        return entry.variant, space.canonical(entry.config)

    # The reference and test_good's cheapest config compute the same thing in the same time,
    # so timing noise picks between them; the extra work never wins.
    tied = {("reference", "{}"), ("test_good", '{"block":16,"extra_work":0}')}
    assert winner(local) in tied and winner(on_ray) in tied
    # The two actors share this host's CPU: while one timed, the other neither timed nor
    # compiled nor checked (the two did work at the same time, though).
    timed = [(r["worker_pid"], r["timed_at"]) for r in ray_records.values() if "timed_at" in r]
    worked = [(r["worker_pid"], r["worked_at"]) for r in ray_records.values()
              if "worked_at" in r]
    assert len(timed) >= 6 and len(worked) >= len(timed)

    def overlap(a, b):
        return a[0] < b[1] and b[0] < a[1]

    assert not [(p, w) for p, w in timed for q, v in timed + worked
                if q != p and overlap(w, v)]
    assert [(p, w) for p, w in worked for q, v in worked if q != p and overlap(w, v)]
    environment = json.loads((on_ray / records.ENVIRONMENT_FILE).read_text())
    assert environment["backend"] == {"name": "ray", "actors": 2, "hosts": 1}


def _parent_pid(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("PPid:"):
                return int(line.split()[1])
    except FileNotFoundError:
        return None
    return None


def _wait_for(condition, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _driver(sweep: Path, out: Path, address: str, actor_class: str = "None",
            install: bool = False) -> str:
    """A driver's program; `actor_class` is an expression (ray_kinds is imported)."""
    return (f"import sys; sys.path.insert(0, {str(TESTS_DIR)!r}); import tuner_variants; "
            "import ray_kinds; "
            "from attnbench.kernels import registry; "
            "registry.VARIANTS = registry.VARIANTS + tuner_variants.VARIANTS; "
            "from attnbench.tuner import sweep as runner; "
            "from attnbench.tuner.backends import BackendChoice; "
            f"runner.start_sweep({str(sweep)!r}, out={str(out)!r}, install_winners={install}, "
            f"backend=BackendChoice('ray', address={address!r}, workers=2, "
            f"actor_class={actor_class}))")


def test_deaths_mid_sweep_lose_and_duplicate_nothing(tmp_path, cluster, test_variants):
    """A worker killed, then its actor, then the driver (kill -9 each): the resumed run holds
    every measurement exactly once, all of them right."""
    sweep = write_sweep(tmp_path / "sweep.yaml", {"decode": {
        "problems": [{**TINY, "batch": [1, 2]}],
        "variants": {"test_good": {"grid": {"extra_work": list(range(8)),
                                            "block": [16, 32, 128]}}}}})
    out = tmp_path / "run"
    log_path = out / records.LOG_FILE
    process = subprocess.Popen([sys.executable, "-c", _driver(sweep, out, cluster)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def measured():
        if process.poll() is not None:
            raise AssertionError("the sweep ended before the kills: "
                                 + process.stderr.read().decode()[-3000:])
        return log_path.exists() and [r for r in records.read_records(log_path)
                                      if "actor_pid" in r]

    try:
        first = _wait_for(measured, 240, "a first measurement")[0]
        worker_pid, actor_pid = first["worker_pid"], first["actor_pid"]
        assert _parent_pid(worker_pid) == actor_pid
        os.kill(worker_pid, signal.SIGKILL)
        # Then the actor that held that worker, once it measures again with a fresh one.
        _wait_for(lambda: [r for r in measured() if r["actor_pid"] == actor_pid
                           and r["worker_pid"] != worker_pid], 240,
                  "a measurement from the killed worker's actor")
        os.kill(actor_pid, signal.SIGKILL)
        # Then the driver, once it has gone on measuring past the dead actor.
        count = len(measured())
        _wait_for(lambda: len(measured()) >= count + 2, 240, "measurements after the kills")
        process.send_signal(signal.SIGKILL)
        process.wait(30)
    finally:
        if process.poll() is None:
            process.kill()
    before = {r["id"]: r for r in log_lines(out)}
    assert len([r for r in before.values() if r["status"] != "skipped"]) < 34

    runner.resume_sweep(out, install_winners=False, echo=lambda line: None, backend=RAY)
    lines = assert_each_once(out)
    after = {r["id"]: r for r in lines}
    assert before.items() <= after.items()
    assert set(after) == expected_round0_ids(sweep)
    assert sum(r["status"] == "ok" for r in lines) == 34  # block 128 > S 64 is skipped
    assert all(r["status"] in ("ok", "skipped") for r in lines)
    # Measured by the first two actors, and on resume by fresh ones.
    assert len({r["actor_pid"] for r in lines if "actor_pid" in r}) >= 3
    assert (out / records.TABLE_FILE).exists()


def test_a_cluster_of_two_kinds_sweeps_each_kind_into_its_own_run(tmp_path, cluster,
                                                                  test_variants):
    """Two CPU actors reporting two device kinds, the driver killed (kill -9) once both kinds
    have measured: `--resume` on the parent folder completes both kinds' runs. Each kind's
    configs ran on its own actor only, every measurement is in its kind's log exactly once,
    and each kind has its table and its installed winners."""
    kinds = ("cpu-one", "cpu-two")
    sweep = write_sweep(tmp_path / "sweep.yaml", {"decode": {
        "problems": [dict(TINY)],
        "variants": {"test_good": {"grid": {"extra_work": [0, 1], "block": [16, 32]}}}}},
        devices=list(kinds))
    slots = str(tmp_path / "kind-slots")
    actor_class = f"ray_kinds.measurer_reporting({kinds!r}, {slots!r})"
    out = tmp_path / "run"
    logs = {kind: out / kind / records.LOG_FILE for kind in kinds}
    process = subprocess.Popen(
        [sys.executable, "-u", "-c", _driver(sweep, out, cluster, actor_class, install=True)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def measured_by_both():
        if process.poll() is not None:
            raise AssertionError("the sweep ended before the kill: "
                                 + process.stderr.read().decode()[-3000:])
        return all(log.exists() and any("actor_pid" in r for r in records.read_records(log))
                   for log in logs.values())

    try:
        _wait_for(measured_by_both, 240, "a measurement of each kind")
        process.send_signal(signal.SIGKILL)
        started = process.communicate(timeout=30)[0].decode()
    finally:
        if process.poll() is None:
            process.kill()
    assert ("ray: 2 actors on 1 host(s), 2 device kinds: cpu-one 1 actor on 1 host, "
            "cpu-two 1 actor on 1 host") in started
    before = {kind: {r["id"]: r for r in log_lines(out / kind)} for kind in kinds}
    manifest = json.loads((out / records.KINDS_FILE).read_text())
    unfinished = [k for k in kinds if manifest["kinds"][k]["finished"] is None]
    assert unfinished, "both kinds finished before the kill; make the sweep longer"

    # This host's own device is none of the kinds: nothing to resume here, and it says why.
    with pytest.raises(runner.SweepError, match=r"unfinished runs are for \['cpu-"):
        runner.resume_sweep(out, echo=lambda line: None)
    echoed = []
    resume_backend = BackendChoice("ray", workers=2,
                                   actor_class=ray_kinds.measurer_reporting(kinds, slots))
    runner.resume_sweep(out, echo=echoed.append, backend=resume_backend)
    assert f"resuming {', '.join(unfinished)} in {out}" in echoed
    expected = expected_round0_ids(sweep)
    for kind in kinds:
        run_dir = out / kind
        lines = assert_each_once(run_dir)
        after = {r["id"]: r for r in lines}
        assert before[kind].items() <= after.items()
        assert set(after) == expected
        assert {r["status"] for r in lines} == {"ok"}
        assert {r["measured_on"] for r in lines} == {kind}
        assert {r["device_kind"] for r in lines} == {kind}
        environment = json.loads((run_dir / records.ENVIRONMENT_FILE).read_text())
        assert environment["device_kind"] == kind
        assert environment["backend"] == {"name": "ray", "actors": 1, "hosts": 1}
        table = read_table(run_dir / records.TABLE_FILE)
        assert table.entries and {e.key["device_kind"] for e in table.entries} == {kind}
        installed = read_table(Path(os.environ["XDG_DATA_HOME"]) / "attnbench" / "tuned"
                               / f"{kind}.json")
        assert installed.entries == table.entries
    manifest = json.loads((out / records.KINDS_FILE).read_text())
    assert all(manifest["kinds"][k]["finished"] for k in kinds)
    # Finished: a resume opens no session and measures nothing.
    echoed.clear()
    runner.resume_sweep(out, echo=echoed.append, backend=resume_backend)
    assert echoed == [f"every device kind's run in {out} is finished (cpu-one, cpu-two); "
                      "nothing to resume"]
    with pytest.raises(ReportError, match="one run folder per device kind"):
        load_run(out)
    one_kind = load_run(out / "cpu-two")
    assert not one_kind.unfinished and {w.key["device_kind"] for w in one_kind.winners} == {
        "cpu-two"}


def test_backend_choice_names_its_argument():
    with pytest.raises(runner.SweepError, match="--backend"):
        BackendChoice("slurm")
    with pytest.raises(runner.SweepError, match="--address and --workers need --backend ray"):
        BackendChoice("local", workers=2)
    with pytest.raises(runner.SweepError, match="--workers must be at least 1"):
        BackendChoice("ray", workers=0)
    with pytest.raises(runner.SweepError, match="actor_class .* needs --backend ray"):
        BackendChoice("local", actor_class=ray_kinds.measurer_reporting(("cpu",), "/tmp"))
    with pytest.raises(runner.SweepError, match="actor_class must be ray_backend.Measurer"):
        RaySession(BackendChoice("ray", actor_class=dict), print)
