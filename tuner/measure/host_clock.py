"""Turns at a CPU host's clock for measuring processes that share its cores.

Any number of processes may work at once (build inputs, compile, check an output), but a
process that times does so alone: a kernel timed while another process compiles on its
cores would be timed on part of the machine. Compiles still overlap each other, and a
waiting timer goes next (new work waits behind it), so timing is never starved.
"""

from __future__ import annotations

import contextlib


class HostClock:
    """The host's shared lock, or no lock at all (`path` None: this process is the host's
    only measuring process). An OS-level lock: a process killed while holding it (timeout,
    crash) releases it with its death."""

    def __init__(self, path: str | None):
        self.path = path
        self._lock = None
        if path is not None:
            import filelock

            self._lock = filelock.ReadWriteLock(path, is_singleton=False)

    def working(self):
        """Held while preparing a problem, compiling and checking: shared with other work."""
        return self._lock.read_lock() if self._lock else contextlib.nullcontext()

    def timing(self):
        """Held while the clock runs: no other process works or times meanwhile."""
        return self._lock.write_lock() if self._lock else contextlib.nullcontext()
