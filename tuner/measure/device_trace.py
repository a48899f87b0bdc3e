"""Per-execution device time of one compiled call, read from a profiler trace.

`jax.profiler.trace(..., create_perfetto_trace=True)` writes the trace as gzipped Chrome
trace-event JSON: metadata events (``ph: "M"``) name each process and thread, complete
events (``ph: "X"``) carry ``ts``/``dur`` in microseconds and the HLO stats in ``args``.
Where a call's time is found, by layout:

- TPU (and GPU traces that carry the derived lines): processes named ``/device:TPU:0`` or
  ``/device:GPU:0`` have a thread ``XLA Modules`` with one event per execution of a module,
  named ``<module>`` or ``<module>(<program id>)``.
- GPU: kernel events on the device process's stream threads, each with ``args.hlo_module``;
  an execution is the span from its first kernel's start to its last kernel's end.
- CPU: XLA:CPU (compiled with ``xla_cpu_enable_xprof_traceme``) puts its thunks' events on
  the ``/host:CPU`` process with ``hlo_module`` and a ``run_id`` per execution.

Events of other modules (the cache flush between timed calls) and host-side events of the
call (dispatch) are left out. The number of executions found must equal the number made. Only processes of the call's
platform are read: a CPU host may also list compile-only TPU devices.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

MODULE_LINE = "XLA Modules"


class DeviceTraceError(RuntimeError):
    """The trace does not hold exactly the executions that were made."""


def load_trace(folder: str | Path) -> list[dict[str, Any]]:
    """The trace events of the one trace `jax.profiler.trace` wrote under `folder`."""
    folder = Path(folder)
    files = sorted(folder.rglob("perfetto_trace.json.gz")) or sorted(folder.rglob("*.trace.json.gz"))
    if not files:
        raise DeviceTraceError(f"the profiler wrote no JSON trace under {folder} "
                               f"(found: {sorted(p.name for p in folder.rglob('*') if p.is_file())})")
    with gzip.open(files[-1], "rt") as file:
        data = json.load(file)
    return data["traceEvents"] if isinstance(data, dict) else data


def _names(events: Iterable[dict]) -> tuple[dict[Any, str], dict[tuple, str]]:
    processes, threads = {}, {}
    for event in events:
        if event.get("ph") != "M":
            continue
        name = str(event.get("args", {}).get("name", ""))
        if event.get("name") == "process_name":
            processes[event.get("pid")] = name
        elif event.get("name") == "thread_name":
            threads[(event.get("pid"), event.get("tid"))] = name
    return processes, threads


def _is_module_event(name: str, module: str) -> bool:
    return name == module or name.startswith(module + "(")


def _span_us(group: list[dict]) -> float:
    start = min(float(e["ts"]) for e in group)
    return max(float(e["ts"]) + float(e.get("dur", 0.0)) for e in group) - start


_PROCESS_PREFIX = {"gpu": "/device:GPU", "tpu": "/device:TPU", "cpu": "/host:CPU"}


def execution_times_us(events: list[dict[str, Any]], module: str, expected: int,
                       platform: str = "cpu") -> tuple[list[float], str]:
    """Device microseconds of each of the `expected` executions of HLO module `module` on
    `platform` ('cpu', 'gpu' or 'tpu'), in order, and which layout held them ('module line',
    'device kernels' or 'host thunks').

    Raises DeviceTraceError when the trace holds another number of executions.
    """
    if platform not in _PROCESS_PREFIX:
        raise ValueError(f"platform must be one of {sorted(_PROCESS_PREFIX)}, got {platform!r}")
    processes, threads = _names(events)
    complete = [e for e in events if e.get("ph") == "X" and "ts" in e]
    # A process may hold other platforms' devices too (compile-only TPU devices on a CPU
    # host): only the call's platform counts.
    prefix = _PROCESS_PREFIX[platform]
    pids = {pid for pid, name in processes.items() if name.startswith(prefix)}
    device_pids = pids if platform != "cpu" else set()

    on_module_line = [e for e in complete if e.get("pid") in device_pids
                      and threads.get((e.get("pid"), e.get("tid"))) == MODULE_LINE
                      and _is_module_event(str(e.get("name", "")), module)]
    if on_module_line:
        times = [float(e.get("dur", 0.0)) for e in sorted(on_module_line, key=lambda e: e["ts"])]
        return _checked(times, expected, module, "module line"), "module line"

    layout = "host thunks" if platform == "cpu" else "device kernels"
    ops = [e for e in complete if e.get("pid") in pids
           and e.get("args", {}).get("hlo_module") == module]
    if not ops:
        raise DeviceTraceError(f"the trace holds no events of module {module!r} on a "
                               f"{prefix} process")
    ops.sort(key=lambda e: float(e["ts"]))
    if all("run_id" in e.get("args", {}) for e in ops):
        groups: dict[str, list[dict]] = {}
        for event in ops:
            groups.setdefault(str(event["args"]["run_id"]), []).append(event)
        runs = sorted(groups.values(), key=lambda g: min(float(e["ts"]) for e in g))
    else:
        # Every execution of one module launches the same kernels: cut the sorted list
        # into equal consecutive groups.
        if len(ops) % expected:
            raise DeviceTraceError(f"{len(ops)} kernel events of module {module!r} do not "
                                   f"divide into {expected} executions")
        size = len(ops) // expected
        runs = [ops[i * size:(i + 1) * size] for i in range(expected)]
    return _checked([_span_us(run) for run in runs], expected, module, layout), layout


def _checked(times: list[float], expected: int, module: str, layout: str) -> list[float]:
    if len(times) != expected:
        raise DeviceTraceError(f"the trace holds {len(times)} executions of module {module!r} "
                               f"({layout}), but {expected} were made")
    if any(t <= 0 for t in times):
        raise DeviceTraceError(f"an execution of module {module!r} has no duration in the trace")
    return times
