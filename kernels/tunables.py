"""Kernel configs: frozen dataclasses whose fields carry their own valid range.

A variant's config is a subclass of :class:`KernelConfig` whose fields are declared with
:func:`tunable`. Each field knows its default, the values a sweep tries by default
(``choices``) and the rule any value must obey (``rule``), so an invalid config cannot be
built. Rules that involve several fields or the problem's shape live in the subclass's
``invalid_reason``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Self


@dataclasses.dataclass(frozen=True)
class Rule:
    """A predicate on one tunable value, with the words a user reads when it fails."""

    check: Callable[[Any], bool]
    text: str


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


POSITIVE_INT = Rule(lambda v: _is_int(v) and v > 0, "a positive int")
POWER_OF_TWO = Rule(lambda v: _is_int(v) and v > 0 and v & (v - 1) == 0, "a power of two")
BOOL = Rule(lambda v: isinstance(v, bool), "a bool")


def next_power_of_two(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(int(n) - 1, 0).bit_length()


def floor_power_of_two(n: int) -> int:
    """The largest power of two <= max(n, 1)."""
    return 1 << (max(int(n), 1).bit_length() - 1)


def cdiv(a, b):
    """ceil(a / b) for integers and b > 0: Python ints or traced integer arrays alike.

    Floor division of the negation rounds the other way, so no float is involved (exact
    for any size) and negative `a` rounds up too, as ceil does.
    """
    return -(-a // b)


def one_of(*values: Any) -> Rule:
    return Rule(lambda v: v in values, f"one of {list(values)}")


def int_in(low: int, high: int) -> Rule:
    """An int in [low, high]: for tunables that unroll (cost grows with the value, so a
    table entry must not be able to ask for thousands)."""
    return Rule(lambda v: _is_int(v) and low <= v <= high, f"an int in [{low}, {high}]")


def tunable(default: Any, choices: tuple, rule: Rule, doc: str = "") -> Any:
    """Declares a config field: its default, the values sweeps try, and its rule."""
    return dataclasses.field(
        default=default, metadata={"choices": tuple(choices), "rule": rule, "doc": doc}
    )


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Base class of every variant's config. Subclasses add ``tunable`` fields."""

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            rule: Rule = field.metadata["rule"]
            value = getattr(self, field.name)
            if not rule.check(value):
                raise ValueError(
                    f"{type(self).__name__}.{field.name} must be {rule.text}, got {value!r}"
                )

    # Hooks a variant overrides. `shape` is a DecodeShape or PagedShape.
    def invalid_reason(self, shape: Any) -> str | None:
        """Why this config cannot run on `shape` (cross-field rules), or None."""
        return None

    def clamp(self, shape: Any) -> Self:
        """The nearest config that suits `shape` (used when a tuned entry is reused)."""
        return self

    # Helpers shared by all configs.
    @classmethod
    def tunable_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def space(cls) -> dict[str, dict[str, Any]]:
        """Each tunable's default, default sweep choices and rule, for people and tools."""
        return {
            f.name: {
                "default": f.default,
                "choices": list(f.metadata["choices"]),
                "rule": f.metadata["rule"].text,
                "doc": f.metadata["doc"],
            }
            for f in dataclasses.fields(cls)
        }

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> Self:
        """Builds a config from a mapping, refusing names the config does not have."""
        unknown = sorted(set(values) - set(cls.tunable_names()))
        if unknown:
            raise ValueError(
                f"config: unknown tunable(s) {unknown} for {cls.__name__}; "
                f"valid names are {list(cls.tunable_names())}"
            )
        return cls(**dict(values))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> Self:
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class NoConfig(KernelConfig):
    """The config of a variant with nothing to tune (the reference)."""

    EMPTY: ClassVar[bool] = True


def grid_configs(config_class: type[KernelConfig], shape: Any,
                 grid: dict[str, list] | None = None) -> list[KernelConfig]:
    """Every valid config of the product of `grid` (default: each tunable's choices).

    Tunables missing from `grid` keep their default. Combinations that break a field rule or
    the config's `invalid_reason(shape)` are left out.
    """
    import itertools

    space = config_class.space()
    grid = {name: list(values) for name, values in (grid or {n: s["choices"] for n, s in space.items()}).items()}
    names = list(grid)
    configs = []
    for values in itertools.product(*(grid[name] for name in names)):
        try:
            config = config_class(**dict(zip(names, values)))
        except (ValueError, TypeError):
            continue
        if config.invalid_reason(shape) is None:
            configs.append(config)
    return configs


def sample_configs(config_class: type[KernelConfig], shape: Any, count: int,
                   seed: int) -> list[KernelConfig]:
    """Up to `count` distinct valid configs drawn at random (seeded) from the choices grid."""
    import random

    configs = grid_configs(config_class, shape)
    return random.Random(seed).sample(configs, min(count, len(configs)))
