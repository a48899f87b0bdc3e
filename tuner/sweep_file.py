"""Sweep files: the YAML schema, its loader, and errors located by their path in the file.

A sweep file says which devices it is for, how to time, and per operator which problems to
run and which variants to try with which grids and constraints::

    name: cpu
    devices: [cpu]                  # normalized device kinds or fnmatch patterns ("tpu-v5*")
    seed: 0
    timing: {warmup: 2, repeats: 10, max_seconds: 2.0, timeout_s: 300}
    search: {strategy: halving, keep: 0.3, rounds: 2, first_repeats: 3}   # or grid / random
    tolerances: {bfloat16: 0.02}    # relative error bound per dtype (default: accuracy.py)
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

Every scalar problem axis may be a list; lists are crossed. Problem fields: ``model`` (a
preset of problems.MODEL_PRESETS) or ``q_heads``/``kv_heads``/``head_dim``; ``sliding_window``,
``logits_soft_cap``, ``sinks`` (override the preset); ``dtype``, ``context`` (the cache length
or longest context), ``lengths`` (fixed / uniform / long_tail), ``min_len``; decode: ``batch``,
``random_start``; paged: ``num_seqs``, ``page_size``, ``prefill_fraction`` (the mixed
prefill/decode ratio), ``prefill_chunk``, ``padding_tokens``.

A variant's ``grid`` lists values per tunable (tunables left out keep their default; no grid
at all: the config's own sweep choices); ``samples: N`` draws N configs from that grid;
``constraints`` are expressions (tuner/expressions.py) over tunables and problem sizes
(:func:`constraint_names`). A variant named in the file but not registered is reported as a
warning and left out, so a sweep written ahead of a variant picks it up when it lands.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import itertools
from pathlib import Path
from typing import Any

import yaml

from attnbench.kernels import registry
from attnbench.kernels.inputs import SUPPORTED_DTYPES
from attnbench.kernels.variant import OPS, Variant

from . import expressions
from .accuracy import RELATIVE_ERROR_BOUND
from .problems import LENGTH_DISTRIBUTIONS, MODEL_PRESETS, DecodeProblem, PagedProblem

STRATEGIES = ("grid", "random", "halving")
ALL_OTHER_VARIANTS = "*"

# Names a constraint may read besides the variant's tunables (values from the problem's shape).
_COMMON_NAMES = ("q_heads", "kv_heads", "head_dim", "group_size", "dtype_bytes", "max_len",
                 "has_sliding_window", "has_logits_soft_cap", "has_sinks")
_OP_NAMES = {
    "decode": ("batch",),
    "paged": ("num_tokens", "num_seqs", "max_seqs", "pages_per_seq", "page_size", "num_pages",
              "prefill_fraction"),
}

_PROBLEM_FIELDS = {
    "common": ("model", "q_heads", "kv_heads", "head_dim", "sliding_window", "logits_soft_cap",
               "sinks", "dtype", "context", "lengths", "min_len"),
    "decode": ("batch", "random_start"),
    "paged": ("num_seqs", "page_size", "prefill_fraction", "prefill_chunk", "padding_tokens"),
}
_PROBLEM_DEFAULTS = {"decode": {"batch": 8}, "paged": {"num_seqs": 8}}


def constraint_names(op: str) -> tuple[str, ...]:
    """The problem-size names a constraint of `op` may use (besides tunables)."""
    return _COMMON_NAMES + _OP_NAMES[op]


class SweepFileError(ValueError):
    """A sweep file with schema problems; `problems` lists each with its location."""

    def __init__(self, path: str, problems: list[str]):
        self.problems = problems
        shown = "\n  ".join(problems)
        super().__init__(f"{path}: {len(problems)} problem(s):\n  {shown}")


@dataclasses.dataclass(frozen=True)
class Timing:
    warmup: int = 2
    repeats: int = 10
    max_seconds: float | None = 2.0  # time budget of the timed calls of one config
    timeout_s: float = 300.0  # wall clock of one config: compile, check and timing
    setup_timeout_s: float = 900.0  # preparing a problem: inputs and the reference


@dataclasses.dataclass(frozen=True)
class Search:
    strategy: str = "grid"
    samples: int = 8  # random: configs per variant and problem (the default comes on top)
    keep: float = 0.25  # halving: share of candidates kept after each round
    rounds: int = 2  # halving: timing rounds, the last with timing.repeats
    first_repeats: int = 3  # halving: timed calls per config in the first round


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
    problem: DecodeProblem | PagedProblem
    model: str  # preset name, or "" for explicit shapes
    location: str  # where in the file it came from

    @property
    def label(self) -> str:
        p = self.problem
        name = self.model or f"Hq{p.q_heads}/Hkv{p.kv_heads}/D{p.head_dim}"
        if self.op == "decode":
            size = f"B={p.batch} S={p.max_len}"
        else:
            size = (f"seqs={p.num_seqs} ctx={p.max_len} page={p.page_size} "
                    f"prefill={p.prefill_fraction:g}")
        return f"{self.op} {name} {size} {p.lengths} {p.dtype}"


@dataclasses.dataclass(frozen=True)
class SweepSpec:
    path: str
    name: str
    description: str
    devices: tuple[str, ...]
    seed: int
    timing: Timing
    search: Search
    tolerances: dict[str, float]
    noise: float
    problems: tuple[SweepProblem, ...]
    variants: dict[str, tuple[VariantPlan, ...]]  # per op
    sha256: str
    warnings: tuple[str, ...]

    def matches_device(self, device_kind: str, raw_kind: str = "") -> bool:
        return device_matches(self.devices, device_kind, raw_kind)


def device_matches(patterns: tuple[str, ...], device_kind: str, raw_kind: str = "") -> bool:
    """Whether a normalized kind (or the raw device kind) matches any name or pattern."""
    names = {device_kind.lower(), raw_kind.lower()} - {""}
    return any(fnmatch.fnmatchcase(name, pattern.lower()) for pattern in patterns for name in names)


# ---- The checking walker: every helper appends located problems and returns a value -----


class _Checker:
    def __init__(self) -> None:
        self.problems: list[str] = []
        self.warnings: list[str] = []

    def fail(self, where: str, text: str) -> None:
        self.problems.append(f"{where}: {text}")

    def mapping(self, value: Any, where: str, allowed: tuple[str, ...] | None = None) -> dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.fail(where, f"must be a mapping, got {type(value).__name__}")
            return {}
        if allowed is not None:
            for name in value:
                if name not in allowed:
                    self.fail(f"{where}.{name}", f"unknown field; allowed: {list(allowed)}")
        return value

    def integer(self, value: Any, where: str, minimum: int, default: int) -> int:
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            what = "a positive int" if minimum == 1 else f"an int >= {minimum}"
            self.fail(where, f"must be {what}, got {value!r}")
            return default
        return value

    def number(self, value: Any, where: str, default: float | None, *, positive: bool = True,
               allow_none: bool = False) -> float | None:
        if value is None:
            if allow_none:
                return None
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (
                value <= 0 if positive else value < 0):
            self.fail(where, f"must be a number {'> 0' if positive else '>= 0'}, got {value!r}")
            return default
        return float(value)


def _as_list(value: Any) -> list:
    return list(value) if isinstance(value, list) else [value]


# ---- Problems -------------------------------------------------------------------------------


def _check_problem_value(check: _Checker, op: str, name: str, value: Any, where: str) -> bool:
    """Whether one value of a problem axis is valid (a located problem is recorded if not)."""
    positive_ints = ("q_heads", "kv_heads", "head_dim", "context", "batch", "num_seqs",
                     "page_size", "prefill_chunk")
    before = len(check.problems)
    if name in positive_ints:
        check.integer(value, where, 1, 1)
    elif name in ("min_len", "padding_tokens"):
        check.integer(value, where, 0, 0)
    elif name == "sliding_window":
        if value is not None:
            check.integer(value, where, 1, 1)
    elif name == "logits_soft_cap":
        check.number(value, where, None, allow_none=True)
    elif name in ("sinks", "random_start"):
        if not isinstance(value, bool):
            check.fail(where, f"must be true or false, got {value!r}")
    elif name == "dtype":
        if value not in SUPPORTED_DTYPES:
            check.fail(where, f"must be one of {list(SUPPORTED_DTYPES)}, got {value!r}")
    elif name == "lengths":
        if value not in LENGTH_DISTRIBUTIONS:
            check.fail(where, f"must be one of {list(LENGTH_DISTRIBUTIONS)}, got {value!r}")
    elif name == "prefill_fraction":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            check.fail(where, f"must be a number in [0, 1], got {value!r}")
    elif name == "model":
        if value not in MODEL_PRESETS:
            check.fail(where, f"unknown model preset {value!r}; known: {sorted(MODEL_PRESETS)}")
    return len(check.problems) == before


def _problems_of(check: _Checker, op: str, entries: Any, where: str) -> list[SweepProblem]:
    if entries is None:
        return []
    if not isinstance(entries, list):
        check.fail(where, "must be a list of problem entries")
        return []
    allowed = _PROBLEM_FIELDS["common"] + _PROBLEM_FIELDS[op]
    problems = []
    for index, entry in enumerate(entries):
        at = f"{where}[{index}]"
        if not isinstance(entry, dict) or not entry:
            check.fail(at, "must be a non-empty mapping of problem fields")
            continue
        check.mapping(entry, at, allowed)
        axes: dict[str, list] = {}
        ok = True
        for name, value in entry.items():
            if name not in allowed:
                ok = False
                continue
            values = _as_list(value)
            if not values:
                check.fail(f"{at}.{name}", "must not be an empty list")
                ok = False
            for position, item in enumerate(values):
                item_at = f"{at}.{name}[{position}]" if isinstance(value, list) else f"{at}.{name}"
                ok &= _check_problem_value(check, op, name, item, item_at)
            axes[name] = values
        if "model" not in axes:
            for name in ("q_heads", "kv_heads", "head_dim"):
                if name not in axes:
                    check.fail(at, f"needs `model` or an explicit `{name}`")
                    ok = False
        if "context" not in axes:
            check.fail(at, "needs `context` (the cache length / longest context)")
            ok = False
        if not ok:
            continue
        for combination in itertools.product(*axes.values()):
            fields = dict(zip(axes, combination))
            problem = _build_problem(check, op, fields, at)
            if problem is not None:
                problems.append(problem)
    return problems


def problem_from_entry(op: str, entry: dict[str, Any], where: str = "problem") -> SweepProblem:
    """One problem from a problem entry written as in a sweep file, with scalar fields only.

    `attnbench bench` uses it so `--set model=starcoder-15b` means what it means in a sweep.
    Raises SweepFileError naming each bad field.
    """
    check = _Checker()
    for name, value in entry.items():
        if isinstance(value, list):
            check.fail(f"{where}.{name}", f"must be one value here, got the list {value!r}")
    problems = [] if check.problems else _problems_of(check, op, [entry], where)
    if check.problems:
        raise SweepFileError(where, [p.replace(f"{where}[0]", where) for p in check.problems])
    return problems[0]


def _build_problem(check: _Checker, op: str, fields: dict[str, Any],
                   where: str) -> SweepProblem | None:
    model = fields.pop("model", "")
    spec: dict[str, Any] = dict(_PROBLEM_DEFAULTS[op])
    if model:
        preset = MODEL_PRESETS[model]
        spec.update(q_heads=preset.q_heads, kv_heads=preset.kv_heads, head_dim=preset.head_dim,
                    sliding_window=preset.sliding_window,
                    logits_soft_cap=preset.logits_soft_cap, sinks=preset.sinks)
    spec.update(fields)
    spec["max_len"] = spec.pop("context")
    if spec["q_heads"] % spec["kv_heads"]:
        check.fail(where, f"q_heads {spec['q_heads']} must be a multiple of kv_heads "
                          f"{spec['kv_heads']}")
        return None
    if spec.get("min_len", 1) > spec["max_len"]:
        check.fail(f"{where}.min_len", f"must be <= context {spec['max_len']}, "
                                       f"got {spec['min_len']}")
        return None
    problem_class = DecodeProblem if op == "decode" else PagedProblem
    try:
        problem = problem_class(**spec)
    except (TypeError, ValueError) as error:
        check.fail(where, str(error))
        return None
    return SweepProblem(op=op, problem=problem, model=model, location=where)


# ---- Variants ---------------------------------------------------------------------------------


def _variant_plan(check: _Checker, op: str, variant: Variant, entry: dict,
                  where: str) -> VariantPlan | None:
    before = len(check.problems)
    fields = {f.name: f for f in dataclasses.fields(variant.config_class)}
    grid = None
    if "grid" in entry:
        raw = check.mapping(entry["grid"], f"{where}.grid")
        grid = {}
        for name, values in raw.items():
            at = f"{where}.grid.{name}"
            if name not in fields:
                check.fail(at, f"{variant.name!r} has no tunable {name!r}; its tunables are "
                               f"{list(fields) or 'none'}")
                continue
            if not isinstance(values, list) or not values:
                check.fail(at, "must be a non-empty list of values")
                continue
            rule = fields[name].metadata["rule"]
            for position, value in enumerate(values):
                if not rule.check(value):
                    check.fail(f"{at}[{position}]", f"must be {rule.text}, got {value!r}")
            grid[name] = list(values)
    constraints = []
    raw_constraints = entry.get("constraints") or []
    if not isinstance(raw_constraints, list):
        check.fail(f"{where}.constraints", "must be a list of expressions")
        raw_constraints = []
    known = set(fields) | set(constraint_names(op))
    for position, text in enumerate(raw_constraints):
        at = f"{where}.constraints[{position}]"
        try:
            expression = expressions.parse(text)
        except expressions.ExpressionError as error:
            check.fail(at, f"{text!r} {error}" if isinstance(text, str) else str(error))
            continue
        unknown = sorted(expression.names - known)
        if unknown:
            check.fail(at, f"unknown name(s) {unknown} in {text!r}; allowed: tunables "
                           f"{list(fields)} and sizes {list(constraint_names(op))}")
            continue
        constraints.append(expression)
    samples = None
    if entry.get("samples") is not None:
        samples = check.integer(entry["samples"], f"{where}.samples", 1, 1)
    if len(check.problems) != before:
        return None
    return VariantPlan(op=op, variant=variant, grid=grid, constraints=tuple(constraints),
                       samples=samples)


def _variants_of(check: _Checker, op: str, entries: Any, where: str) -> tuple[VariantPlan, ...]:
    entries = check.mapping(entries, where)
    registered = {v.name: v for v in registry.variants(op)}
    plans = []
    for name, entry in entries.items():
        at = f"{where}.{name}"
        if name == ALL_OTHER_VARIANTS:
            continue
        entry = check.mapping(entry, at, ("grid", "constraints", "samples"))
        if name not in registered:
            check.warnings.append(
                f"{at}: variant {name!r} is not registered (registered {op} variants: "
                f"{sorted(registered)}); it is left out of this sweep")
            continue
        plan = _variant_plan(check, op, registered[name], entry, at)
        if plan is not None:
            plans.append(plan)
    if ALL_OTHER_VARIANTS in entries:
        at = f"{where}.{ALL_OTHER_VARIANTS}"
        entry = check.mapping(entries[ALL_OTHER_VARIANTS], at, ("constraints", "samples"))
        for name, variant in registered.items():
            if name in entries:
                continue
            # A constraint naming one variant's tunable cannot apply to all; only sizes here.
            plan = _variant_plan(check, op, variant, entry, at)
            if plan is not None:
                plans.append(plan)
    if not any(p.variant.name == "reference" for p in plans) and "reference" in registered:
        # Speedups are stated over the reference, so it is always measured.
        plans.insert(0, VariantPlan(op, registered["reference"], None, (), None))
    return tuple(plans)


# ---- The whole file -------------------------------------------------------------------------

_TOP_FIELDS = ("name", "description", "devices", "seed", "timing", "search", "tolerances",
               "select", "ops")


def _parse(data: Any, path: str, sha256: str) -> tuple[SweepSpec | None, list[str], list[str]]:
    check = _Checker()
    if not isinstance(data, dict):
        return None, ["(top level): must be a mapping with devices, ops, ..."], []
    check.mapping(data, "(top level)", _TOP_FIELDS)
    name = data.get("name", Path(path).stem)
    if not isinstance(name, str):
        check.fail("name", "must be a string")
    description = data.get("description", "")
    devices = data.get("devices")
    if not isinstance(devices, list) or not devices or not all(
            isinstance(d, str) and d for d in devices):
        check.fail("devices", "must be a non-empty list of device kinds or patterns "
                              "(e.g. [cpu], [nvidia-h100], ['tpu-v5*'], ['*'])")
        devices = []
    seed = check.integer(data.get("seed"), "seed", 0, 0)

    raw = check.mapping(data.get("timing"), "timing", tuple(f.name for f in
                                                            dataclasses.fields(Timing)))
    timing = Timing(
        warmup=check.integer(raw.get("warmup"), "timing.warmup", 0, Timing.warmup),
        repeats=check.integer(raw.get("repeats"), "timing.repeats", 1, Timing.repeats),
        max_seconds=check.number(raw.get("max_seconds", Timing.max_seconds), "timing.max_seconds",
                                 Timing.max_seconds, allow_none=True),
        timeout_s=check.number(raw.get("timeout_s"), "timing.timeout_s", Timing.timeout_s),
        setup_timeout_s=check.number(raw.get("setup_timeout_s"), "timing.setup_timeout_s",
                                     Timing.setup_timeout_s),
    )
    raw = check.mapping(data.get("search"), "search", tuple(f.name for f in
                                                            dataclasses.fields(Search)))
    strategy = raw.get("strategy", "grid")
    if strategy not in STRATEGIES:
        check.fail("search.strategy", f"must be one of {list(STRATEGIES)}, got {strategy!r}")
        strategy = "grid"
    keep = check.number(raw.get("keep"), "search.keep", Search.keep)
    if keep is not None and keep >= 1:
        check.fail("search.keep", f"must be a share in (0, 1), got {keep!r}")
    search = Search(
        strategy=strategy,
        samples=check.integer(raw.get("samples"), "search.samples", 1, Search.samples),
        keep=keep,
        rounds=check.integer(raw.get("rounds"), "search.rounds", 2, Search.rounds),
        first_repeats=check.integer(raw.get("first_repeats"), "search.first_repeats", 1,
                                    Search.first_repeats),
    )
    tolerances = dict(RELATIVE_ERROR_BOUND)
    for dtype, bound in check.mapping(data.get("tolerances"), "tolerances",
                                      SUPPORTED_DTYPES).items():
        value = check.number(bound, f"tolerances.{dtype}", None)
        if value is not None and dtype in tolerances:
            tolerances[dtype] = value
    raw = check.mapping(data.get("select"), "select", ("noise",))
    noise = check.number(raw.get("noise"), "select.noise", 0.03, positive=False)

    ops = check.mapping(data.get("ops"), "ops", OPS)
    if not ops:
        check.fail("ops", "must name at least one operator (decode, paged)")
    problems: list[SweepProblem] = []
    variants: dict[str, tuple[VariantPlan, ...]] = {}
    for op, entry in ops.items():
        if op not in OPS:
            continue
        entry = check.mapping(entry, f"ops.{op}", ("problems", "variants"))
        op_problems = _problems_of(check, op, entry.get("problems"), f"ops.{op}.problems")
        if not op_problems and entry.get("problems") is None:
            check.fail(f"ops.{op}.problems", "must list at least one problem")
        problems += op_problems
        if entry.get("variants") is None:
            check.fail(f"ops.{op}.variants", "must name the variants to try (reference, ... or "
                                             "'*' for every registered variant)")
        variants[op] = _variants_of(check, op, entry.get("variants"), f"ops.{op}.variants")
    if check.problems:
        return None, check.problems, check.warnings
    spec = SweepSpec(
        path=path, name=name, description=description, devices=tuple(devices), seed=seed,
        timing=timing, search=search, tolerances=tolerances, noise=noise,
        problems=tuple(problems), variants=variants, sha256=sha256,
        warnings=tuple(check.warnings),
    )
    return spec, [], check.warnings


def _read(path: str | Path) -> tuple[Any, str, list[str]]:
    path = Path(path)
    try:
        text = path.read_bytes()
    except OSError as error:
        return None, "", [f"(file): cannot be read ({error})"]
    sha256 = hashlib.sha256(text).hexdigest()
    try:
        return yaml.safe_load(text), sha256, []
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"(line {mark.line + 1}, column {mark.column + 1})" if mark else "(file)"
        problem = getattr(error, "problem", None) or str(error)
        return None, sha256, [f"{where}: not valid YAML: {problem}"]


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
    return Path(__file__).resolve().parent.parent / "sweeps"


def quick_sweep_path() -> Path:
    return sweeps_dir() / "quick.yaml"


def sweep_for_device(device_kind: str, raw_kind: str = "") -> Path:
    """The shipped sweep file for this device: an exact name in `devices` beats a pattern.

    quick.yaml is never picked here (it is what `--quick` asks for).
    """
    exact, patterned = [], []
    for path in sorted(sweeps_dir().glob("*.yaml")):
        if path.name == "quick.yaml":
            continue
        data, _, problems = _read(path)
        if problems or not isinstance(data, dict) or not isinstance(data.get("devices"), list):
            continue
        patterns = tuple(str(d) for d in data["devices"])
        if device_kind in patterns:
            exact.append(path)
        elif device_matches(patterns, device_kind, raw_kind):
            patterned.append(path)
    if exact or patterned:
        return (exact or patterned)[0]
    raise FileNotFoundError(
        f"no sweep file under {sweeps_dir()} lists device {device_kind!r}; pass a sweep file "
        "(attnbench sweep FILE.yaml) or use --quick")
