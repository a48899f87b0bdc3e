"""The path every operator call takes: check arguments, choose variant and config, run.

Each operator's public function (``kernels/<op>/operator.py``) calls :func:`run_operator`
with its operator object, so argument checks, value validation, the tuned-table lookup and
the cast back to the query's dtype happen the same way for every op.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from .lookup import choose


def _is_concrete(*arrays: Any) -> bool:
    return not any(isinstance(a, jax.core.Tracer) for a in arrays)


def _raise_problems(function_name: str, problems: list[str]) -> None:
    if problems:
        raise ValueError(f"{function_name}: invalid input values: " + "; ".join(problems))


def check_values(operator, shape, arrays: tuple) -> None:
    """Runs the operator's host-side value check now (concrete inputs) or when the compiled
    call runs (under jit the values only exist then)."""
    def check(*values):
        _raise_problems(operator.function_name, operator.value_problems(shape, *values))

    if _is_concrete(*arrays):
        check(*arrays)
    else:
        jax.debug.callback(check, *arrays)


def run_operator(operator, args: tuple, kwargs: dict[str, Any], *, variant: str | None,
                 config: Mapping[str, Any] | None, interpret: bool, validate: bool,
                 output_dtype) -> jax.Array:
    """One call of `operator` on its public arguments; the output in `output_dtype`."""
    prepared, shape = operator.prepare(*args, **kwargs)
    if validate:
        check_values(operator, shape, operator.value_arrays(prepared))
    choice = choose(shape, variant=variant, config=config, interpret=interpret)
    return choice.variant.kernel(prepared, choice.config, interpret=interpret).astype(output_dtype)


def check_inputs(op: str, *arrays: Any, **kwargs: Any) -> None:
    """Host-side value check of an operator's arguments; raises ValueError listing problems.

    `op` names a registered operator ("decode": arguments as decode_attention takes them;
    "paged": as ragged_paged_attention).
    """
    from .registry import get_operator

    operator = get_operator(op)
    prepared, shape = operator.prepare(*arrays, **kwargs)
    values = [np.asarray(a) for a in operator.value_arrays(prepared)]
    _raise_problems(operator.function_name, operator.value_problems(shape, *values))
