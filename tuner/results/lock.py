"""One process at a time per run folder: an exclusive lock that says who holds it.

Two sweeps appending to one log would measure everything twice and race on the table. The
lock is an OS file lock (released by the kernel when its holder dies, even by kill -9), so a
stale lock never blocks a resume; beside it a small file names the holder (pid, host,
command) for the message a second process gets.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import filelock

from ..errors import SweepError

LOCK_FILE = ".lock"
HOLDER_FILE = ".lock.holder"


def _holder_text(run_dir: Path) -> str:
    try:
        holder = json.loads((run_dir / HOLDER_FILE).read_text())
        return f"pid {holder['pid']} on {holder['host']} ({holder['command']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


class RunFolderLock:
    """`with RunFolderLock(run_dir):` owns the folder or raises SweepError naming the holder."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        # filelock truncates the lock file on every attempt, so the holder lives apart.
        self._lock = filelock.FileLock(str(self.run_dir / LOCK_FILE), timeout=0)

    def __enter__(self) -> RunFolderLock:
        try:
            self._lock.acquire()
        except filelock.Timeout:
            raise SweepError(
                f"{self.run_dir} is in use by {_holder_text(self.run_dir)}; wait for it to "
                f"finish (or stop it), then run the command again") from None
        holder = {"pid": os.getpid(), "host": socket.gethostname(),
                  "command": " ".join(["attnbench", *sys.argv[1:]])[:200]}
        (self.run_dir / HOLDER_FILE).write_text(json.dumps(holder) + "\n")
        return self

    def __exit__(self, *exc) -> None:
        try:
            (self.run_dir / HOLDER_FILE).unlink(missing_ok=True)
        finally:
            self._lock.release()
