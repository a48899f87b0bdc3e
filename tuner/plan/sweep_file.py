"""Sweep files: the YAML schema, its loader, and errors located by their path in the file.

A sweep file says which devices it is for, how to time, and per operator which problems to
run and which variants to try with which grids and constraints::

    name: cpu
    devices: [cpu]                  # normalized device kinds or fnmatch patterns ("tpu-v5*")
    seed: 0
    timing: {warmup: 2, repeats: 10, max_seconds: 2.0, timeout_s: 300}
    search: {strategy: halving, keep: 0.3, rounds: 2, first_repeats: 3}   # or grid / random
    tolerances: {bfloat16: 0.02}    # relative error bound per dtype (default: the gate's)
    select: {noise: 0.03}           # a config this close to the default does not replace it
    ops:
      decode:
        problems:
          - {model: llama-3-8b, batch: [1, 8], context: [2048, 8192], lengths: uniform}
          - {q_heads: 8, kv_heads: 1, head_dim: 64, batch: 4, context: 1024}
        variants:
          reference: {}
          xla_blocked:
            grid: {kv_block_size: [128, 256, 512]}
            constraints: ["kv_block_size <= max_len"]
          "*": {samples: 4}         # every other registered variant: 4 random configs
                                    # (peer variants only where the file names them)

Every scalar problem axis may be a list; lists are crossed. Problem fields: ``model`` (a
preset of presets.MODEL_PRESETS) or ``q_heads``/``kv_heads``/``head_dim``; ``sliding_window``,
``logits_soft_cap``, ``sinks`` (override the preset); ``dtype``, ``context`` (the cache length
or longest context), ``lengths`` (fixed / uniform / long_tail), ``min_len``; decode: ``batch``,
``random_start``; paged: ``num_seqs``, ``page_size``, ``prefill_fraction`` (the mixed
prefill/decode ratio), ``prefill_chunk``, ``padding_tokens`` (each op's problem class lists
its own in ``sweep_fields``).

A variant's ``grid`` lists values per tunable (tunables left out keep their default; no grid
at all: the config's own sweep choices); ``samples: N`` draws N configs from that grid, the
same ones for problems that differ only in batch and context sizes (space.sample_seed);
``constraints`` are expressions (tuner/expressions.py) over tunables and problem sizes
(:func:`constraint_names`). A variant named in the file but not registered is reported as a
warning and left out, so a sweep written ahead of a variant picks it up when it lands.

The file's structure is a pydantic schema; every error is reported with its location in
the file (``ops.decode.problems[2].batch[1]: must be a positive int, got 'x'``).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import importlib.resources
import itertools
from pathlib import Path
from typing import Any

import pydantic
import yaml
from pydantic import BaseModel

from attnbench.kernels import limited_files
from attnbench.kernels.devices import fallback_names, family_of

from attnbench.kernels import registry
from attnbench.kernels.schema import located_problems
from attnbench.kernels.variant import Variant

from . import expressions
from .presets import MODEL_PRESETS
from .sweep_schema import (AllOtherVariantsSchema, OpSchema, Search, SweepFileSchema, Timing,
                           VariantSchema, none_is_empty, problem_entry_schema)

__all__ = ["Search", "SweepFileError", "SweepProblem", "SweepSpec", "Timing", "VariantPlan",
           "load_sweep", "problem_from_entry", "sweep_for_device", "sweeps_dir"]

ALL_OTHER_VARIANTS = "*"

# Names a constraint may read besides the variant's tunables and the op's own sizes.
_COMMON_NAMES = ("q_heads", "kv_heads", "head_dim", "group_size", "dtype_bytes", "max_len",
                 "has_sliding_window", "has_logits_soft_cap", "has_sinks")


def constraint_names(op: str) -> tuple[str, ...]:
    """The problem-size names a constraint of `op` may use (besides tunables)."""
    return _COMMON_NAMES + registry.get_operator(op).constraint_sizes_names


class SweepFileError(ValueError):
    """A sweep file with schema problems; `problems` lists each with its location."""

    def __init__(self, path: str, problems: list[str]):
        self.problems = problems
        shown = "\n  ".join(problems)
        super().__init__(f"{path}: {len(problems)} problem(s):\n  {shown}")


# ---- What a parsed file is ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class VariantPlan:
    """What the file asks of one variant: a grid (None: the config's own choices)."""

    op: str
    variant: Variant
    grid: dict[str, list] | None
    constraints: tuple[expressions.Expression, ...]
    samples: int | None  # a random sample of this many configs, overriding the strategy


@dataclasses.dataclass(frozen=True)
class SweepProblem:
    """One problem of the sweep, with the preset it came from (for reports)."""

    op: str
    problem: Any  # the op's problem class (registry.get_operator(op).problem_class)
    model: str  # preset name, or "" for explicit shapes
    location: str  # where in the file it came from

    @property
    def label(self) -> str:
        p = self.problem
        name = self.model or f"Hq{p.q_heads}/Hkv{p.kv_heads}/D{p.head_dim}"
        return f"{self.op} {name} {p.size_text()} {p.lengths} {p.dtype}"


@dataclasses.dataclass(frozen=True)
class SweepSpec:
    path: str
    name: str
    description: str
    devices: tuple[str, ...]
    seed: int
    timing: Timing
    search: Search
    tolerances: dict[str, float]  # the file's bounds per dtype; others take the gate's own
    noise: float
    problems: tuple[SweepProblem, ...]
    variants: dict[str, tuple[VariantPlan, ...]]  # per op
    sha256: str
    warnings: tuple[str, ...]

    def matches_device(self, device_kind: str, raw_kind: str = "") -> bool:
        return device_matches(self.devices, device_kind, raw_kind)


def device_matches(patterns: tuple[str, ...], device_kind: str, raw_kind: str = "") -> bool:
    """Whether a normalized kind (or the raw device kind) matches any name or pattern, or
    the file names the kind's chip family ('nvidia-hopper') or platform ('gpu') outright."""
    names = {device_kind.lower(), raw_kind.lower()} - {""}
    if any(fnmatch.fnmatchcase(name, pattern.lower()) for pattern in patterns for name in names):
        return True
    return bool(set(fallback_names(device_kind.lower())) & {p.lower() for p in patterns})


# ---- Problems -------------------------------------------------------------------------------


def _entry_problems(error: pydantic.ValidationError, entry: dict, where: str) -> list[str]:
    """Located errors of a problem entry; a scalar field's errors carry no [0]."""
    lines = []
    for line in located_problems(error, (where,)):
        for name, value in entry.items():
            if not isinstance(value, list):
                line = line.replace(f"{where}.{name}[0]:", f"{where}.{name}:")
        lines.append(line)
    return lines


def _problems_of(op: str, entries: Any, where: str, problems: list[str]) -> list[SweepProblem]:
    if entries is None:
        return []
    schema = problem_entry_schema(op)
    built = []
    for index, entry in enumerate(entries):
        at = f"{where}[{index}]"
        if not isinstance(entry, dict) or not entry:
            problems.append(f"{at}: must be a non-empty mapping of problem fields")
            continue
        axes = None
        try:
            axes = {name: values for name, values in
                    schema.model_validate(entry).model_dump(exclude_none=True).items()}
        except pydantic.ValidationError as error:
            problems += [line.replace(": unknown field",
                                      f": unknown field; allowed: {list(schema.model_fields)}")
                         for line in _entry_problems(error, entry, at)]
        missing = []
        if "model" not in entry:
            missing += [f"{at}: needs `model` or an explicit `{name}`"
                        for name in ("q_heads", "kv_heads", "head_dim") if name not in entry]
        if "context" not in entry:
            missing.append(f"{at}: needs `context` (the cache length / longest context)")
        problems += missing
        if axes is None or missing:
            continue
        # `sliding_window: null` / `logits_soft_cap: null` turn a preset's feature off.
        axes.update({name: [None] for name in ("sliding_window", "logits_soft_cap")
                     if name in entry and entry[name] is None})
        crossed = 1
        for values in axes.values():
            crossed *= max(len(values), 1) if isinstance(values, (list, tuple)) else 1
        if crossed + len(built) > MAX_PROBLEMS:
            problems.append(f"{at}: its lists cross into {crossed} problems; a sweep file may "
                            f"hold at most {MAX_PROBLEMS} (split it, or shorten the lists)")
            continue
        for combination in itertools.product(*axes.values()):
            problem = _build_problem(op, dict(zip(axes, combination)), at, problems)
            if problem is not None:
                built.append(problem)
    return built


def problem_from_entry(op: str, entry: dict[str, Any], where: str = "problem") -> SweepProblem:
    """One problem from a problem entry written as in a sweep file, with scalar fields only.

    `attnbench bench` uses it so `--set model=starcoder-15b` means what it means in a sweep.
    Raises SweepFileError naming each bad field.
    """
    problems = [f"{where}.{name}: must be one value here, got the list {value!r}"
                for name, value in entry.items() if isinstance(value, list)]
    built = [] if problems else _problems_of(op, [entry], where, problems)
    if problems:
        raise SweepFileError(where, [p.replace(f"{where}[0]", where) for p in problems])
    return built[0]


def _build_problem(op: str, fields: dict[str, Any], where: str,
                   problems: list[str]) -> SweepProblem | None:
    problem_class = registry.get_operator(op).problem_class
    model = fields.pop("model", "")
    spec: dict[str, Any] = {name: default for name, (_, default)
                            in problem_class.sweep_fields.items()}
    if model:
        preset = MODEL_PRESETS[model]
        spec.update(q_heads=preset.q_heads, kv_heads=preset.kv_heads, head_dim=preset.head_dim,
                    sliding_window=preset.sliding_window,
                    logits_soft_cap=preset.logits_soft_cap, sinks=preset.sinks)
    spec.update(fields)
    spec["max_len"] = spec.pop("context")
    if spec["q_heads"] % spec["kv_heads"]:
        problems.append(f"{where}: q_heads {spec['q_heads']} must be a multiple of kv_heads "
                        f"{spec['kv_heads']}")
        return None
    if spec.get("min_len", 1) > spec["max_len"]:
        problems.append(f"{where}.min_len: must be <= context {spec['max_len']}, "
                        f"got {spec['min_len']}")
        return None
    try:
        problem = problem_class(**spec)
    except (TypeError, ValueError) as error:
        problems.append(f"{where}: {error}")
        return None
    return SweepProblem(op=op, problem=problem, model=model, location=where)


# ---- Variants ---------------------------------------------------------------------------------


def _variant_plan(op: str, variant: Variant, entry: Any, where: str, problems: list[str],
                  schema: type[BaseModel] = VariantSchema) -> VariantPlan | None:
    try:
        checked = schema.model_validate(none_is_empty(entry))
    except pydantic.ValidationError as error:
        problems += located_problems(error, (where,))
        return None
    before = len(problems)
    fields = {f.name: f for f in dataclasses.fields(variant.config_class)}
    grid = None
    if getattr(checked, "grid", None) is not None:
        grid = {}
        for name, values in checked.grid.items():
            at = f"{where}.grid.{name}"
            if name not in fields:
                problems.append(f"{at}: {variant.name!r} has no tunable {name!r}; its tunables "
                                f"are {list(fields) or 'none'}")
                continue
            if not isinstance(values, list) or not values:
                problems.append(f"{at}: must be a non-empty list of values")
                continue
            rule = fields[name].metadata["rule"]
            problems += [f"{at}[{position}]: must be {rule.text}, got {value!r}"
                         for position, value in enumerate(values) if not rule.check(value)]
            grid[name] = list(values)
    constraints = []
    known = set(fields) | set(constraint_names(op))
    for position, text in enumerate(checked.constraints):
        at = f"{where}.constraints[{position}]"
        try:
            expression = expressions.parse(text)
        except expressions.ExpressionError as error:
            problems.append(f"{at}: {text!r} {error}" if isinstance(text, str) else f"{at}: {error}")
            continue
        unknown = sorted(expression.names - known)
        if unknown:
            problems.append(f"{at}: unknown name(s) {unknown} in {text!r}; allowed: tunables "
                            f"{list(fields)} and sizes {list(constraint_names(op))}")
            continue
        constraints.append(expression)
    if len(problems) != before:
        return None
    return VariantPlan(op=op, variant=variant, grid=grid, constraints=tuple(constraints),
                       samples=checked.samples)


def _variants_of(op: str, entries: dict[str, Any], where: str, problems: list[str],
                 warnings: list[str]) -> tuple[VariantPlan, ...]:
    registered = {v.name: v for v in registry.variants(op)}
    plans = []
    for name, entry in entries.items():
        at = f"{where}.{name}"
        if name == ALL_OTHER_VARIANTS:
            continue
        if name not in registered:
            warnings.append(f"{at}: variant {name!r} is not registered (registered {op} "
                            f"variants: {sorted(registered)}); it is left out of this sweep")
            continue
        plan = _variant_plan(op, registered[name], entry, at, problems)
        if plan is not None:
            plans.append(plan)
    if ALL_OTHER_VARIANTS in entries:
        at = f"{where}.{ALL_OTHER_VARIANTS}"
        for name, variant in registered.items():
            # Peers (other projects' kernels) take part only where a file names them.
            if name in entries or variant.peer is not None:
                continue
            # A constraint naming one variant's tunable cannot apply to all; only sizes here.
            plan = _variant_plan(op, variant, entries[ALL_OTHER_VARIANTS], at, problems,
                                 AllOtherVariantsSchema)
            if plan is not None:
                plans.append(plan)
    if not any(p.variant.name == "reference" for p in plans) and "reference" in registered:
        # Speedups are stated over the reference, so it is always measured.
        plans.insert(0, VariantPlan(op, registered["reference"], None, (), None))
    return tuple(plans)


# ---- The whole file -------------------------------------------------------------------------


def _parse(data: Any, path: str, sha256: str) -> tuple[SweepSpec | None, list[str], list[str]]:
    if not isinstance(data, dict):
        return None, ["(top level): must be a mapping with devices, ops, ..."], []
    problems: list[str] = []
    warnings: list[str] = []
    checked = None
    try:
        checked = SweepFileSchema.model_validate(data)
    except pydantic.ValidationError as error:
        problems += located_problems(error)
    ops = data.get("ops") if isinstance(data.get("ops"), dict) else {}
    if not ops and not any(p.startswith("ops") for p in problems):
        problems.append("ops: must name at least one operator "
                        f"({', '.join(registry.OPERATOR_NAMES)})")
    sweep_problems: list[SweepProblem] = []
    variants: dict[str, tuple[VariantPlan, ...]] = {}
    for op, raw_section in ops.items():
        if op not in registry.OPERATOR_NAMES:
            problems.append(f"ops.{op}: unknown field; allowed: {list(registry.OPERATOR_NAMES)}")
            continue
        try:
            section = OpSchema.model_validate(none_is_empty(raw_section))
        except pydantic.ValidationError as error:
            problems += located_problems(error, ("ops", op))
            continue
        if section.problems is None:
            problems.append(f"ops.{op}.problems: must list at least one problem")
        sweep_problems += _problems_of(op, section.problems, f"ops.{op}.problems", problems)
        if section.variants is None:
            problems.append(f"ops.{op}.variants: must name the variants to try (reference, "
                            "... or '*' for every registered variant)")
        variants[op] = _variants_of(op, section.variants or {}, f"ops.{op}.variants", problems,
                                    warnings)
    if problems or checked is None:
        return None, problems, warnings
    spec = SweepSpec(
        path=path, name=checked.name if checked.name is not None else Path(path).stem,
        description=checked.description, devices=tuple(checked.devices), seed=checked.seed,
        timing=checked.timing, search=checked.search,
        tolerances=dict(checked.tolerances), noise=checked.select.noise,
        problems=tuple(sweep_problems), variants=variants, sha256=sha256,
        warnings=tuple(warnings),
    )
    return spec, [], warnings


# Each problem costs a worker process and every candidate's measurement.
MAX_PROBLEMS = 4096
# A sweep file is a page of YAML; more is a mistake (or an attack on the parser).
MAX_SWEEP_FILE_BYTES = 256 << 10


def _read(path: str | Path) -> tuple[Any, str, list[str]]:
    path = Path(path)
    try:
        text = limited_files.read_text(path, MAX_SWEEP_FILE_BYTES)
    except limited_files.FileLimitError as error:
        return None, "", [f"(file): {error}"]
    sha256 = hashlib.sha256(text.encode()).hexdigest()
    try:
        data = yaml.safe_load(text)
        limited_files.check_shape(data)
        return data, sha256, []
    except limited_files.FileLimitError as error:
        return None, sha256, [f"(file): {error}"]
    except RecursionError:
        return None, sha256, [f"(file): is nested more than {limited_files.MAX_DEPTH} levels deep"]
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"(line {mark.line + 1}, column {mark.column + 1})" if mark else "(file)"
        problem = getattr(error, "problem", None) or str(error)
        return None, sha256, [f"{where}: not valid YAML: {problem}"]


def read_sweep_data(path: str | Path) -> tuple[Any, str, list[str]]:
    """A sweep file's parsed YAML, its sha256 and the problems that kept it from parsing (the
    schema is not checked: :func:`load_sweep` does that)."""
    return _read(path)


def load_sweep(path: str | Path) -> SweepSpec:
    """Reads and checks a sweep file; SweepFileError lists every problem with its location."""
    data, sha256, problems = _read(path)
    if problems:
        raise SweepFileError(str(path), problems)
    spec, problems, _ = _parse(data, str(path), sha256)
    if problems:
        raise SweepFileError(str(path), problems)
    return spec


def sweep_problems_in_file(path: str | Path) -> list[str]:
    """Every schema problem of a sweep file, each prefixed with its location (empty: valid).

    Variants the file names that are not registered are warnings, not problems: see
    :func:`sweep_warnings_in_file`.
    """
    data, sha256, problems = _read(path)
    if problems:
        return problems
    return _parse(data, str(path), sha256)[1]


def sweep_warnings_in_file(path: str | Path) -> list[str]:
    """What a valid sweep file asks for that cannot run here (unregistered variants)."""
    data, sha256, problems = _read(path)
    if problems:
        return []
    return _parse(data, str(path), sha256)[2]


def sweeps_dir() -> Path:
    """The sweep files that ship with attnbench."""
    return Path(str(importlib.resources.files("attnbench") / "sweeps"))


def quick_sweep_path() -> Path:
    return sweeps_dir() / "quick.yaml"


@dataclasses.dataclass(frozen=True)
class DeviceSweep:
    """The shipped sweep file chosen for a device, and how it was matched."""

    path: Path
    match: str  # "exact", "pattern", "family <name>" or "generic <platform>"
    warning: str = ""  # set when the file was written for other chips


def sweep_for_device(device_kind: str, raw_kind: str = "") -> Path:
    """The shipped sweep file for this device (see :func:`choose_device_sweep`)."""
    return choose_device_sweep(device_kind, raw_kind).path


def choose_device_sweep(device_kind: str, raw_kind: str = "",
                        platform: str | None = None) -> DeviceSweep:
    """The shipped sweep file for this device: a file naming the kind beats one matching it
    by pattern, then one naming its chip family, then the platform's generic file (with a
    warning). On a GPU or TPU some file always serves; a CPU-side typo still fails.

    quick.yaml is never picked here (it is what `--quick` asks for).
    """
    by_match: dict[str, list[Path]] = {}
    fallbacks = fallback_names(device_kind, platform)
    for path in sorted(sweeps_dir().glob("*.yaml")):
        if path.name == "quick.yaml":
            continue
        data, _, problems = _read(path)
        if problems or not isinstance(data, dict) or not isinstance(data.get("devices"), list):
            continue
        patterns = tuple(str(d) for d in data["devices"])
        names = {p.lower() for p in patterns}
        if device_kind in patterns:
            by_match.setdefault("exact", []).append(path)
        elif any(fnmatch.fnmatchcase(name, p.lower()) for p in patterns
                 for name in {device_kind.lower(), raw_kind.lower()} - {""}):
            by_match.setdefault("pattern", []).append(path)
        else:
            for fallback in fallbacks:
                if fallback in names:
                    by_match.setdefault(fallback, []).append(path)
    for match in ("exact", "pattern"):
        if by_match.get(match):
            return DeviceSweep(by_match[match][0], match)
    for rank, fallback in enumerate(fallbacks):
        if by_match.get(fallback):
            path = by_match[fallback][0]
            is_family = rank == 0 and fallback == family_of(device_kind)
            what = "family" if is_family else "generic"
            warning = "" if is_family else (
                f"no sweep file is written for {device_kind!r} or its chip family; using the "
                f"generic {fallback} sweep {path.name} (write a sweep file for this chip for "
                "grids that suit it)")
            return DeviceSweep(path, f"{what} {fallback}", warning)
    raise FileNotFoundError(
        f"no sweep file under {sweeps_dir()} lists device {device_kind!r}; pass a sweep file "
        "(attnbench sweep FILE.yaml) or use --quick")
