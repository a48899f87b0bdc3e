"""The JAX APIs whose spelling moved between the JAX versions attnbench supports (0.10.2
and up, 0.11 included): every version-dependent access goes through here.

Each accessor tries the current spelling first, then the older one, so a JAX release that
renames something breaks this one module, not the operators.
"""

from __future__ import annotations

import re
from typing import Any

import jax


def tracer_type() -> type:
    """The class of traced values (``jax.core.Tracer``; only ``jax._src.core`` once the
    public alias is gone)."""
    public = getattr(jax.core, "Tracer", None)
    if public is not None:
        return public
    from jax._src import core  # noqa: PLC0415 -- the alias was removed from jax.core

    return core.Tracer


def is_tracer(value: Any) -> bool:
    return isinstance(value, tracer_type())


def backends_initialized() -> bool:
    """Whether this process has already created a JAX backend (checked without creating
    one: on a TPU, creating it takes the chip)."""
    from jax._src import xla_bridge  # noqa: PLC0415 -- no public query exists

    check = getattr(xla_bridge, "backends_are_initialized", None)
    if check is not None:
        return bool(check())
    return bool(getattr(xla_bridge, "_backends", {}))


def tpu_compiler_params(**fields: Any) -> Any:
    """Mosaic's compiler parameters (``pltpu.CompilerParams``; ``TPUCompilerParams`` in
    older releases)."""
    from jax.experimental.pallas import tpu as pltpu  # noqa: PLC0415 -- optional import

    params = getattr(pltpu, "CompilerParams", None) or getattr(pltpu, "TPUCompilerParams")
    return params(**fields)


def hlo_module_name(compiled: Any) -> str:
    """The HLO module name of an AOT-compiled call, which the profiler puts on the device
    events of its executions (``hlo_module``)."""
    text = compiled.as_text()
    found = re.match(r"\s*HloModule\s+([^\s,]+)", text or "")
    if not found:
        raise ValueError("the compiled call's HLO text names no module")
    return found.group(1)


def compile_with_device_events(lowered: Any, platform: str) -> Any:
    """Compiles `lowered`; on a CPU, asks XLA:CPU for per-execution profiler events (which
    it emits only on request; GPU and TPU emit them always)."""
    if platform == "cpu":
        try:
            return lowered.compile(compiler_options={"xla_cpu_enable_xprof_traceme": True})
        except Exception as error:  # noqa: BLE001 -- an XLA without the flag
            if "xla_cpu_enable_xprof_traceme" not in str(error):
                raise
    return lowered.compile()


def forced_tpu_interpret_mode(params: Any):
    """A context in which every Pallas TPU call traced runs in TPU interpret mode with
    `params` (``pltpu.force_tpu_interpret_mode``): how a kernel whose entry point takes no
    ``interpret=`` argument is run on a CPU."""
    from jax.experimental.pallas import tpu as pltpu  # noqa: PLC0415 -- optional import

    force = getattr(pltpu, "force_tpu_interpret_mode", None)
    if force is None:
        from jax._src.pallas.mosaic.interpret import interpret_pallas_call  # noqa: PLC0415

        force = interpret_pallas_call.force_tpu_interpret_mode
    return force(params)
