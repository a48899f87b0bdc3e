"""Where a sweep's measurements run: in worker processes of this host one at a time (local),
or on the actors of a Ray cluster, one per accelerator (ray). Either way the driver alone
appends to the run's measurement log, so resume works the same after either."""

from __future__ import annotations

import dataclasses
from typing import Any

from ..errors import SweepError

BACKENDS = ("local", "ray")


@dataclasses.dataclass(frozen=True)
class BackendChoice:
    """The backend and its settings, as `attnbench sweep --backend/--address/--workers`."""

    name: str = "local"
    # Ray only: "auto", HOST:PORT, or None for a Ray instance started on this host.
    address: str | None = None
    # Ray only: how many actors at most (on a CPU-only cluster, how many CPU actors).
    workers: int | None = None
    # Ray only: the actors' body, `ray_backend.Measurer` or a subclass of it (None: Measurer).
    # A subclass can report a device kind of its own from `probe`, which is how the tests
    # make a cluster of CPU actors look like one of several device kinds.
    actor_class: Any = None

    def __post_init__(self):
        if self.name not in BACKENDS:
            raise SweepError(f"--backend must be one of {list(BACKENDS)}, got {self.name!r}")
        if self.name == "local" and (self.address is not None or self.workers is not None):
            raise SweepError("--address and --workers need --backend ray")
        if self.name == "local" and self.actor_class is not None:
            raise SweepError("actor_class is the Ray actors' body; it needs --backend ray")
        if self.workers is not None and self.workers < 1:
            raise SweepError(f"--workers must be at least 1, got {self.workers}")
        if self.address is not None and not self.address.strip():
            raise SweepError("--address must be 'auto' or HOST:PORT, got an empty string")


LOCAL = BackendChoice()


def open_session(choice: BackendChoice, echo):
    """The backend's session: `with` it, then `probe` the devices (one environment per
    device kind it found) and `run` each kind's plans."""
    if choice.name == "ray":
        from .ray_backend import RaySession

        return RaySession(choice, echo)
    from .local import LocalSession

    return LocalSession()
