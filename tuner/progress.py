"""The sweep's progress: configs done, failures, time elapsed and left (rich).

On a terminal it is one live bar; elsewhere (CI logs, files) a plain line every few seconds,
so a log shows the sweep moving without a carriage-return mess.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)

_PLAIN_EVERY_S = 5.0
_COUNTED_AS_FINE = ("ok", "skipped", "skipped_static")


class SweepProgress:
    """Counts finished configs; the total can grow (later halving rounds join as they start)."""

    def __init__(self, total: int, done: int, stream=None):
        self.console = Console(file=stream or sys.stderr, highlight=False)
        self.failures = 0
        self.done = done
        self.total = total
        self._last_plain = 0.0
        self._began = time.monotonic()
        self._bar: Progress | None = None
        if self.console.is_terminal:
            self._bar = Progress(
                BarColumn(), MofNCompleteColumn(), TextColumn("configs, {task.fields[failed]} failed"),
                TimeElapsedColumn(), TextColumn("~"), TimeRemainingColumn(),
                TextColumn("| {task.description}"), console=self.console, transient=False)
            self._task = self._bar.add_task("", total=total, completed=done, failed=0)
            self._bar.start()

    def grow(self, extra: int) -> None:
        self.total += extra
        if self._bar is not None:
            self._bar.update(self._task, total=self.total)

    def step(self, record: dict[str, Any], label: str) -> None:
        self.done += 1
        if record["status"] not in _COUNTED_AS_FINE:
            self.failures += 1
        self.show(f"{label} {record['variant']}: {record['status']}")

    def show(self, what: str, force: bool = False) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done, failed=self.failures,
                             description=what[:80])
            return
        now = time.monotonic()
        if force or now - self._last_plain > _PLAIN_EVERY_S:
            elapsed = int(now - self._began)
            self.console.print(f"{self.done}/{self.total} configs, {self.failures} failed, "
                               f"{elapsed // 60}:{elapsed % 60:02d} elapsed | {what}",
                               soft_wrap=True, markup=False)
            self._last_plain = now

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
