"""Device-side timing: the profiler timer on real XLA:CPU traces, the GPU/TPU event layouts
on synthetic traces, the fallback to wall clock, and cold-cache flushing.

No GPU or TPU trace can be recorded on this host: the GPU and TPU tests below build their
traces in the test, following the layout the profiler's trace-event JSON uses for them
(device processes named /device:GPU:N or /device:TPU:N, kernel events carrying
args.hlo_module, an "XLA Modules" line with one event per execution).
"""

from __future__ import annotations

import gzip
import json
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnbench.kernels.jax_compat import compile_with_device_events, hlo_module_name
from attnbench.tuner.measure.device_trace import DeviceTraceError, execution_times_us, load_trace
from attnbench.tuner.measure.timing import TimingPolicy, time_call

DATA = Path(__file__).resolve().parent / "data"


def _long_call():
    """A CPU call of about 0.1 s, with XLA:CPU's per-execution events asked for."""
    x = jnp.linspace(0.0, 1.0, 768 * 768, dtype=jnp.float32).reshape(768, 768)

    def attnbench_long_call(a):
        for _ in range(4):
            a = jnp.tanh(a @ a)
        return a

    return compile_with_device_events(jax.jit(attnbench_long_call).lower(x), "cpu"), x


def test_profiler_agrees_with_the_wall_clock_call_by_call():
    compiled, x = _long_call()
    jax.block_until_ready(compiled(x))
    walls = []
    with tempfile.TemporaryDirectory() as folder:
        with jax.profiler.trace(folder, create_perfetto_trace=True):
            for _ in range(4):
                began = time.perf_counter()
                jax.block_until_ready(compiled(x))
                walls.append((time.perf_counter() - began) * 1e6)
        events = load_trace(folder)
    device, layout = execution_times_us(events, hlo_module_name(compiled), 4)
    assert layout == "host thunks"
    # Each execution lies inside its blocked call; on a call this long, dispatch and the
    # wake-up of the waiting thread are a small share of it (on a shared, busy host too).
    assert all(d <= w * 1.01 for d, w in zip(device, walls)), (device, walls)
    assert np.median(device) >= 0.75 * np.median(walls), (device, walls)


def test_time_call_uses_the_profiler_and_records_it():
    compiled, x = _long_call()
    timing = time_call(compiled, [(x,)], warmup=1, repeats=3, policy=TimingPolicy("profiler"))
    assert (timing.timer, timing.timer_note, timing.samples) == ("profiler", "", 3)
    assert 0 < timing.p20_us <= timing.median_us <= timing.p80_us


def test_profiler_timer_falls_back_to_wall_clock_and_says_why(monkeypatch):
    from attnbench.tuner.measure import timing as timing_module

    x = jnp.ones((64, 64))
    compiled = jax.jit(lambda a: a @ a).lower(x).compile()
    # The trace then holds no execution of the module looked for.
    monkeypatch.setattr(timing_module, "hlo_module_name", lambda _: "jit_not_in_the_trace")
    timing = time_call(compiled, [(x,)], warmup=1, repeats=3, policy=TimingPolicy("profiler"))
    assert timing.timer == "wall" and timing.samples == 3
    assert "profiler timer unavailable" in timing.timer_note
    assert "no events of module 'jit_not_in_the_trace'" in timing.timer_note


def test_stored_cpu_trace():
    """A real XLA:CPU trace (trimmed): three executions of a module of several thunks, a
    module without events run between them, and the host-side dispatch events."""
    with gzip.open(DATA / "cpu_trace.json.gz", "rt") as file:
        data = json.load(file)
    expected = data["attnbench_expected"]
    times, layout = execution_times_us(data["traceEvents"], expected["module"], 3)
    assert layout == "host thunks"
    assert times == pytest.approx(expected["times_us"])
    # Each execution's span covers every thunk of its run and nothing of the others.
    runs = {}
    for event in data["traceEvents"]:
        if event.get("args", {}).get("hlo_module") == expected["module"]:
            runs.setdefault(event["args"]["run_id"], []).append(event)
    assert len(runs) == 3 and max(len(run) for run in runs.values()) > 1
    # A process that also holds compile-only TPU devices lists them in its trace; a CPU
    # call's events are still read from the host process.
    with_tpu = _meta(9, "/device:TPU:0", {1: "XLA Modules"}) + data["traceEvents"]
    assert execution_times_us(with_tpu, expected["module"], 3) == (times, "host thunks")
    with pytest.raises(DeviceTraceError, match="holds 3 executions .* but 4 were made"):
        execution_times_us(data["traceEvents"], expected["module"], 4)
    with pytest.raises(DeviceTraceError, match="no events of module 'jit_other' on a /host:CPU"):
        execution_times_us(data["traceEvents"], "jit_other", 3)


def _meta(pid, process, threads):
    events = [{"ph": "M", "pid": pid, "name": "process_name", "args": {"name": process}}]
    events += [{"ph": "M", "pid": pid, "tid": tid, "name": "thread_name", "args": {"name": name}}
               for tid, name in threads.items()]
    return events


def _x(pid, tid, ts, dur, name, **args):
    return {"ph": "X", "pid": pid, "tid": tid, "ts": ts, "dur": dur, "name": name, "args": args}


