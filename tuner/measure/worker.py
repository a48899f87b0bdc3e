"""The measuring process: one per problem, so a kernel that hangs or crashes cannot take the
sweep down (the runner stops it on a timeout, records `timeout` or `crashed`, and starts a
fresh one).

A worker draws the problem's inputs once, computes the float32 reference once, then takes
configs one at a time: ahead-of-time compile (timed), one run checked against the reference,
then timing with the compile excluded. Every outcome is a record, never an exception.
The parent never touches the accelerator itself (on a TPU only one process may hold it);
even the device kind comes from a short-lived worker (:func:`probe`).
"""

from __future__ import annotations

import dataclasses
import os
import platform as host_platform
import sys
import threading
import time
import traceback
from typing import Any

from .host_clock import HostClock

_MESSAGE_LIMIT = 2000


def _die_with_parent() -> None:
    """Exit as soon as the parent process is gone (it may have been killed with SIGKILL)."""
    try:  # Linux: have the kernel send SIGKILL when the parent dies.
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _versions() -> dict[str, str]:
    from importlib import metadata

    versions = {"python": sys.version.split()[0]}
    for package in ("attnbench", "jax", "jaxlib", "numpy", "jax-triton", "triton", "libtpu",
                    "jax-cuda12-plugin"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return versions


def probe(connection, measure_bandwidth: bool) -> None:
    """Worker entry: sends the environment (device, versions, read bandwidth) and exits."""
    _die_with_parent()
    try:
        import jax

        from attnbench.kernels.platform import current_platform, normalize_device_kind

        device = jax.devices()[0]
        environment: dict[str, Any] = {
            "device_kind": normalize_device_kind(device.device_kind),
            "device_kind_raw": device.device_kind,
            "platform": current_platform(),
            "device_count": jax.device_count(),
            "host": host_platform.node(),
            "cpu_count": os.cpu_count(),
            "versions": _versions(),
        }
        if measure_bandwidth:
            from . import roofline

            environment["read_bandwidth_bytes_per_s"] = roofline.read_bandwidth()
        connection.send(("ok", environment))
    except Exception:  # noqa: BLE001 -- the parent reports it
        connection.send(("error", traceback.format_exc()[-_MESSAGE_LIMIT:]))
    connection.close()


@dataclasses.dataclass(frozen=True)
class VariantRef:
    """How a worker finds a variant: by op and name in the registry, or else among the
    `Variant` objects of the module that defines its kernel (a variant registered only by a
    test, which a fresh process's registry does not hold)."""

    op: str
    name: str
    module: str

    @classmethod
    def of(cls, variant) -> VariantRef:
        return cls(variant.op, variant.name, variant.kernel.__module__)

    def resolve(self):
        import importlib

        from attnbench.kernels import registry
        from attnbench.kernels.variant import Variant

        for variant in registry.variants(self.op):
            if variant.name == self.name:
                return variant
        module = importlib.import_module(self.module)
        for value in vars(module).values():
            found = value if isinstance(value, (tuple, list)) else (value,)
            for item in found:
                if isinstance(item, Variant) and (item.op, item.name) == (self.op, self.name):
                    return item
        raise LookupError(f"variant {self.op}/{self.name} is neither registered nor defined "
                          f"in module {self.module}")


@dataclasses.dataclass(frozen=True)
class Task:
    """One config of one variant to measure, with its timing settings."""

    variant: VariantRef
    config: dict[str, Any]
    warmup: int
    repeats: int
    max_seconds: float | None
    timer: str = "auto"  # see timing.TimingPolicy.for_device
    cache: str = "auto"


def _message(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}"
    return text if len(text) <= _MESSAGE_LIMIT else text[: _MESSAGE_LIMIT - 3] + "..."


class _Problem:
    """A problem's inputs, reference output and memory floor, prepared once per worker."""

    def __init__(self, problem, seed: int, tolerance: float, bandwidth: float | None):
        import jax
        import numpy as np

        from attnbench.kernels.registry import get_operator

        from . import roofline
        from .input_sets import copied, donation, rotated_input_sets, with_array_keywords_last

        self.problem = problem
        self.operator = get_operator(problem.op)
        self.tolerance = tolerance
        # Compiled calls by (variant, config), with their input sets: a config timed again
        # in a later halving round is not compiled twice. Its record keeps the compile time
        # of the first compile.
        self.compiled: dict[str, tuple[Any, float, list]] = {}
        self.conversions: dict[str, str] = {}  # of converting variants: what they convert
        args, self.kwargs = problem.make_inputs(seed)
        self.bytes_moved = roofline.bytes_moved(problem.op, args, self.kwargs)
        self.floor_us = roofline.floor_us(self.bytes_moved, bandwidth) if bandwidth else None
        from attnbench.kernels.devices import cache_bytes
        from attnbench.kernels.platform import current_device_kind, current_platform

        self.platform, self.device_kind = current_platform(), current_device_kind()
        self.host_cache_bytes = roofline.last_level_cache_bytes()
        # Rotate inputs only where the problem fits in cache; large ones are cold anyway.
        cache = cache_bytes(self.device_kind, self.platform) or self.host_cache_bytes
        rotate = self.bytes_moved < 4 * cache
        self.positional = len(args)
        _, trailing = with_array_keywords_last(None, self.positional, self.kwargs)  # arrays only
        self.input_sets = [tuple(a) + trailing
                           for a in rotated_input_sets(args, seed, 3 if rotate else 1)]
        self.donated, self.carry = donation(self.operator, self.positional)
        reference, _ = self.compile(self.operator.reference, None, output_dtype="float32")
        output, extras = self.operator.split_result(
            jax.block_until_ready(reference(*copied(self.input_sets[0], self.donated))))
        self.reference = np.asarray(output)
        self.reference_extras = tuple(np.asarray(e) for e in extras)
        self.zero_rows = self.operator.zero_rows(args)
        self.key_ranges = self.operator.key_ranges(args, self.kwargs)

    def compile(self, variant, config, output_dtype: str | None = None,
                device_events: bool = False):
        """The AOT-compiled kernel call on these inputs, cast as the operator casts it
        (to the query dtype, or `output_dtype`), and the input sets it is timed on (with a
        converting variant's arrays appended); with profiler events where the platform
        emits them only on request (`device_events`)."""
        import jax

        from attnbench.kernels.jax_compat import compile_with_device_events

        from .kernel_calls import KernelCall

        call = KernelCall(self.operator, variant, config, self.positional, self.kwargs,
                          output_dtype=output_dtype)
        input_sets = call.timed_input_sets(self.input_sets)
        lowered = jax.jit(call.run, donate_argnums=self.donated).lower(*input_sets[0])
        compiled = (compile_with_device_events(lowered, self.platform) if device_events
                    else lowered.compile())
        return compiled, input_sets

    def policy(self, task: Task):
        from .timing import TimingPolicy

        return TimingPolicy.for_device(self.platform, self.device_kind, timer=task.timer,
                                       cache=task.cache, host_cache_bytes=self.host_cache_bytes)

    def measure(self, task: Task, clock: HostClock | None = None) -> dict[str, Any]:
        """The task's record: compiled and checked while working, then timed at the clock
        (`clock` None: this process is alone on its host). The windows of both (wall time,
        seconds) show who worked alongside whom."""
        clock = clock or HostClock(None)
        with clock.working():
            began = time.time()
            record, call, timed_sets = self._check(task)
            record["worked_at"] = [began, time.time()]
        if call is None:
            return record
        return self._time(task, clock, record, call, timed_sets)

    def _check(self, task: Task) -> tuple[dict[str, Any], Any, list | None]:
        """The record so far, with the call to time and fresh copies of its input sets
        (None, None: the config failed, its record says why)."""
        import jax
        import numpy as np

        from .accuracy import extras_problems, judge
        from .input_sets import copied

        failed = None, None

        record: dict[str, Any] = {"bytes_moved": self.bytes_moved, "floor_us": self.floor_us}
        try:
            cache_key = repr((task.variant, sorted(task.config.items())))
            if cache_key not in self.compiled:
                variant = task.variant.resolve()
                config = variant.config_class.from_mapping(task.config)
                began = time.perf_counter()
                events = self.policy(task).timer == "profiler"
                compiled, input_sets = self.compile(variant, config, device_events=events)
                self.compiled[cache_key] = (compiled, time.perf_counter() - began, input_sets)
                if variant.conversion:
                    self.conversions[cache_key] = variant.conversion
            compiled, record["compile_s"], timed_sets = self.compiled[cache_key]
            if cache_key in self.conversions:
                record["input_conversion"] = self.conversions[cache_key]
        except Exception as error:  # noqa: BLE001 -- a failing config is a result
            return {**record, "status": "compile_error", "reason": _message(error)}, *failed
        try:
            result = compiled(*copied(timed_sets[0], self.donated))
            output, extras = self.operator.split_result(jax.block_until_ready(result))
            output = np.asarray(output)
        except Exception as error:  # noqa: BLE001
            return {**record, "status": "error", "reason": _message(error)}, *failed
        verdict = judge(output, self.reference, self.problem.dtype, self.tolerance,
                        zero_rows=self.zero_rows, key_ranges=self.key_ranges)
        record.update(relative_error=verdict.relative_error, max_abs_error=verdict.max_abs_error)
        if not verdict.ok:
            return {**record, "status": "wrong", "reason": verdict.reason}, *failed
        wrong_extras = extras_problems(self.operator, extras, self.reference_extras)
        if wrong_extras:
            return {**record, "status": "wrong", "reason": "; ".join(wrong_extras)}, *failed
        return record, compiled, [copied(inputs, self.donated) for inputs in timed_sets]

    def _time(self, task: Task, clock: HostClock, record: dict[str, Any], call,
              input_sets: list) -> dict[str, Any]:
        from .timing import time_call

        try:
            with clock.timing():
                began = time.time()
                timing = time_call(call, input_sets, warmup=task.warmup, repeats=task.repeats,
                                   max_seconds=task.max_seconds, policy=self.policy(task),
                                   bytes_per_call=self.bytes_moved, carry=self.carry)
                record["timed_at"] = [began, time.time()]
        except Exception as error:  # noqa: BLE001
            return {**record, "status": "error", "reason": _message(error)}
        record.update(status="ok", reason="", median_us=timing.median_us, p20_us=timing.p20_us,
                      p80_us=timing.p80_us, samples=timing.samples, timer=timing.timer,
                      cache=timing.cache, timer_note=timing.timer_note,
                      wall_median_us=timing.wall_median_us)
        return record


def serve(connection, problem, seed: int, tolerance: float, bandwidth: float | None,
          clock_path: str | None = None) -> None:
    """Worker entry: prepares `problem`, answers ("ready", info), then measures each Task
    it receives and answers with its record, until it receives None or the pipe closes.
    `clock_path`: the host lock shared with the other measuring processes of this host
    (see host_clock); None when this is the host's only one."""
    _die_with_parent()
    clock = HostClock(clock_path)
    try:
        with clock.working():
            prepared = _Problem(problem, seed, tolerance, bandwidth)
    except Exception:  # noqa: BLE001 -- the parent records it for every config of the problem
        connection.send(("error", traceback.format_exc()[-_MESSAGE_LIMIT:]))
        connection.close()
        return
    connection.send(("ready", {"pid": os.getpid()}))
    while True:
        try:
            task = connection.recv()
        except EOFError:
            break
        if task is None:
            break
        try:
            record = prepared.measure(task, clock)
        except Exception as error:  # noqa: BLE001 -- never let one config end the worker
            record = {"status": "error", "reason": _message(error)}
        connection.send(("done", record))
    connection.close()
