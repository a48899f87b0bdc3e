"""The Ray backend: one actor per accelerator of a Ray cluster, the driver the only writer.

    driver: plan -> batches of (problem, configs) --> actors (ray.wait: as they finish)
                 <-- records, appended to the fsynced log by the driver alone
    actor:  a worker process per problem (today's isolation), replaced when it dies

GPU actors hold one GPU each, a TPU actor all the chips of its host; a cluster without
accelerators gets CPU actors (one CPU each). Actors report their device kind; only those of
a kind the sweep is for get work, and each kind's problems go to that kind's actors only.
A sweep matching several kinds runs one lane per kind through the same driver loop, all at
once (each lane into its own run folder and log), so no matched accelerator waits for
another kind to finish; a lane whose records are all in is finished (table, install) while
the others go on. A batch holds configs of one problem, and an actor keeps its worker (the
problem's inputs and reference) for the next batch of the same problem, which it is given
first. A halving round of a problem opens when the driver has its previous round's records,
whichever actors of its kind measured them.

CPU actors of one host share its cores, so their workers share a lock in the host's temp
folder (see measure.host_clock): they prepare, compile and check at the same time, but one
times alone. The lock is per host: actors on other hosts time on other CPUs, and a GPU or
TPU actor times its own device, so they take none.

Failures: a config whose worker dies is measured again once on a fresh worker (the death may
come from outside, e.g. memory taken by another actor) and recorded `crashed` if it kills that
one too. An actor that dies (or its node) has its batch queued again once; a config that was
in flight when two actors died is recorded `crashed`. A replacement that comes up on a
device of another kind (the freed GPU went elsewhere) works for that kind's lane, or is let
go when no lane wants it.
"""

from __future__ import annotations

import dataclasses
import math
import os
import socket
import tempfile
from collections.abc import Callable
from typing import Any

from ..errors import SweepError
from ..measure import processes, worker
from ..plan import space
from ..plan.planning import ProblemPlan
from ..plan.sweep_file import SweepProblem
from ..progress import SweepProgress
from . import BackendChoice
from .state import Echo, KindRun, RunState, base_record

# Configs per batch at most: a batch's records come back together, so a driver killed
# mid-batch loses (and measures again on resume) at most this many.
_MAX_BATCH = 4
# How long a replacement for a dead actor may take to start and probe its device.
_REPLACEMENT_WAIT_S = 300.0
# An object store only big enough for the small messages this backend sends.
_LOCAL_OBJECT_STORE_BYTES = 128 * 1024 * 1024


def _import_ray():
    try:
        import ray
    except ImportError:
        raise SweepError("--backend ray needs Ray, which is not installed: "
                         "pip install 'attnbench[ray]'") from None
    return ray


def host_clock_path() -> str:
    """The lock CPU actors of this host share (one per host: its temp folder)."""
    return os.path.join(tempfile.gettempdir(), f"attnbench-clock-{socket.gethostname()}.db")


@dataclasses.dataclass(frozen=True)
class Job:
    """One batch for an actor: configs of one problem, with what its worker needs."""

    problem_id: str
    problem: SweepProblem
    seed: int
    tolerance: float
    bandwidth: float | None
    setup_timeout_s: float
    timeout_s: float
    tasks: tuple[worker.Task, ...]


class Measurer:
    """A Ray actor's body: measures jobs in worker processes it starts and replaces."""

    def __init__(self):
        self.current: processes.Worker | None = None
        self.problem_id: str | None = None
        self.setup_failure: str | None = None
        self.clock_path: str | None = None

    def probe(self, measure_bandwidth: bool) -> dict[str, Any]:
        import ray

        environment = processes.probe_environment(measure_bandwidth)
        # Only CPU timers share a clock with their neighbours on the host.
        self.clock_path = host_clock_path() if environment["platform"] == "cpu" else None
        environment["ray_node"] = ray.get_runtime_context().get_node_id()
        environment["actor_pid"] = os.getpid()
        return environment

    def measure(self, job: Job) -> list[dict[str, Any]]:
        if job.problem_id != self.problem_id:
            self._stop()
            self.problem_id, self.setup_failure = job.problem_id, None
        # Which actor measured it: its worker's pid alone is ambiguous across hosts.
        return [{**self._measure_one(job, task), "actor_pid": os.getpid(),
                 "host": socket.gethostname()}
                for task in job.tasks]

    def _measure_one(self, job: Job, task: worker.Task) -> dict[str, Any]:
        first: dict[str, Any] | None = None
        while True:
            if self.setup_failure is None and (self.current is None or not self.current.alive):
                self.current = processes.Worker(job.problem, job.seed, job.tolerance,
                                                job.bandwidth, self.clock_path)
                self.setup_failure = self.current.wait_ready(job.setup_timeout_s)
            if self.setup_failure:
                return {"status": "crashed", "reason": self.setup_failure}
            result = {"worker_pid": self.current.process.pid,
                      **self.current.measure(task, job.timeout_s)}
            if result.get("status") != "crashed":
                if first is not None:
                    result["retried_after"] = first["reason"]
                return result
            if first is not None:
                return {**result, "reason": f"killed its worker process twice: "
                                            f"{first['reason']}; then {result['reason']}"}
            first = result

    def _stop(self) -> None:
        if self.current is not None:
            self.current.stop()
            self.current = None


