"""A Ray actor body for the Ray backend's tests: CPU actors of this one host made to report
devices of several kinds, so a sweep over a mixed cluster can run where there is only a CPU.

The production backend takes the class through `BackendChoice(actor_class=...)`; nothing in
it knows about this module.
"""

from __future__ import annotations

import fcntl
import os
import time

from attnbench.tuner.backends.ray_backend import Measurer

# How long a new actor waits for a kind to be free (the actors of a killed driver go first).
_SLOT_WAIT_S = 120.0


def measurer_reporting(kinds: tuple[str, ...], slot_folder: str) -> type[Measurer]:
    """A Measurer whose actor reports `kinds[i]` as its device kind, `i` being the first slot
    (a lock file in `slot_folder`) that no live actor holds. At most `len(kinds)` actors of it
    live at once report the kinds one each, however many actors came and went before them.
    Each record it measures names the kind it reported (`measured_on`)."""

    class KindReporting(Measurer):
        def probe(self, measure_bandwidth):
            environment = super().probe(measure_bandwidth)
            if not hasattr(self, "kind"):
                self.slot_lock, self.kind = _take_slot(slot_folder, kinds)
            return {**environment, "device_kind": self.kind,
                    "device_kind_raw": f"test device {self.kind}"}

        def measure(self, job):
            return [{**record, "measured_on": self.kind} for record in super().measure(job)]

    return KindReporting


def _take_slot(folder: str, kinds: tuple[str, ...]):
    """(the open lock file, which the actor keeps until it dies; its kind)."""
    os.makedirs(folder, exist_ok=True)
    deadline = time.monotonic() + _SLOT_WAIT_S
    while True:
        for index, kind in enumerate(kinds):
            handle = open(os.path.join(folder, f"slot-{index}.lock"), "w")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return handle, kind
            except BlockingIOError:
                handle.close()
        if time.monotonic() > deadline:
            raise RuntimeError(f"every kind of {kinds} is held by a live actor")
        time.sleep(0.05)
