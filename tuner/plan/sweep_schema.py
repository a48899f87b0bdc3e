"""The sweep file's schema: pydantic models of each section, with the project's own wording.

:mod:`sweep_file` validates a file against these models and then builds the problems and
variant plans; the models of ``timing`` and ``search`` are also the settings a run uses.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import pydantic
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from attnbench.kernels import registry
from attnbench.kernels.inputs import SUPPORTED_DTYPES
from attnbench.kernels.random_inputs import LENGTH_DISTRIBUTIONS
from attnbench.kernels.schema import (Boolean, NonNegativeInt, NonNegativeNumber, PositiveInt,
                                      PositiveNumber, one_of)

from .presets import MODEL_PRESETS

STRATEGIES = ("grid", "random", "halving")



class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Timing(_Strict):
    """How each config is timed."""

    warmup: NonNegativeInt = 2
    repeats: PositiveInt = 10
    max_seconds: PositiveNumber | None = 2.0  # time budget of the timed calls of one config
    timeout_s: PositiveNumber = 300.0  # wall clock of one config: compile, check and timing
    setup_timeout_s: PositiveNumber = 900.0  # preparing a problem: inputs and the reference
    # The clock (auto: the device's own via the profiler on GPU/TPU, wall on CPU) and the
    # cache state of each timed call (auto: cold on GPU, rotated inputs elsewhere).
    timer: Literal["auto", "profiler", "wall"] = "auto"
    cache: Literal["auto", "cold", "warm"] = "auto"


def _share(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise ValueError(f"must be a share in (0, 1), got {value!r}")
    return value


def _at_least_two(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, int) or value < 2:
        raise ValueError(f"must be an int >= 2, got {value!r}")
    return value


class Search(_Strict):
    """Which configs are timed, and how long."""

    strategy: one_of(*STRATEGIES) = "grid"
    samples: PositiveInt = 8  # random: configs per variant and problem (plus the default)
    keep: Annotated[Any, pydantic.AfterValidator(_share)] = 0.25  # halving: share kept
    rounds: Annotated[Any, pydantic.AfterValidator(_at_least_two)] = 2  # halving: rounds
    first_repeats: PositiveInt = 3  # halving: timed calls per config in the first round


class SelectSchema(_Strict):
    noise: NonNegativeNumber = 0.03


def _expression_list(value: Any) -> Any:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ValueError("must be a list of expressions")
    return value


class VariantSchema(_Strict):
    grid: dict[str, Any] | None = None
    constraints: Annotated[list[Any], BeforeValidator(_expression_list)] = []
    samples: PositiveInt | None = None


class AllOtherVariantsSchema(_Strict):
    """`"*"`: every registered variant the file does not name (no grid: tunables differ)."""

    constraints: Annotated[list[Any], BeforeValidator(_expression_list)] = []
    samples: PositiveInt | None = None


def none_is_empty(value: Any) -> Any:
    return {} if value is None else value


class OpSchema(_Strict):
    problems: list[Any] | None = None
    variants: Annotated[dict[str, Any], BeforeValidator(none_is_empty)] | None = None


def _devices(value: Any) -> Any:
    if not isinstance(value, list) or not value or not all(isinstance(d, str) and d for d in value):
        raise ValueError("must be a non-empty list of device kinds or patterns "
                         "(e.g. [cpu], [nvidia-h100], ['tpu-v5*'], ['*'])")
    return value


def _string(value: Any) -> Any:
    if not isinstance(value, str):
        raise ValueError("must be a string")
    return value


class SweepFileSchema(_Strict):
    name: Annotated[Any, pydantic.AfterValidator(_string)] = None
    description: str = ""
    devices: Annotated[Any, pydantic.AfterValidator(_devices)]
    seed: NonNegativeInt = 0
    timing: Annotated[Timing, BeforeValidator(none_is_empty)] = Timing()
    search: Annotated[Search, BeforeValidator(none_is_empty)] = Search()
    tolerances: Annotated[dict[one_of(*SUPPORTED_DTYPES), PositiveNumber],
                          BeforeValidator(none_is_empty)] = {}
    select: Annotated[SelectSchema, BeforeValidator(none_is_empty)] = SelectSchema()
    # Each operator's section is checked on its own (see _parse), so that the errors of every
    # section are reported even when another part of the file is wrong.
    ops: Annotated[dict[str, Any], BeforeValidator(none_is_empty)]


def _context(value: Any) -> Any:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 2**31:
        raise ValueError(f"must be below 2**31 (positions are int32 in every kernel), "
                         f"got {value}")
    return value


Context = Annotated[PositiveInt, pydantic.AfterValidator(_context)]


def _model_name(value: Any) -> Any:
    if value not in MODEL_PRESETS:
        raise ValueError(f"unknown model preset {value!r}; known: {sorted(MODEL_PRESETS)}")
    return value


ModelName = Annotated[Any, pydantic.AfterValidator(_model_name)]


def problem_entry_schema(op: str) -> type[BaseModel]:
    """The schema of one problem entry of `op`: every field one value or a list of them."""
    def axis(field_type):
        wrap = BeforeValidator(lambda v: v if isinstance(v, list) else [v])
        return (Annotated[list[field_type], wrap, Field(min_length=1)] | None, None)

    common = {
        "model": ModelName, "q_heads": PositiveInt,
        "kv_heads": PositiveInt, "head_dim": PositiveInt,
        "sliding_window": PositiveInt | None, "logits_soft_cap": PositiveNumber | None,
        "sinks": Boolean, "dtype": one_of(*SUPPORTED_DTYPES), "context": Context,
        "lengths": one_of(*LENGTH_DISTRIBUTIONS), "min_len": NonNegativeInt,
    }
    own = {name: field_type for name, (field_type, _) in
           registry.get_operator(op).problem_class.sweep_fields.items()}
    fields = {name: axis(field_type) for name, field_type in {**common, **own}.items()}
    return pydantic.create_model(f"{op}_problem_entry", __base__=_Strict, **fields)