@dataclasses.dataclass
class _Batch:
    item: ProblemPlan
    round_index: int
    records: list[dict[str, Any]]  # base records, completed by the results
    tasks: list[worker.Task]


@dataclasses.dataclass
class _ProblemState:
    item: ProblemPlan
    round_index: int = -1
    candidates: list = dataclasses.field(default_factory=list)
    outstanding: int = 0  # batches of the open round not yet recorded


@dataclasses.dataclass(eq=False)  # actors are told apart by identity
class _Actor:
    handle: Any
    options: dict[str, Any]
    environment: dict[str, Any] | None = None
    problem_id: str | None = None  # the problem whose worker it holds

    @property
    def kind(self) -> str:
        return self.environment["device_kind"]


@dataclasses.dataclass(eq=False)
class _Lane:
    """One device kind's run inside the driver loop: its problems and queued batches.
    Problem and measurement ids are the same for every kind, so all of this is per lane."""

    work: KindRun
    label_prefix: str  # the kind, when several share the progress display
    problems: dict[str, _ProblemState]
    queue: list[_Batch] = dataclasses.field(default_factory=list)
    lost_once: set[str] = dataclasses.field(default_factory=set)
    in_flight: int = 0
    finished: bool = False

    @property
    def kind(self) -> str:
        return self.work.kind

    @property
    def state(self) -> RunState:
        return self.work.state

    def label(self, batch: _Batch) -> str:
        return self.label_prefix + batch.item.problem.label


