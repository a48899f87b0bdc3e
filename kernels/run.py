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

from .jax_compat import is_tracer
from .lookup import choose


def _is_concrete(*arrays: Any) -> bool:
    return not any(is_tracer(a) for a in arrays)


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
    if operator.has_no_work(shape):
        # Zero-sized arrays reach no kernel: some cannot tile or index an empty axis.
        return operator.no_work_result(prepared, shape, output_dtype)
    choice = choose(shape, variant=variant, config=config, interpret=interpret)
    result = choice.variant.kernel(prepared, choice.config, interpret=interpret)
    return cast_output(operator, result, output_dtype)


def cast_output(operator, result: Any, output_dtype) -> Any:
    """A kernel's result with its attention output cast to `output_dtype` (extra outputs,
    such as an updated cache, keep their own dtypes)."""
    output, extras = operator.split_result(result)
    return operator.join_result(output.astype(output_dtype), extras)


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
