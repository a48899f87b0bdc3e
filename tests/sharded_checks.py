"""Every variant per shard, against its unsharded call, on 2 and 4 virtual CPU devices.

    python tests/sharded_checks.py

JAX fixes its device count when its backend starts, and the test suite's process starts it
with one device, so tests/test_sharding.py runs this in a fresh process with 4 devices
(``--xla_force_host_platform_device_count=4``); the 2-device meshes take the first two, so
every variant is traced and compiled unsharded once for both counts. Prints one line per
check and exits 1 if any failed. Every variant of every operator is run on 2 devices with
heads split through the ``mesh=`` keywords (tensor parallel), batch or sequences split in a
user's own ``shard_map`` (data parallel) and ``jit`` over head-sharded inputs (GSPMD), and
on 4 devices with a 2 x 2 mesh splitting both in a ``shard_map`` and under GSPMD.
"""

from __future__ import annotations

import dataclasses
import os
import sys

DEVICES = 4
if __name__ == "__main__":
    # Each program here is compiled once and run once on tiny shapes: LLVM's expensive
    # passes would cost more than they save.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_force_host_platform_device_count={DEVICES}"
                               + " --xla_backend_optimization_level=0"
                               + " --xla_llvm_disable_expensive_passes=true")
    os.environ["JAX_PLATFORMS"] = "cpu"
    # The interpreters run each device's kernel as host callbacks, and JAX first copies a
    # callback's operands to CPU device 0; from 100 KiB on, XLA's CPU client makes that
    # copy on its thread pool (as many threads as cores, or PJRT_NPROC). With every pool
    # thread running a device that waits inside such a callback, the copy never runs. One
    # thread more than devices leaves it one.
    os.environ["PJRT_NPROC"] = str(max(DEVICES + 1, int(os.environ.get("PJRT_NPROC", 0))))

import time
import traceback
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from attnbench import kernels
from attnbench.kernels.decode.problem import DecodeProblem
from attnbench.kernels.paged.problem import PagedProblem
from attnbench.kernels.paged_v3.problem import PagedV3Problem
from attnbench.tuner.measure.accuracy import extras_problems, judge

DECODE = DecodeProblem(batch=4, max_len=64, q_heads=8, kv_heads=4, head_dim=32,
                       dtype="float32", random_start=True, sliding_window=40, sinks=True)
# Mixed prefill and decode rows, with padding rows past the last sequence.
PAGED = PagedProblem(num_seqs=2, max_len=40, q_heads=8, kv_heads=4, head_dim=32, page_size=8,
                     dtype="float32", prefill_fraction=0.5, prefill_chunk=6, padding_tokens=2,
                     sliding_window=24, sinks=True)
# An int8 cache (4 heads' elements per 32-bit word: a shard of 4 holds one packed row of 2
# key/value heads) with decode and mixed sequences and padding rows.
PAGED_V3 = PagedV3Problem(num_seqs=2, max_len=40, q_heads=16, kv_heads=8, head_dim=32,
                          page_size=8, dtype="float32", cache_dtype="int8", mixed_fraction=0.5,
                          prefill_chunk=6, padding_tokens=2, sliding_window=24, sinks=True)
# For the variants that read no 8-bit cache (cpu_native): the same batch on a float32 cache.
PAGED_V3_FLOAT_CACHE = dataclasses.replace(PAGED_V3, cache_dtype="float32")
# Each variant runs on the first problem of its operator that it supports.
PROBLEMS = [("decode", DECODE), ("paged", PAGED), ("paged_v3", PAGED_V3),
            ("paged_v3", PAGED_V3_FLOAT_CACHE)]


def interpreted(variant) -> bool:
    return "cpu" not in variant.platforms


def auto_mesh(shape, names):
    """A mesh over the first prod(shape) devices."""
    count = int(np.prod(shape))
    return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(shape),
                         devices=jax.devices()[:count])