class RaySession:
    """A connection to a Ray cluster (or a Ray instance it starts) and its actors. A Ray
    already initialized in this process (by the caller) is used as it is."""

    def __init__(self, choice: BackendChoice, echo: Echo):
        self.choice, self.echo = choice, echo
        self.ray = _import_ray()
        self.actor_class = choice.actor_class or Measurer
        if not (isinstance(self.actor_class, type) and issubclass(self.actor_class, Measurer)):
            raise SweepError(f"actor_class must be ray_backend.Measurer or a subclass of it, "
                             f"got {self.actor_class!r}")
        self.started_ray = False
        self.actors: list[_Actor] = []
        self.kinds: set[str] = set()  # the kinds kept by probe: what replacements may be
        self.replacements_left = 0

    # ---- Cluster and actors ------------------------------------------------------------

    def __enter__(self) -> RaySession:
        ray = self.ray
        if not ray.is_initialized():
            if self.choice.address is None:
                ray.init(include_dashboard=False, log_to_driver=False,
                         object_store_memory=_LOCAL_OBJECT_STORE_BYTES)
            else:
                ray.init(address=self.choice.address, log_to_driver=False)
            self.started_ray = True
        try:
            self.actors = [self._new_actor(options) for options in self._actor_layout()]
            self.replacements_left = len(self.actors)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        for actor in self.actors:
            try:
                self.ray.kill(actor.handle)
            except Exception:  # noqa: BLE001 -- already gone
                pass
        self.actors = []
        if self.started_ray:
            self.ray.shutdown()

    def _actor_layout(self) -> list[dict[str, Any]]:
        """Ray options of each actor: one per GPU and one per TPU host (a cluster may hold
        both; probe keeps the kinds the sweep is for), else CPU actors."""
        ray = self.ray
        resources = ray.cluster_resources()
        workers = self.choice.workers
        gpus = int(resources.get("GPU", 0))
        tpu_nodes = [n for n in ray.nodes() if n.get("Alive") and n["Resources"].get("TPU")]
        layout: list[dict[str, Any]] = [{"num_gpus": 1, "num_cpus": 0}] * gpus
        if tpu_nodes:
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            layout += [{"num_cpus": 0, "resources": {"TPU": node["Resources"]["TPU"]},
                        "scheduling_strategy": NodeAffinitySchedulingStrategy(node["NodeID"],
                                                                              soft=False)}
                       for node in tpu_nodes]
        if not layout:
            cpus = int(resources.get("CPU", 0))
            if workers is not None and workers > cpus:
                raise SweepError(f"--workers {workers} CPU actors need {workers} CPUs, but the "
                                 f"Ray cluster has {cpus}")
            layout = [{"num_cpus": 1}] * (workers or max(cpus, 1))
        return layout[:workers] if workers is not None else layout

    def _new_actor(self, options: dict[str, Any]) -> _Actor:
        handle = self.ray.remote(self.actor_class).options(**options).remote()
        return _Actor(handle, options)

    def probe(self, wanted, measure_bandwidth: bool) -> list[dict[str, Any]]:
        """One environment per device kind among the actors whose device
        `wanted(kind, raw_kind)` accepts (sorted by kind); the other actors are let go.
        Raises SweepError when no actor is wanted."""
        ray = self.ray
        found = ray.get([a.handle.probe.remote(False) for a in self.actors])
        for actor, environment in zip(self.actors, found):
            actor.environment = environment
        keep = [a for a in self.actors if wanted(a.kind, a.environment["device_kind_raw"])]
        if not keep:
            raise SweepError(f"no Ray actor has a device this sweep is for; the actors' "
                             f"devices are {sorted({e['device_kind'] for e in found})}")
        for actor in self.actors:
            if actor not in keep:
                ray.kill(actor.handle)
        self.actors = keep
        self.kinds = {a.kind for a in keep}
        environments = []
        for kind in sorted(self.kinds):
            actors = [a for a in keep if a.kind == kind]
            environment = dict(actors[0].environment)
            if measure_bandwidth:
                # One kind after another, so two measurements never share a host's memory.
                environment = ray.get(actors[0].handle.probe.remote(True))
            environment["backend"] = {
                "name": "ray", "actors": len(actors),
                "hosts": len({a.environment["ray_node"] for a in actors})}
            environments.append(environment)
        hosts = len({a.environment["ray_node"] for a in keep})
        if len(environments) == 1:
            self.echo(f"ray: {len(keep)} actors on {hosts} host(s), device "
                      f"{environments[0]['device_kind']}")
        else:
            shares = ", ".join(
                f"{e['device_kind']} {_count(e['backend']['actors'], 'actor')} on "
                f"{_count(e['backend']['hosts'], 'host')}" for e in environments)
            self.echo(f"ray: {len(keep)} actors on {hosts} host(s), {len(environments)} device "
                      f"kinds: {shares}; each kind runs its own share of the sweep on its own "
                      "actors, all kinds at once")
        return environments

    def _replace(self, lost: _Actor) -> None:
        self.actors.remove(lost)
        if self.replacements_left <= 0:
            return
        self.replacements_left -= 1
        actor = self._new_actor(lost.options)
        try:
            # Bounded: a node that died takes its resources along, and the replacement
            # would wait for them forever.
            actor.environment = self.ray.get(actor.handle.probe.remote(False),
                                             timeout=_REPLACEMENT_WAIT_S)
        except (self.ray.exceptions.RayError, TimeoutError) as error:
            self.echo(f"\nray: no replacement actor: {str(error).splitlines()[0]}")
            self.ray.kill(actor.handle)
            return
        if actor.kind not in self.kinds:
            self.echo(f"\nray: the replacement actor came up on a {actor.kind} device, which "
                      f"this sweep is not measuring; let go")
            self.ray.kill(actor.handle)
            return
        self.actors.append(actor)

    def _let_go(self, kind: str) -> None:
        for actor in [a for a in self.actors if a.kind == kind]:
            self.ray.kill(actor.handle)
            self.actors.remove(actor)
        self.kinds.discard(kind)

    # ---- Running -----------------------------------------------------------------------

    def run(self, runs: list[KindRun], progress: SweepProgress,
            finished: Callable[[KindRun], None] | None = None) -> None:
        """Measures every kind's plans on the actors of its kind, all kinds at once; calls
        `finished` for a kind as soon as its last record is in the log."""
        ray = self.ray
        prefix = len(runs) > 1
        lanes = {}
        for work in runs:
            problems = {space.problem_id(item.problem): _ProblemState(item)
                        for item in work.plans}
            lanes[work.kind] = _Lane(work, f"{work.kind} " if prefix else "", problems)
        for lane in lanes.values():
            for problem in lane.problems.values():
                lane.state.record_skips(problem.item, progress)
                self._open_next_round(lane, problem, progress)
        in_flight: dict[Any, tuple[_Actor, _Lane, _Batch]] = {}
        idle = list(self.actors)
        # Batches still out when this ends (an error, ^C) go with their actors, which the
        # session kills; their configs are not in the log, so a resume measures them.
        while True:
            for lane in lanes.values():
                if not lane.finished and not lane.queue and not lane.in_flight:
                    lane.finished = True
                    # Its actors have nothing left to measure: free their devices.
                    idle = [a for a in idle if a.kind != lane.kind]
                    self._let_go(lane.kind)
                    if finished is not None:
                        finished(lane.work)
            for actor in list(idle):
                lane = lanes.get(actor.kind)
                if lane is None or not lane.queue:
                    continue
                idle.remove(actor)
                batch = _pick(lane.queue, actor.problem_id,
                              {a.problem_id for a in self.actors
                               if a is not actor and a.kind == actor.kind})
                actor.problem_id = space.problem_id(batch.item.problem)
                lane.in_flight += 1
                in_flight[actor.handle.measure.remote(self._job(lane.state, batch))] = (
                    actor, lane, batch)
            if not in_flight:
                break
            (ref,), _ = ray.wait(list(in_flight), num_returns=1)
            actor, lane, batch = in_flight.pop(ref)
            lane.in_flight -= 1
            problem = lane.problems[space.problem_id(batch.item.problem)]
            try:
                results = ray.get(ref)
            except ray.exceptions.RayActorError as error:
                self.echo(f"\nray: an actor died measuring {lane.label(batch)}: "
                          f"{str(error).splitlines()[0]}")
                again = self._after_lost(lane, batch, error, progress)
                self._replace(actor)
                busy = [a for a, _, _ in in_flight.values()]
                idle = [a for a in self.actors if all(a is not b for b in busy)]
                if again is not None:
                    lane.queue.insert(0, again)
                    continue
            else:
                idle.append(actor)
                for record, result in zip(batch.records, results):
                    record.update(result)
                    lane.state.record(record, progress, lane.label(batch))
            problem.outstanding -= 1
            if problem.outstanding == 0:
                self._open_next_round(lane, problem, progress)
        stranded = sorted(lane.kind for lane in lanes.values() if not lane.finished)
        if stranded:
            raise SweepError(f"every Ray actor of device kind {', '.join(stranded)} died; "
                             "continue with --resume on a healthy cluster")

    def _after_lost(self, lane: _Lane, batch: _Batch, error,
                    progress: SweepProgress) -> _Batch | None:
        """Queues a lost batch again once; configs lost twice are recorded `crashed`."""
        keep_records, keep_tasks = [], []
        for record, task in zip(batch.records, batch.tasks):
            if record["id"] in lane.lost_once:
                record.update(status="crashed", reason=f"two Ray actors died measuring it; "
                                                       f"the last: {str(error).splitlines()[0]}")
                lane.state.record(record, progress, lane.label(batch))
            else:
                lane.lost_once.add(record["id"])
                keep_records.append(record)
                keep_tasks.append(task)
        if not keep_records:
            return None
        return dataclasses.replace(batch, records=keep_records, tasks=keep_tasks)

    def _job(self, state: RunState, batch: _Batch) -> Job:
        timing = state.spec.timing
        item = batch.item
        return Job(space.problem_id(item.problem), item.problem, item.seed,
                   state.tolerance(item), state.environment.get("read_bandwidth_bytes_per_s"),
                   timing.setup_timeout_s, timing.timeout_s, tuple(batch.tasks))

    def _open_next_round(self, lane: _Lane, problem: _ProblemState,
                         progress: SweepProgress) -> None:
        """Queues the batches of the problem's next round with work left (none: it is done)."""
        state = lane.state
        spec, timing = state.spec, state.spec.timing
        while problem.round_index + 1 < space.round_count(spec.search):
            problem.round_index += 1
            index = problem.round_index
            problem.candidates = state.round_candidates(problem.item, index, problem.candidates)
            repeats = space.round_repeats(spec.search, timing, index)
            todo = []
            for candidate in problem.candidates:
                record = base_record(state.run, problem.item, candidate, index, repeats)
                if record["id"] not in state.done:
                    task = worker.Task(worker.VariantRef.of(candidate.variant), candidate.config,
                                       timing.warmup, repeats, timing.max_seconds,
                                       timer=timing.timer, cache=timing.cache)
                    todo.append((record, task))
            if index > 0:
                progress.grow(len(todo))
            if not todo:
                continue
            actors = sum(1 for a in self.actors if a.kind == lane.kind)
            size = max(1, min(_MAX_BATCH, math.ceil(len(todo) / (2 * max(actors, 1)))))
            for start in range(0, len(todo), size):
                chunk = todo[start:start + size]
                lane.queue.append(_Batch(problem.item, index, [r for r, _ in chunk],
                                         [t for _, t in chunk]))
                problem.outstanding += 1
            return


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" + ("" if number == 1 else "s")


def _pick(queue: list[_Batch], held: str | None, held_elsewhere: set[str]) -> _Batch:
    """The batch for an idle actor: of the problem it holds a worker for, else of a problem
    no actor holds (its inputs get built in parallel with the others'), else the first."""
    for wanted in (lambda p: p == held, lambda p: p not in held_elsewhere, lambda p: True):
        for index, batch in enumerate(queue):
            if wanted(space.problem_id(batch.item.problem)):
                return queue.pop(index)
    raise AssertionError("an empty queue")
