"""`attnbench check`: compile every GPU config a sweep would run, before any GPU time is spent.

For each problem of a sweep file and each config of a variant that compiles GPU kernels
(after validity rules and the file's constraints), the config is traced for each CUDA target;
configs that launch the same kernels (a config on problems that differ only in the grid)
share one compile, compiles run in parallel processes, and kernel results are cached on disk
(:mod:`compile_cache`), so a repeated check compiles only what changed. The rows go to a CSV;
the sweep, on a GPU host, skips the configs found unlaunchable or uncompilable for its own target (status ``skipped_static``).
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import json
import multiprocessing
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..plan import space
from . import compile_cache, cuda_check
from ..plan.sweep_file import SweepSpec, load_sweep

Echo = Callable[[str], None]

CSV_COLUMNS = ("problem_id", "problem", "variant", "config", "target", "status", "reason",
               "kernel", "grid", "num_warps", "num_stages", "shared_bytes",
               "registers_per_thread", "spill_bytes")


def target_for_device(device_kind: str) -> cuda_check.CudaTarget | None:
    """The CUDA target of a normalized device kind ('nvidia-h100' -> sm_90), if known."""
    # Chips of one compute capability share a target.
    aliases = {"nvidia-h200": "nvidia-h100", "nvidia-gh200": "nvidia-h100",
               "nvidia-h800": "nvidia-h100", "nvidia-h20": "nvidia-h100",
               "nvidia-a800": "nvidia-a100", "nvidia-a30": "nvidia-a100",
               "nvidia-a10g": "nvidia-a10", "nvidia-a40": "nvidia-a10",
               "nvidia-rtx-3090": "nvidia-a10", "nvidia-l40": "nvidia-l4",
               "nvidia-l40s": "nvidia-l4", "nvidia-rtx-4090": "nvidia-l4"}
    kind = aliases.get(device_kind, device_kind)
    for target in cuda_check.TARGETS.values():
        if target.device_kind == kind:
            return target
    return None


def default_csv_path(sweep_path: Path, targets: list[cuda_check.CudaTarget]) -> Path:
    """results/checks/<sweep name>-<targets>.csv, where `attnbench check` writes by default."""
    names = "-".join(target.name for target in targets)
    return Path("results") / "checks" / f"{Path(sweep_path).stem}-{names}.csv"


def targets_of_sweep(spec: SweepSpec) -> list[cuda_check.CudaTarget]:
    """The CUDA targets of the devices a sweep file names (patterns are not expanded)."""
    found = [target_for_device(device) for device in spec.devices]
    return list({t.name: t for t in found if t is not None}.values())


def checked_candidates(spec: SweepSpec, shard: tuple[int, int]) -> list[tuple[Any, space.Candidate]]:
    """(problem plan, candidate) for every runnable config of a GPU-kernel variant."""
    from ..plan.planning import plan

    gpu_variants = {v.name for v in cuda_check.gpu_kernel_variants()}
    pairs = []
    for item in plan(spec, shard, "gpu"):
        for candidate in item.candidates:
            if candidate.skip_reason is None and candidate.variant.name in gpu_variants:
                pairs.append((item, candidate))
    return pairs


def _rows(item, candidate, result: cuda_check.CheckResult) -> list[dict[str, Any]]:
    base = {"problem_id": space.problem_id(item.problem), "problem": item.problem.label,
            "variant": candidate.variant.name, "config": space.canonical(candidate.config),
            "target": result.target, "status": result.status, "reason": result.reason}
    if not result.kernels:
        return [base]
    return [base | {"kernel": k.name, "grid": "x".join(map(str, k.grid)),
                    "num_warps": k.num_warps, "num_stages": k.num_stages,
                    "shared_bytes": k.shared_bytes,
                    "registers_per_thread": k.registers_per_thread,
                    "spill_bytes": k.spill_bytes} for k in result.kernels]


def default_jobs() -> int:
    """Compile processes when none is asked for: one per core this process may use (at most 16)."""
    return max(1, min(16, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                      else os.cpu_count() or 1))


def _start_worker() -> None:
    import jax

    # Cross-compiling needs no GPU; holding none leaves the device to a sweep's workers.
    jax.config.update("jax_platforms", "cpu")


def _compile_task(problem, variant_name: str, config: dict[str, Any],
                  target: cuda_check.CudaTarget) -> tuple[dict[str, cuda_check.KernelCompile], str]:
    from attnbench.kernels import registry

    variant = registry.get_variant(problem.op, variant_name)
    return cuda_check.compile_kernels(problem, variant_name, variant.config_class(**config), target)


class Compiler:
    """Runs compile tasks (module-level functions) in this process (jobs=1) or in a pool of
    spawned CPU-only processes."""

    def __init__(self, jobs: int, task: Callable = _compile_task):
        self.task = task
        self.pool = None
        if jobs > 1:
            self.pool = concurrent.futures.ProcessPoolExecutor(
                max_workers=jobs, mp_context=multiprocessing.get_context("spawn"),
                initializer=_start_worker)

    def map(self, tasks: list[tuple]):
        """Yields (task index, result) as each finishes."""
        if self.pool is None:
            for index, task in enumerate(tasks):
                yield index, self.task(*task)
            return
        futures = {self.pool.submit(self.task, *task): index for index, task in enumerate(tasks)}
        for future in concurrent.futures.as_completed(futures):
            yield futures[future], future.result()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)


def _store(path: Path, results: dict[str, cuda_check.KernelCompile]) -> None:
    compile_cache.store(path, {key: value.to_json() for key, value in results.items()})


def _check_target(pairs, target: cuda_check.CudaTarget, compiler: Compiler,
                  cache_dir: Path | None, echo: Echo) -> list[cuda_check.CheckResult]:
    """The verdicts on `pairs` for one target: every config is traced; each distinct kernel
    (:func:`cuda_check.kernel_key`) is compiled once, by exporting one config that launches
    it, unless the cache already has it."""
    configs = [candidate.variant.config_class(**candidate.config) for _, candidate in pairs]
    traced: list[list[cuda_check.TracedKernel] | str] = []
    for (item, candidate), config in zip(pairs, configs):
        try:
            traced.append(cuda_check.trace_kernels(item.problem.problem, candidate.variant.name,
                                                   config, target))
        except Exception as error:  # noqa: BLE001 -- a config the launch code refuses is a result
            traced.append(f"{type(error).__name__}: {error}"[:2000])
    # By (op, name): variants of different operators may share a name.
    variants = {(c.variant.op, c.variant.name): c.variant for _, c in pairs}
    files = {name: compile_cache.cache_file(cache_dir, target.name, variant)
             for name, variant in variants.items()} if cache_dir is not None else {}
    compiled: dict[str, cuda_check.KernelCompile] = {}
    for path in files.values():
        for key, value in compile_cache.load(path).items():
            try:
                compiled[key] = cuda_check.KernelCompile(**value)
            except TypeError:
                continue  # an entry of another layout: compiled again
    wanted = {k.key for kernels in traced if not isinstance(kernels, str) for k in kernels}
    cached = len(wanted & compiled.keys())
    echo(f"[{target.name}] {len(pairs)} configs launch {len(wanted)} distinct kernels; "
         f"{cached} are cached, compiling {len(wanted) - cached}")
    export_errors: dict[int, str] = {}
    exported: set[int] = set()
    done = 0
    while True:
        # One config per kernel not compiled yet; a config that fails to export for a reason
        # of its own leaves its kernels to the next round's configs.
        claimed: set[str] = set()
        chosen = []
        for index, kernels in enumerate(traced):
            if isinstance(kernels, str) or index in exported:
                continue
            missing = {k.key for k in kernels} - compiled.keys() - claimed
            if missing:
                claimed |= missing
                chosen.append(index)
        if not chosen:
            break
        exported |= set(chosen)  # each config is exported at most once
        tasks = [(pairs[i][0].problem.problem, pairs[i][1].variant.name, pairs[i][1].config,
                  target) for i in chosen]
        fresh: dict[tuple[str, str], dict[str, cuda_check.KernelCompile]] = {}
        for task_index, (results, error) in compiler.map(tasks):
            index = chosen[task_index]
            variant = (pairs[index][1].variant.op, pairs[index][1].variant.name)
            compiled.update(results)
            fresh.setdefault(variant, {}).update(results)
            if error and not any(r.error for r in results.values()):
                export_errors[index] = error
            missed = results.keys() - {k.key for k in traced[index]}
            if missed:  # the verdicts would leave these kernels out: refuse to judge
                export_errors[index] = (f"the export compiled {len(missed)} kernel(s) the trace "
                                        "did not find; this config is not judged")
            done += 1
            if done % 25 == 0:
                echo(f"[{target.name}] compiled {len(compiled.keys() & wanted) - cached}/"
                     f"{len(wanted) - cached} kernels")
                for name, results_of in fresh.items():
                    if name in files:
                        _store(files[name], results_of)
                fresh = {}
        for name, results_of in fresh.items():
            if name in files:
                _store(files[name], results_of)
    verdicts = []
    for index, kernels in enumerate(traced):
        if isinstance(kernels, str):
            verdicts.append(cuda_check.CheckResult(target.name, "compile_error", kernels))
        elif index in export_errors:
            verdicts.append(cuda_check.CheckResult(target.name, "compile_error",
                                                   export_errors[index]))
        else:
            verdicts.append(cuda_check.judge(target, kernels, compiled))
    return verdicts


def run_check(sweep_path: Path, targets: list[cuda_check.CudaTarget], out_csv: Path, *,
              shard: tuple[int, int] = (0, 1), limit: int | None = None,
              echo: Echo = print, jobs: int | None = None,
              cache_dir: Path | None = None, use_cache: bool = True) -> list[dict[str, Any]]:
    """Checks the sweep's GPU configs for each target; writes and returns the CSV rows.

    `jobs` compile processes (default :func:`default_jobs`); kernel results are cached in
    `cache_dir` (default :func:`compile_cache.default_cache_dir`) unless `use_cache` is
    False. `limit` caps the configs checked per variant (a slice for CI).
    """
    spec = load_sweep(sweep_path)
    pairs = checked_candidates(spec, shard)
    if limit is not None:
        taken: dict[str, int] = {}
        sliced = []
        for item, candidate in pairs:
            taken[candidate.variant.name] = taken.get(candidate.variant.name, 0) + 1
            if taken[candidate.variant.name] <= limit:
                sliced.append((item, candidate))
        pairs = sliced
    if not pairs:
        echo(f"{sweep_path}: no config of a GPU-kernel variant to check")
    jobs = default_jobs() if jobs is None else jobs
    if jobs < 1:
        raise ValueError(f"jobs: must be at least 1, not {jobs}")
    folder = (cache_dir or compile_cache.default_cache_dir()) if use_cache else None
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    compiler = Compiler(jobs if pairs else 1)
    try:
        with open(out_csv, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=CSV_COLUMNS)
            writer.writeheader()
            for target in targets:
                results = _check_target(pairs, target, compiler, folder, echo)
                for index, ((item, candidate), result) in enumerate(zip(pairs, results), 1):
                    new_rows = _rows(item, candidate, result)
                    writer.writerows(new_rows)
                    rows += new_rows
                    summary = ", ".join(
                        f"{k.name}: {k.shared_bytes} B smem, {k.registers_per_thread} regs, "
                        f"{k.spill_bytes} B spills" for k in result.kernels)
                    echo(f"[{target.name} {index}/{len(pairs)}] {item.problem.label} "
                         f"{candidate.variant.name} {space.canonical(candidate.config)}: "
                         f"{result.status}"
                         f"{' (' + result.reason[:200] + ')' if result.reason else ''}"
                         f"{' | ' + summary if summary else ''}")
                file.flush()
    finally:
        compiler.close()
    verdicts = {(r["target"], r["problem_id"], r["variant"], r["config"]): r["status"]
                for r in rows}
    counts = {status: list(verdicts.values()).count(status)
              for status in ("ok", "unlaunchable", "compile_error")}
    echo(f"checked {len(pairs)} configs x {len(targets)} targets: {counts['ok']} ok, "
         f"{counts['unlaunchable']} unlaunchable, {counts['compile_error']} compile errors; "
         f"wrote {out_csv}")
    return rows


def read_verdicts(csv_path: Path) -> dict[tuple[str, str, str], tuple[str, str]]:
    """(problem_id, variant, config json) -> (status, reason) from a check CSV, per target
    merged: a config is refused if any of its kernels is."""
    verdicts: dict[tuple[str, str, str], tuple[str, str]] = {}
    with open(csv_path, newline="") as file:
        for row in csv.DictReader(file):
            key = (row["problem_id"], row["variant"], row["config"])
            if row["status"] != "ok" or key not in verdicts:
                verdicts[key] = (row["status"], row["reason"])
    return verdicts


def prune(plans: list, verdicts: dict[tuple[str, str, str], tuple[str, str]]) -> int:
    """Marks candidates the check refused as `skipped_static`; returns how many."""
    pruned = 0
    for item in plans:
        problem_id = space.problem_id(item.problem)
        for index, candidate in enumerate(item.candidates):
            verdict = verdicts.get((problem_id, candidate.variant.name,
                                    space.canonical(candidate.config)))
            if candidate.skip_reason is None and verdict and verdict[0] != "ok":
                item.candidates[index] = dataclasses.replace(
                    candidate, skip_reason=f"attnbench check: {verdict[0]}: {verdict[1]}",
                    skip_status="skipped_static")
                pruned += 1
    return pruned


def _check_in_child(sweep_path: str, target_name: str, out_csv: str,
                    shard: tuple[int, int]) -> None:
    """The static check in a spawned process that uses the CPU backend only."""
    import jax

    # Cross-compiling needs no GPU; holding none leaves the device to the sweep's workers.
    jax.config.update("jax_platforms", "cpu")
    run_check(Path(sweep_path), [cuda_check.TARGETS[target_name]], Path(out_csv), shard=shard,
              echo=lambda line: None)


def check_before_sweep(sweep_path: Path, run_dir: Path, device_kind: str,
                       shard: tuple[int, int], echo: Echo) -> dict | None:
    """On a GPU host: runs the check for this device's target in a CPU-only child process
    (so the sweep's parent never holds GPU memory) and returns its verdicts; reuses a
    finished check of an earlier attempt of the same run."""
    target = target_for_device(device_kind)
    if target is None:
        echo(f"no CUDA target known for {device_kind}; the static check is skipped")
        return None
    out_csv = run_dir / f"static_check-{target.name}.csv"
    done_marker = out_csv.with_suffix(".done")
    if not done_marker.exists():
        echo(f"checking the GPU configs for {target.name} before running them ({out_csv})")
        child = multiprocessing.get_context("spawn").Process(
            target=_check_in_child, args=(str(sweep_path), target.name, str(out_csv), shard))
        child.start()
        child.join()
        if child.exitcode != 0:
            echo(f"the static check failed (exit code {child.exitcode}); running every config")
            return None
        done_marker.write_text(json.dumps({"target": target.name}))
    return read_verdicts(out_csv)
