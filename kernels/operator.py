"""What an attention operator is: the object every part of attnbench asks about one op.

Each operator's package (``kernels/<op>/``) defines one subclass instance, listed in
:data:`attnbench.kernels.registry.OPERATORS`. Code outside that package (lookup, tables,
the tuner, reports, the CLI) never branches on an operator's name: it asks this object how
to check arguments, which sizes key a tuned table, what the float32 reference is, how many
bytes a call must move, which problem type generates its inputs, and so on.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import jax
import numpy as np


@dataclasses.dataclass
class AttentionRow:
    """One query row of a call as the contract sees it, for checks that recompute rows."""

    index: int  # the row's index in the output
    queries: np.ndarray  # [Hq, D]
    keys: np.ndarray  # [L, Hkv, D]: every position the row's sequence can address, in order
    values: np.ndarray  # [L, Hkv, D]
    low: int  # the first valid key position
    position: int  # the query's position: the last valid key
    sequence: int  # the sequence (batch row) it belongs to
    first_of_chunk: bool = False  # the first query row of a prefill chunk (causal diagonal)


class Operator(abc.ABC):
    """One attention operator: its arguments, its table keys, its problems and its floor."""

    name: ClassVar[str]  # the op's key in tables, sweep files and measurement records
    function_name: ClassVar[str]  # the public function, e.g. "decode_attention"
    # Table-key axes matched by nearest power-of-two bucket, in key order.
    size_axes: ClassVar[tuple[str, ...]]
    # Names a sweep-file constraint may read besides tunables and the shared sizes.
    constraint_sizes_names: ClassVar[tuple[str, ...]]
    problem_class: ClassVar[type]  # the op's problem spec (make_inputs, shape, ...)
    # Positions of arguments the call returns updated (its extra outputs, in order), to be
    # donated under jit so they are updated in place; a timing loop feeds them back.
    donated_args: ClassVar[tuple[int, ...]] = ()

    # ---- Calls --------------------------------------------------------------------------

    @property
    @abc.abstractmethod
    def function(self) -> Callable[..., jax.Array]:
        """The public operator (what users call)."""

    @abc.abstractmethod
    def prepare(self, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        """Checks the public function's arguments: (normalized args, shape descriptor)."""

    @abc.abstractmethod
    def output_shape(self, shape: Any) -> tuple[int, ...]:
        """The shape of a call's output (rank 3, before any rank the public function keeps)."""

    @abc.abstractmethod
    def has_no_work(self, shape: Any) -> bool:
        """Whether a call of this shape has no key any row could attend (an empty batch, an
        empty cache, no pages): its output is all zeros by the contract, with no kernel run."""

    def no_work_result(self, args: Any, shape: Any, output_dtype) -> Any:
        """The result of a call with no work (:meth:`has_no_work`), from normalized args."""
        import jax.numpy as jnp

        return jnp.zeros(self.output_shape(shape), output_dtype)

    @abc.abstractmethod
    def value_arrays(self, args: Any) -> tuple[jax.Array, ...]:
        """The index arrays :meth:`value_problems` reads (checked host side on request)."""

    @abc.abstractmethod
    def value_problems(self, shape: Any, *arrays: Any) -> list[str]:
        """Every out-of-range value among `value_arrays`, one sentence each."""

    def split_result(self, result: Any) -> tuple[jax.Array, tuple]:
        """A call's result as (the attention output the accuracy gate judges, the extra
        outputs, which must equal the reference's bit for bit)."""
        return result, ()

    def join_result(self, output: jax.Array, extras: tuple) -> Any:
        """The inverse of :meth:`split_result`."""
        return output

    def extra_names(self) -> tuple[str, ...]:
        """Names of the extra outputs, for messages."""
        return ()

    def plain_attention_inputs(self, args: tuple, kwargs: dict[str, Any]
                               ) -> tuple[str, tuple, dict[str, Any]]:
        """(operator name, args, kwargs) of a call of an operator without extra outputs that
        returns this call's attention output (the gate's mutants are built on it); this
        operator's own call when it has none."""
        return self.name, args, kwargs

    def zero_rows(self, args: tuple) -> np.ndarray | None:
        """Output rows the contract requires to be exactly zero (padding), as a bool mask
        over the output's first axis, for inputs as the public function takes them; None
        when the operator has no such rows."""
        return None

    def key_ranges(self, args: tuple, kwargs: dict[str, Any]) -> np.ndarray | None:
        """Each output row's valid key positions as int [rows, 2] (first, end), for
        concrete inputs as the public function takes them; None when unknown. A verdict
        uses them to say where a wrong row looks."""
        return None

    @abc.abstractmethod
    def attention_rows(self, args: tuple, kwargs: dict[str, Any]) -> list[AttentionRow]:
        """The rows worth recomputing by hand (every row of a decode batch; the first and
        last row of each prefill chunk), for inputs as the public function takes them."""

    def boundary_sizes(self, args: tuple) -> dict[int, str]:
        """Sizes of the op's own storage units whose boundaries kernels cut at, with their
        names (a paged cache: {page_size: "page"}); block sizes of configs come on top."""
        return {}

    def with_page_moved(self, args: tuple, sequence: int, logical_page: int) -> tuple | None:
        """The inputs with one page-table entry of `sequence` pointing at the next page, or
        None for an operator without a page table."""
        return None

    # ---- Sharding (the mesh= keyword, kernels/sharding.py) ------------------------------

    # The public function's array arguments in order (sinks excluded), for errors.
    array_names: ClassVar[tuple[str, ...]]
    # What an argument's layout needs of a split, added to the error of a split that does
    # not divide its axis.
    split_notes: ClassVar[dict[str, str]] = {}

    @abc.abstractmethod
    def shard_specs(self, axis: str, arrays: tuple) -> tuple[tuple[Any, ...], Any]:
        """The default PartitionSpecs (one per array argument, and the output's: a tuple,
        one per output, when the operator has extra outputs) of a call run per shard with
        its heads split over mesh axis `axis`."""

    def head_entry(self, in_specs: list, arrays: tuple) -> Any:
        """The mesh axis (or axes, or None) that `in_specs` split the query heads over; the
        per-head sinks are split the same way. Here: the first argument's second-to-last
        axis, where both of today's operators keep the query heads."""
        query_spec = tuple(in_specs[0])
        query_spec += (None,) * (arrays[0].ndim - len(query_spec))
        return query_spec[-2]

    @property
    def reference(self):
        """The float32 oracle variant of this operator."""
        from . import registry

        return registry.get_variant(self.name, "reference")

    # ---- Table keys ---------------------------------------------------------------------

    @abc.abstractmethod
    def key_fields(self, shape: Any) -> dict[str, Any]:
        """The op's own discrete key fields (e.g. page_size) of a call."""

    @abc.abstractmethod
    def key_sizes(self, shape: Any) -> dict[str, int]:
        """The raw sizes of a call on each of :attr:`size_axes` (bucketed by the table)."""

    def key_field_problems(self, key: dict[str, Any], where: str) -> list[str]:
        """Schema problems of the op's own discrete key fields in a table entry."""
        return []

    @abc.abstractmethod
    def lookup_shape(self, *, q_heads: int, kv_heads: int, head_dim: int, dtype: str,
                     features: frozenset[str], sizes: dict[str, int | None]) -> Any:
        """A shape descriptor from sizes named as `attnbench lookup` takes them (batch,
        max_len, tokens, page_size, max_seqs); sizes the op does not use are ignored."""

    # ---- The memory floor ---------------------------------------------------------------

    @abc.abstractmethod
    def bytes_moved(self, args: tuple, kwargs: dict[str, Any]) -> int:
        """Bytes a call must move at least: valid key/value rows, queries and outputs, for
        concrete inputs as the public function takes them."""

    @abc.abstractmethod
    def flops(self, args: tuple, kwargs: dict[str, Any]) -> int:
        """Multiply-adds x 2 of the valid logits and weighted values of a call."""

    def __repr__(self) -> str:
        return f"<operator {self.name}: {self.function_name}>"
