"""The call a measurement compiles and times: one variant's kernel on an operator's inputs.

The operator's own checks run first (``prepare``), then the kernel directly, with no table
lookup. For a variant whose kernel reads another layout than the operator's (a peer with
``convert_inputs``), the conversion is a separate compiled call made once per input set,
before timing: the timed call takes the converted arrays after the operator's inputs and
runs only ``run_converted``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from attnbench.kernels.run import cast_output


class KernelCall:
    """`run(*inputs, *converted)` and, for converting variants, `convert(*inputs)`.

    `inputs` are the operator's positional arguments followed by its array keyword
    arguments (input_sets.with_array_keywords_last's order); other keywords are fixed.
    """

    def __init__(self, operator, variant, config, positional: int, kwargs: dict[str, Any],
                 *, output_dtype: str | None = None, interpret: bool = False):
        self.operator, self.variant, self.config = operator, variant, config
        self.positional = positional
        self.names = [name for name, value in kwargs.items() if hasattr(value, "shape")]
        self.fixed = {name: value for name, value in kwargs.items() if name not in self.names}
        self.count = positional + len(self.names)
        self.output_dtype, self.interpret = output_dtype, interpret

    @property
    def converts(self) -> bool:
        return self.variant.convert_inputs is not None

    def _prepared(self, inputs: tuple):
        arrays = dict(zip(self.names, inputs[self.positional:self.count]))
        prepared, _ = self.operator.prepare(*inputs[:self.positional], **self.fixed, **arrays)
        return prepared

    def run(self, *inputs):
        prepared = self._prepared(inputs)
        if self.converts:
            result = self.variant.run_converted(prepared, tuple(inputs[self.count:]),
                                                self.config, interpret=self.interpret)
        else:
            result = self.variant.kernel(prepared, self.config, interpret=self.interpret)
        return cast_output(self.operator, result, self.output_dtype or inputs[0].dtype)

    def convert(self, *inputs) -> tuple:
        return tuple(self.variant.convert_inputs(self._prepared(inputs)))

    def timed_input_sets(self, input_sets: list[tuple]) -> list[tuple]:
        """Each input set with the variant's converted arrays appended (converted now, by one
        compiled call, so the conversion is never timed); unchanged for other variants."""
        if not self.converts:
            return list(input_sets)
        convert: Callable = jax.jit(self.convert)
        return [tuple(inputs) + tuple(jax.block_until_ready(convert(*inputs)))
                for inputs in input_sets]
