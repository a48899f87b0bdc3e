"""`attnbench check --target tpu:v5e|v6e`: compile every Pallas TPU config of a sweep through
Mosaic (libtpu's compile-only devices), before any TPU time is spent; report VMEM per config.

Like the GPU check: each config is traced, each distinct program (:func:`tpu_check.program_key`)
is compiled once, in parallel processes, and the verdicts are cached on disk
(:mod:`compile_cache`).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from ..plan import space
from ..plan.sweep_file import load_sweep
from . import compile_cache, tpu_check
from .static_check import Compiler, Echo, default_jobs

CSV_COLUMNS = ("problem_id", "problem", "variant", "config", "target", "status", "reason",
               "vmem_bytes", "vmem_budget_bytes", "vmem_source")
VMEM_SOURCE = "kernel estimate"  # see tpu_check: the executable does not report VMEM


def default_csv_path(sweep_path: Path, targets: list[tpu_check.TpuTarget]) -> Path:
    names = "-".join(f"tpu-{target.name}" for target in targets)
    return Path("results") / "checks" / f"{Path(sweep_path).stem}-{names}.csv"


def checked_candidates(spec, shard: tuple[int, int]) -> list[tuple[Any, space.Candidate]]:
    """(problem plan, candidate) for every runnable config of a TPU-kernel variant."""
    from ..plan.planning import plan

    tpu_variants = {v.name for v in tpu_check.tpu_kernel_variants()}
    return [(item, candidate) for item in plan(spec, shard, "tpu")
            for candidate in item.candidates
            if candidate.skip_reason is None and candidate.variant.name in tpu_variants]


def _name(candidate) -> tuple[str, str]:
    """(op, variant name): variants of different operators may share a name."""
    return candidate.variant.op, candidate.variant.name


def _compile_task(problem, variant_name: str, config: dict[str, Any],
                  target: tpu_check.TpuTarget) -> str:
    from attnbench.kernels import registry

    variant = registry.get_variant(problem.op, variant_name)
    return tpu_check.compile_program(problem, variant_name, variant.config_class(**config), target)


def _check_target(pairs, target: tpu_check.TpuTarget, compiler: Compiler,
                  cache_dir: Path | None, echo: Echo) -> list[dict[str, Any]]:
    keys: list[str | None] = []
    verdicts: list[tuple[str, str]] = []
    for item, candidate in pairs:
        config = candidate.variant.config_class(**candidate.config)
        try:
            keys.append(tpu_check.program_key(item.problem.problem, candidate.variant.name,
                                              config, target))
            verdicts.append(("", ""))
        except Exception as error:  # noqa: BLE001 -- a config the launch code refuses is a result
            keys.append(None)
            verdicts.append(("compile_error", f"{type(error).__name__}: {error}"[:2000]))
    variants = {_name(candidate): candidate.variant for _, candidate in pairs}
    files = {name: compile_cache.cache_file(cache_dir, f"tpu-{target.name}", variant)
             for name, variant in variants.items()} if cache_dir is not None else {}
    known: dict[str, str] = {}
    for path in files.values():
        known.update({key: value["error"] for key, value in compile_cache.load(path).items()
                      if isinstance(value.get("error"), str)})
    first: dict[str, int] = {}
    for index, key in enumerate(keys):
        if key is not None and key not in known:
            first.setdefault(key, index)
    distinct = len({key for key in keys if key is not None})
    echo(f"[tpu:{target.name}] {len(pairs)} configs are {distinct} distinct programs; "
         f"{distinct - len(first)} are cached, compiling {len(first)}")
    chosen = list(first.values())
    tasks = [(pairs[i][0].problem.problem, pairs[i][1].variant.name, pairs[i][1].config, target)
             for i in chosen]
    fresh: dict[str, dict[str, dict[str, str]]] = {}
    for done, (task_index, error) in enumerate(compiler.map(tasks), 1):
        index = chosen[task_index]
        known[keys[index]] = error
        fresh.setdefault(_name(pairs[index][1]), {})[keys[index]] = {"error": error}
        if done % 25 == 0 or done == len(tasks):
            echo(f"[tpu:{target.name}] compiled {done}/{len(tasks)} programs")
            for name, results in fresh.items():
                if name in files:
                    compile_cache.store(files[name], results)
            fresh = {}
    rows = []
    for (item, candidate), key, (status, reason) in zip(pairs, keys, verdicts):
        config = candidate.variant.config_class(**candidate.config)
        vmem = tpu_check.vmem_estimate(item.problem.problem, config)
        if not status:
            error = known[key]
            status, reason = ("compile_error", error) if error else ("ok", "")
        granted = tpu_check.granted_vmem_bytes(config, target)
        if status == "ok" and vmem is not None and vmem > granted:
            status = "unlaunchable"
            reason = (f"needs ~{vmem} bytes of VMEM; {target.name} grants {granted}"
                      + (" by default" if granted == target.scoped_vmem_bytes else ""))
        rows.append({"problem_id": space.problem_id(item.problem), "problem": item.problem.label,
                     "variant": candidate.variant.name, "config": space.canonical(candidate.config),
                     "target": f"tpu:{target.name}", "status": status, "reason": reason,
                     "vmem_bytes": vmem, "vmem_budget_bytes": granted,
                     "vmem_source": VMEM_SOURCE if vmem is not None else ""})
    return rows


def run_check(sweep_path: Path, targets: list[tpu_check.TpuTarget], out_csv: Path, *,
              shard: tuple[int, int] = (0, 1), limit: int | None = None, echo: Echo = print,
              jobs: int | None = None, cache_dir: Path | None = None,
              use_cache: bool = True) -> list[dict[str, Any]]:
    """Checks the sweep's TPU-kernel configs for each target; writes and returns the CSV rows."""
    pairs = checked_candidates(load_sweep(sweep_path), shard)
    if limit is not None:
        taken: dict[tuple[str, str], int] = {}
        kept = []
        for item, candidate in pairs:
            taken[_name(candidate)] = taken.get(_name(candidate), 0) + 1
            if taken[_name(candidate)] <= limit:
                kept.append((item, candidate))
        pairs = kept
    if not pairs:
        echo(f"{sweep_path}: no config of a TPU-kernel variant to check")
    jobs = default_jobs() if jobs is None else jobs
    if jobs < 1:
        raise ValueError(f"jobs: must be at least 1, not {jobs}")
    folder = (cache_dir or compile_cache.default_cache_dir()) if use_cache else None
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    compiler = Compiler(jobs if pairs else 1, _compile_task)
    try:
        with open(out_csv, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=CSV_COLUMNS)
            writer.writeheader()
            for target in targets:
                target_rows = _check_target(pairs, target, compiler, folder, echo)
                writer.writerows(target_rows)
                file.flush()
                rows += target_rows
                for index, row in enumerate(target_rows, 1):
                    vmem = (f" | VMEM ~{row['vmem_bytes'] / 2**20:.2f} MiB ({row['vmem_source']}) "
                            f"of {row['vmem_budget_bytes'] / 2**20:.0f} MiB"
                            if row["vmem_bytes"] is not None else "")
                    echo(f"[tpu:{target.name} {index}/{len(target_rows)}] {row['problem']} "
                         f"{row['variant']} {row['config']}: {row['status']}"
                         f"{' (' + row['reason'][:200] + ')' if row['reason'] else ''}{vmem}")
    finally:
        compiler.close()
    counts = {status: sum(r["status"] == status for r in rows)
              for status in ("ok", "unlaunchable", "compile_error")}
    echo(f"checked {len(pairs)} configs x {len(targets)} targets: {counts['ok']} ok, "
         f"{counts['unlaunchable']} unlaunchable, {counts['compile_error']} compile errors; "
         f"wrote {out_csv}")
    return rows
