"""What a kernel variant is: the record each variant module exports as ``VARIANT``.

The list of all variants is :mod:`attnbench.kernels.registry`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax

from .inputs import FEATURES, SUPPORTED_DTYPES
from .peers import PeerOrigin
from .tunables import KernelConfig

PLATFORMS = ("cpu", "gpu", "tpu")


class UnsupportedError(ValueError):
    """A variant was asked for something it cannot do (a feature, dtype or platform)."""


@dataclasses.dataclass(frozen=True)
class Variant:
    """One kernel implementation of one operator.

    `op` names its operator (:data:`attnbench.kernels.registry.OPERATORS`).
    `kernel(args, config, interpret=...)` takes the operator's normalized arguments (its
    ``inputs.prepare``) and returns the output in any float dtype; the operator casts it to
    the query's.
    """

    name: str
    op: str
    platforms: tuple[str, ...]  # where it compiles natively
    interpretable: bool  # whether `interpret=True` runs it on a CPU through an interpreter
    features: frozenset[str]
    config_class: type[KernelConfig]
    kernel: Callable[..., jax.Array]
    heuristic: Callable[[Any], KernelConfig]  # shape -> a good default config
    description: str
    dtypes: tuple[str, ...] = SUPPORTED_DTYPES
    # For variants that need something only the running machine can tell (a library built on
    # first use): returns why the variant cannot run here, or None when it can.
    available: Callable[[], str | None] | None = None
    # For variants that run only some shapes of their operator beyond features and dtype (a
    # cache dtype, say): returns why it cannot run `shape`, or None when it can.
    shape_support: Callable[[Any], str | None] | None = None
    # A kernel another project ships, wrapped to the operator's contract (kernels/peers.py).
    peer: PeerOrigin | None = None
    # For a kernel whose argument layout differs from the operator's: `convert_inputs(args)`
    # builds the arrays it reads instead (a tuple), `run_converted(args, converted, config,
    # interpret=...)` runs it on them. Benchmarks convert once per input set, untimed, and
    # time `run_converted` alone, as a user who keeps the cache in that layout would run it;
    # `kernel` then does both.
    convert_inputs: Callable[[Any], tuple] | None = None
    run_converted: Callable[..., jax.Array] | None = None
    conversion: str = ""  # what the conversion does, in words, for reports

    def __post_init__(self) -> None:
        assert set(self.platforms) <= set(PLATFORMS), self.platforms
        assert set(self.features) <= set(FEATURES), self.features
        assert (self.convert_inputs is None) == (self.run_converted is None) == (
            not self.conversion), f"{self.name}: conversion hooks and text go together"

    def unsupported_reason(self, shape: Any, platform: str, interpret: bool) -> str | None:
        """Why this variant cannot run `shape` here, or None if it can."""
        missing = sorted(shape.features - self.features)
        if missing:
            return f"variant {self.name!r} does not support {', '.join(missing)}"
        if shape.dtype not in self.dtypes:
            return f"variant {self.name!r} does not support dtype {shape.dtype}"
        if self.shape_support is not None:
            refused = self.shape_support(shape)
            if refused:
                return f"variant {self.name!r} {refused}"
        if interpret and not self.interpretable:
            return f"variant {self.name!r} has no interpreter mode (interpret=True)"
        if not interpret and platform not in self.platforms:
            hint = " (pass interpret=True to run it in an interpreter)" if self.interpretable else ""
            return (
                f"variant {self.name!r} runs on {list(self.platforms)}, not on {platform}{hint}"
            )
        return self.unavailable_reason()

    def unavailable_reason(self) -> str | None:
        """Why this machine cannot run the variant at all (its `available` hook, or the
        peer's project missing), or None."""
        if self.peer is not None:
            missing = self.peer.missing_reason()
            if missing:
                return missing
        return None if self.available is None else self.available()

    def default_config(self, shape: Any) -> KernelConfig:
        """The heuristic config for `shape`, clamped so it is valid for it."""
        return self.heuristic(shape).clamp(shape)

    def describe(self) -> dict[str, Any]:
        """A JSON-ready description (used by `attnbench list --format json`)."""
        return {
            "name": self.name,
            "op": self.op,
            "platforms": list(self.platforms),
            "interpretable": self.interpretable,
            "features": sorted(self.features),
            "dtypes": list(self.dtypes),
            "config_space": self.config_class.space(),
            "description": self.description,
            "unavailable": self.unavailable_reason(),
            "peer": None if self.peer is None else self.peer.describe(),
            "input_conversion": self.conversion or None,
        }
