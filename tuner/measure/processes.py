"""The processes that touch the accelerator: a short-lived probe and one worker per problem.

The sweep's parent process never initializes a JAX backend (on a TPU only one process may
hold the chips); everything device-side runs in spawned children that die with the parent.
A config that hangs its worker is a `timeout`, one that kills it is `crashed`.
"""

from __future__ import annotations

import multiprocessing
import signal
from typing import Any

from ..errors import SweepError
from . import worker


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

    def __init__(self, problem, seed: int, tolerance: float,
                 bandwidth: float | None, clock_path: str | None = None):
        self.connection, child = _context().Pipe()
        self.process = _context().Process(
            target=worker.serve,
            args=(child, problem.problem, seed, tolerance, bandwidth, clock_path), daemon=True)
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