def in_shard_map(call, mesh, arrays, specs, kwargs, tp, out_specs):
    """`call(*arrays, **kwargs)` inside the caller's own shard_map, jitted: array keywords
    are inputs too (sinks split like the query heads, a cache's scales replicated)."""
    names = [k for k, v in kwargs.items() if hasattr(v, "shape")]
    static = {k: v for k, v in kwargs.items() if k not in names}
    keyword_specs = tuple(P(tp) if k == "sinks" else P() for k in names)
    count = len(arrays)

    def body(*a):
        return call(*a[:count], **static, **dict(zip(names, a[count:])))

    mapped = jax.shard_map(body, mesh=mesh, in_specs=tuple(specs) + keyword_specs,
                           out_specs=out_specs)
    return jax.jit(mapped)(*arrays, *(kwargs[k] for k in names))


def decode_data_parallel(args, kwargs, call, mesh, dp, tp):
    """Batch split over `dp` (and heads over `tp` if given) in the caller's shard_map."""
    heads = P(dp, tp, None)
    cache = P(dp, None, tp, None)
    return in_shard_map(call, mesh, args, (heads, cache, cache, P(dp), P(dp)), kwargs, tp, heads)


def sequence_split(per_token, context_lens, page_table, query_start_loc, active, shards):
    """The sequences of a paged call dealt to `shards` groups: per-shard arrays stacked on
    their first axis (per-token arrays padded to one length, query_start_loc local), the
    groups of global sequences, the global rows of each shard's local rows, and the length."""
    per = -(-active // shards)
    groups = [list(range(i * per, min(active, (i + 1) * per))) for i in range(shards)]
    length = max(query_start_loc[g[-1] + 1] - query_start_loc[g[0]] for g in groups) + 1
    tokens = [[] for _ in per_token]
    ctx, table, qsl, rows = [], [], [], []
    for g in groups:
        first, end = query_start_loc[g[0]], query_start_loc[g[-1] + 1]
        for stacked, array in zip(tokens, per_token):
            local = np.zeros((length,) + array.shape[1:], array.dtype)
            local[: end - first] = array[first:end]
            stacked.append(local)
        pad = per - len(g)
        ctx.append(np.concatenate([context_lens[g], np.zeros(pad, np.int32)]))
        table.append(np.concatenate([page_table[g], np.zeros((pad, page_table.shape[1]),
                                                             np.int32)]))
        local_starts = query_start_loc[g[0]: g[-1] + 2] - first
        qsl.append(np.concatenate([local_starts, np.full(pad, local_starts[-1], np.int32)]))
        rows.append(np.arange(first, end))
    stacked = [np.concatenate(t) for t in tokens]
    index = [np.concatenate(a).astype(np.int32) for a in (ctx, table, qsl)]
    return stacked, index, groups, rows, length


def gather_rows(out, rows, length, num_tokens):
    """The global output from the shards' stacked local outputs; a shard's padding rows
    must be zero."""
    full = np.zeros((num_tokens,) + out.shape[1:], out.dtype)  # rows no sequence owns stay 0
    for shard, global_rows in enumerate(rows):
        full[global_rows] = out[shard * length: shard * length + len(global_rows)]
        assert not out[shard * length + len(global_rows): (shard + 1) * length].any(), \
            "padding rows of a shard are not zero"
    return full


def paged_data_parallel(args, kwargs, call, mesh, dp, tp):
    """Sequences split over `dp` (each shard its own sequences, page table rows,
    query_start_loc, num_seqs and cache), heads over `tp` if given, in the caller's
    shard_map."""
    queries, kv_pages, context_lens, page_table, query_start_loc, num_seqs = (
        np.asarray(a) for a in args)
    shards = mesh.shape[dp]
    (local_queries,), index, groups, rows, length = sequence_split(
        [queries], context_lens, page_table, query_start_loc, int(num_seqs), shards)
    counts = np.array([len(g) for g in groups], np.int32)
    # Each data-parallel replica holds its own copy of the cache (split on its page axis).
    split = (local_queries, np.concatenate([kv_pages] * shards), *index, counts)
    heads = P(dp, tp, None)
    specs = (heads, P(dp, None, tp, None), P(dp), P(dp, None), P(dp), P(dp))
    out = np.asarray(in_shard_map(call, mesh, [jnp.asarray(a) for a in split], specs, kwargs,
                                  tp, heads))
    return gather_rows(out, rows, length, queries.shape[0])


def written_slots(context_lens, page_table, query_start_loc, active, page_size):
    """(pages, rows) the new tokens of sequences 0 .. active - 1 are written to."""
    pages, slots = [], []
    for i in range(active):
        q_len = query_start_loc[i + 1] - query_start_loc[i]
        for position in context_lens[i] - q_len + np.arange(q_len):
            pages.append(page_table[i, position // page_size])
            slots.append(position % page_size)
    return np.array(pages, np.int64), np.array(slots, np.int64)


def v3_data_parallel(args, kwargs, call, mesh, dp, tp):
    """paged_data_parallel for the writing operator: per-token keys and values go with the
    queries, each shard's distribution counts its own sequences per band, and each shard
    writes into its own copy of the cache. Returns the global output and the cache with
    every shard's writes (each shard's copy must be unchanged outside its own slots)."""
    (queries, keys, values, kv_cache, context_lens, page_table, query_start_loc,
     distribution) = (np.asarray(a) for a in args)
    shards = mesh.shape[dp]
    table = page_table.reshape(context_lens.shape[0], -1)
    (local_q, local_k, local_v), index, groups, rows, length = sequence_split(
        [queries, keys, values], context_lens, table, query_start_loc, int(distribution[2]),
        shards)
    bands = np.concatenate([[sum(s < bound for s in g) for bound in distribution]
                            for g in groups]).astype(np.int32)
    split = (local_q, local_k, local_v, np.concatenate([kv_cache] * shards), *index, bands)
    heads = P(dp, tp, None)
    cache_spec = P(dp, None, tp, None, None)
    specs = (heads, heads, heads, cache_spec, P(dp), P(dp, None), P(dp), P(dp))
    out, caches = in_shard_map(call, mesh, [jnp.asarray(a) for a in split], specs, kwargs, tp,
                               (heads, cache_spec))
    out, caches = np.asarray(out), np.asarray(caches).reshape((shards,) + kv_cache.shape)
    merged = kv_cache.copy()
    ctx, local_table, qsl = index
    per = len(ctx) // shards
    for shard, g in enumerate(groups):
        part = slice(shard * per, (shard + 1) * per)
        pages, slots = written_slots(ctx[part], local_table[part], qsl[shard * (per + 1):
                                     (shard + 1) * (per + 1)], len(g), kv_cache.shape[1])
        untouched = caches[shard].copy()
        untouched[pages, slots] = kv_cache[pages, slots]
        assert np.array_equal(untouched.view(np.uint8), kv_cache.view(np.uint8)), \
            f"shard {shard} changed its cache outside its own sequences' slots"
        merged[pages, slots] = caches[shard][pages, slots]
    return gather_rows(out, rows, length, queries.shape[0]), jnp.asarray(merged)


DATA_PARALLEL = {"decode": decode_data_parallel, "paged": paged_data_parallel,
                 "paged_v3": v3_data_parallel}


def gspmd(args, kwargs, call, mesh, op, axis):
    """jit over inputs whose heads are laid out over `axis` of the mesh (no shard_map)."""
    specs, _ = kernels.get_operator(op).shard_specs(axis, args)
    placed = [jax.device_put(a, NamedSharding(mesh, s)) for a, s in zip(args, specs)]
    names = [k for k, v in kwargs.items() if hasattr(v, "shape")]
    static = {k: v for k, v in kwargs.items() if k not in names}
    keywords = [jax.device_put(kwargs[k], NamedSharding(mesh, P(axis) if k == "sinks" else P()))
                for k in names]
    count = len(args)
    return jax.jit(lambda *a: call(*a[:count], **static, **dict(zip(names, a[count:]))))(
        *placed, *keywords)


def decode_gspmd_both(args, kwargs, call, mesh, op):
    """GSPMD on a 2 x 2 mesh: decode's batch rows over dp, heads over tp."""
    heads, cache = P("dp", "tp", None), P("dp", None, "tp", None)
    specs = (heads, cache, cache, P("dp"), P("dp"))
    placed = [jax.device_put(a, NamedSharding(mesh, s)) for a, s in zip(args, specs)]
    sinks = jax.device_put(kwargs["sinks"], NamedSharding(mesh, P("tp")))
    rest = {k: v for k, v in kwargs.items() if k != "sinks"}
    return jax.jit(lambda *a: call(*a[:-1], sinks=a[-1], **rest))(*placed, sinks)


def modes(op):
    """(label, function(args, kwargs, call) -> result) per sharding tried: on 2 devices,
    then on 4."""
    tp, dp = auto_mesh((2,), ("tp",)), auto_mesh((2,), ("dp",))
    both = auto_mesh((2, 2), ("dp", "tp"))
    split_both = ((lambda a, k, c: decode_gspmd_both(a, k, c, both, op)) if op == "decode"
                  else (lambda a, k, c: gspmd(a, k, c, both, op, ("dp", "tp"))))
    return [
        ("tp=2 mesh keyword", lambda a, k, c: jax.jit(lambda *x: c(*x, mesh=tp, **k))(*a)),
        ("dp=2 shard_map", lambda a, k, c: DATA_PARALLEL[op](a, k, c, dp, "dp", None)),
        ("gspmd tp=2", lambda a, k, c: gspmd(a, k, c, tp, op, "tp")),
        ("dp=2 x tp=2 shard_map", lambda a, k, c: DATA_PARALLEL[op](a, k, c, both, "dp", "tp")),
        ("gspmd dp=2 x tp=2", split_both),
    ]


def check_mode(op, problem, run, args, kwargs, call, unsharded, reference):
    """(ok, detail): the sharded result against the unsharded call (within the dtype's
    bound; the per-shard config may differ, looked up for the shard's shape) and against
    the reference; extra outputs (an updated cache) bit for bit."""
    operator = kernels.get_operator(op)
    out, extras = operator.split_result(run(args, kwargs, call))
    out = np.asarray(out)
    unsharded_out, unsharded_extras = unsharded
    rows = dict(zero_rows=operator.zero_rows(args), key_ranges=operator.key_ranges(args, kwargs))
    to_unsharded = judge(out, unsharded_out, problem.dtype, **rows)
    to_reference = judge(out, reference, problem.dtype, **rows)
    wrong = extras_problems(operator, extras, unsharded_extras)
    detail = f"max |sharded - unsharded| = {float(np.max(np.abs(out - unsharded_out))):.2e}"
    for name, verdict in (("unsharded call", to_unsharded), ("reference", to_reference)):
        if not verdict.ok:
            detail += f"; against the {name}: {verdict.reason}"
    if wrong:
        detail += "; " + "; ".join(wrong)
    return to_unsharded.ok and to_reference.ok and not wrong, detail


def main() -> int:
    assert len(jax.devices()) == DEVICES, jax.devices()
    warnings.simplefilter("ignore")  # untuned shapes warn once per key; not under test
    failures = 0
    checked: set[tuple[str, str]] = set()
    for op, problem in PROBLEMS:
        first_of_op = all(done_op != op for done_op, _ in checked)
        operator = kernels.get_operator(op)
        function = operator.function
        args, kwargs = problem.make_inputs(0)
        kwargs = {k: jnp.float32(v) if k in ("k_scale", "v_scale") else v
                  for k, v in kwargs.items()}
        output, extras = operator.split_result(jax.jit(
            lambda *a: function(*a, variant="reference", **kwargs))(*args))
        reference = np.asarray(output), tuple(np.asarray(e) for e in extras)
        for variant in sorted(kernels.variants(op), key=lambda v: v.name != "reference"):
            if variant.peer is not None:  # checked as shipped: tests/test_peers.py
                continue
            if (op, variant.name) in checked or variant.unsupported_reason(
                    problem.shape(0), "cpu", interpreted(variant)):
                continue  # checked on another problem of its operator (the count below)
            checked.add((op, variant.name))
            def call(*a, _v=variant, **k):
                return function(*a, variant=_v.name, interpret=interpreted(_v), **k)

            output, extras = operator.split_result(jax.jit(lambda *a: call(*a, **kwargs))(*args))
            unsharded = np.asarray(output), tuple(np.asarray(e) for e in extras)
            for label, run in modes(op):
                started = time.perf_counter()
                try:
                    ok, detail = check_mode(op, problem, run, args, kwargs, call, unsharded,
                                            reference[0])
                except Exception:  # noqa: BLE001 -- reported, and the run fails
                    ok, detail = False, traceback.format_exc(limit=4)
                failures += not ok
                print(f"{'ok  ' if ok else 'FAIL'} {op}/{variant.name} [{label}] {detail} "
                      f"({time.perf_counter() - started:.1f} s)", flush=True)
        if first_of_op:
            for devices in (2, 4):
                failures += not lookup_once(op, problem, args, kwargs, reference, devices)
    ours = {(v.op, v.name) for v in kernels.variants() if v.peer is None}
    for op, name in sorted(ours - checked):
        print(f"FAIL {op}/{name} ran on none of the problems", flush=True)
        failures += 1
    for devices in (2, 4):
        failures += not too_few_threads_refused(devices)
    return 1 if failures else 0


def lookup_once(op, problem, args, kwargs, reference, devices: int) -> bool:
    """A jitted call through the mesh keywords, heads over `devices` devices of an Explicit
    mesh (the keyword lays the inputs out itself), looks its config up once, at trace
    time, for the per-shard shape; calling it again looks nothing up. Its result is the
    reference's (the attention output within the dtype's bound, an updated cache bit for
    bit)."""
    mesh = jax.make_mesh((devices,), ("tp",), axis_types=(AxisType.Explicit,),
                         devices=jax.devices()[:devices])
    operator = kernels.get_operator(op)
    seen = []
    original = kernels.run.choose

    def counting(shape, **options):
        seen.append(shape)
        return original(shape, **options)

    kernels.run.choose = counting
    try:
        call = jax.jit(lambda *a: operator.function(*a, mesh=mesh, **kwargs))
        for _ in range(3):
            result = jax.block_until_ready(call(*args))
    finally:
        kernels.run.choose = original
    out, extras = operator.split_result(result)
    verdict = judge(out, reference[0], problem.dtype, zero_rows=operator.zero_rows(args))
    wrong = extras_problems(operator, extras, reference[1])
    ok = verdict.ok and not wrong and len(seen) == 1 and (seen[0].q_heads, seen[0].kv_heads) == (
        problem.q_heads // devices, problem.kv_heads // devices)
    print(f"{'ok  ' if ok else 'FAIL'} {op} lookups over 3 sharded calls on {devices} devices: "
          f"{[(s.q_heads, s.kv_heads) for s in seen]}; tp={devices} on an Explicit mesh against "
          f"the reference: {verdict.reason or 'within bound'} {'; '.join(wrong)}", flush=True)
    return ok


def too_few_threads_refused(devices: int) -> bool:
    """Where the CPU client has no thread more than the devices an interpreted kernel runs
    on at once, the call is refused (it could hang), naming the setting that fixes it. The
    check reads the setting at trace time; this process's pool really has more threads."""
    args, kwargs = DECODE.make_inputs(0)
    mesh = auto_mesh((devices,), ("dp",))
    saved = os.environ["PJRT_NPROC"]
    os.environ["PJRT_NPROC"] = str(devices)
    messages = []
    try:
        for name in ("pallas_tpu", "triton_splitkv"):
            try:
                decode_data_parallel(args, kwargs, lambda *a, _n=name, **k: kernels.decode_attention(
                    *a, variant=_n, interpret=True, **k), mesh, "dp", None)
                messages.append(f"{name}: ran")
            except kernels.UnsupportedError as error:
                messages.append(f"{name}: {error}")
    finally:
        os.environ["PJRT_NPROC"] = saved
    ok = all(f"Set PJRT_NPROC={devices + 1}" in m for m in messages)
    print(f"{'ok  ' if ok else 'FAIL'} interpreted kernels on {devices} devices with "
          f"PJRT_NPROC={devices} are refused: {' | '.join(messages)}", flush=True)
    return ok


if __name__ == "__main__":
    sys.exit(main())