def _gpu_trace(executions: int, with_module_line: bool = False):
    events = _meta(1, "/host:CPU", {10: "python3"}) + _meta(
        2, "/device:GPU:0", {7: "Stream #7(Compute)", 8: "Stream #8(Compute)", 99: "XLA Modules"})
    for i in range(executions):
        start = 1000.0 * i
        # The flush kernel of another module comes first; then the call's two kernels on two
        # streams; the host's dispatch of the call carries the module name too.
        events.append(_x(2, 7, start, 40.0, "fusion_flush", hlo_module="jit_attnbench_cache_flush"))
        events.append(_x(2, 7, start + 100, 30.0, "attn_stage1", hlo_module="jit_call",
                         hlo_op="custom-call.1"))
        events.append(_x(2, 8, start + 135, 10.0, "attn_merge", hlo_module="jit_call",
                         hlo_op="fusion.2"))
        events.append(_x(1, 10, start + 90, 400.0, "ThunkExecute", hlo_module="jit_call"))
        if with_module_line:
            events.append(_x(2, 99, start + 100, 45.0, f"jit_call({1234})"))
            events.append(_x(2, 99, start, 40.0, "jit_attnbench_cache_flush(77)"))
    return events


def test_gpu_kernel_events_of_the_call_only():
    times, layout = execution_times_us(_gpu_trace(3), "jit_call", 3, "gpu")
    assert layout == "device kernels"
    assert times == [45.0, 45.0, 45.0]  # first kernel's start to last kernel's end
    with pytest.raises(DeviceTraceError, match="6 kernel events .* do not divide into 4"):
        execution_times_us(_gpu_trace(3), "jit_call", 4, "gpu")
    with pytest.raises(DeviceTraceError, match="no events of module 'jit_missing' on a /device:GPU"):
        execution_times_us(_gpu_trace(3), "jit_missing", 3, "gpu")
    with pytest.raises(ValueError, match="platform must be one of"):
        execution_times_us(_gpu_trace(3), "jit_call", 3, "rocm")


def test_gpu_and_tpu_module_lines_win_over_kernels():
    times, layout = execution_times_us(_gpu_trace(2, with_module_line=True), "jit_call", 2, "gpu")
    assert (times, layout) == ([45.0, 45.0], "module line")
    tpu = _meta(3, "/device:TPU:0", {1: "XLA Modules", 2: "XLA Ops"})
    for i, dur in enumerate((12.5, 11.0, 13.25)):
        tpu.append(_x(3, 1, 100.0 * i, dur, "jit_call(55)", run_id=str(i)))
        tpu.append(_x(3, 2, 100.0 * i, dur / 2, "fusion.3", hlo_module="jit_call"))
    tpu.append(_x(3, 1, 900.0, 5.0, "jit_call_other(56)"))  # a prefix of another name
    assert execution_times_us(tpu, "jit_call", 3, "tpu") == ([12.5, 11.0, 13.25], "module line")
    with pytest.raises(DeviceTraceError, match="holds 3 executions"):
        execution_times_us(tpu, "jit_call", 2, "tpu")
    with pytest.raises(DeviceTraceError, match="on a /device:GPU process"):
        execution_times_us(tpu, "jit_call", 3, "gpu")


def test_cold_cache_policy_per_device():
    h200 = TimingPolicy.for_device("gpu", "nvidia-h200")
    assert (h200.timer, h200.flush_bytes) == ("profiler", 2 * 60 * 2**20)
    assert TimingPolicy.for_device("gpu", "nvidia-h200", cache="warm").flush_bytes == 0
    unknown = TimingPolicy.for_device("gpu", "nvidia-t4")
    assert unknown.flush_bytes >= 2 * 126 * 2**20
    v6e = TimingPolicy.for_device("tpu", "tpu-v6e")
    assert (v6e.timer, v6e.flush_bytes, v6e.cacheless) == ("profiler", 0, True)
    assert TimingPolicy.for_device("tpu", "tpu-v4").flush_bytes == 2 * 128 * 2**20
    cpu = TimingPolicy.for_device("cpu", "cpu", host_cache_bytes=32 * 2**20)
    assert (cpu.timer, cpu.flush_bytes, cpu.cache_bytes) == ("wall", 0, 32 * 2**20)
    with pytest.raises(ValueError, match="timer must be one of"):
        TimingPolicy.for_device("gpu", "nvidia-h100", timer="cupti")
    with pytest.raises(ValueError, match="cache must be one of"):
        TimingPolicy.for_device("gpu", "nvidia-h100", cache="lukewarm")


def test_flush_between_calls_and_cache_recorded():
    x = jnp.ones((32, 32))
    compiled = jax.jit(lambda a: a * 2).lower(x).compile()
    flushed = time_call(compiled, [(x,)], warmup=0, repeats=3,
                        policy=TimingPolicy("wall", flush_bytes=1 << 20))
    assert flushed.cache == "cold" and flushed.samples == 3
    small = time_call(compiled, [(x,)] * 3, warmup=0, repeats=3,
                      policy=TimingPolicy("wall", cache_bytes=1 << 20), bytes_per_call=4096)
    assert small.cache == "warm"
    large = time_call(compiled, [(x,)] * 3, warmup=0, repeats=3,
                      policy=TimingPolicy("wall", cache_bytes=1 << 20), bytes_per_call=1 << 20)
    assert large.cache == "cold"
    cacheless = time_call(compiled, [(x,)], warmup=0, repeats=3,
                          policy=TimingPolicy("wall", cacheless=True))
    assert cacheless.cache == "cold"
