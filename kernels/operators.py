"""The two public operators: check arguments, pick variant and config, run, cast back."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from . import inputs
from .lookup import choose


def _is_concrete(*arrays: Any) -> bool:
    return not any(isinstance(a, jax.core.Tracer) for a in arrays)


def _raise_problems(op: str, problems: list[str]) -> None:
    if problems:
        raise ValueError(f"{op}: invalid input values: " + "; ".join(problems))


def _check_values(op: str, compute_problems, *arrays: jax.Array) -> None:
    """Runs a host-side value check now (concrete inputs) or when the compiled call runs."""
    if _is_concrete(*arrays):
        _raise_problems(op, compute_problems(*arrays))
    else:
        # Under jit the values only exist at run time: check them on the host then.
        jax.debug.callback(lambda *a: _raise_problems(op, compute_problems(*a)), *arrays)


def decode_attention(
    query, key, value, sequence_start, sequence_end, *,
    softmax_scale: float | None = None,
    sliding_window: int | tuple[int, int] | None = None,
    logits_soft_cap: float | None = None,
    sinks: jax.Array | None = None,
    variant: str | None = None,
    config: Mapping[str, Any] | None = None,
    interpret: bool = False,
    validate: bool = False,
) -> jax.Array:
    """Attention of one new token per sequence against a contiguous KV cache.

    query [B, Hq, D] or [B, 1, Hq, D]; key, value [B, S, Hkv, D]; sequence_start,
    sequence_end int32 [B]. Row b attends keys start_b <= j < end_b (and the window), with
    the query at p = end_b - 1. Returns the query's rank and dtype. See SEMANTICS.md.

    variant / config: force a variant and/or config instead of the tuned-table choice.
    interpret: run a GPU/TPU variant on CPU through its interpreter.
    validate: also check lengths against S (host side), raising ValueError when wrong.
    """
    args, shape, rank4 = inputs.prepare_decode(
        query, key, value, sequence_start, sequence_end, softmax_scale=softmax_scale,
        sliding_window=sliding_window, logits_soft_cap=logits_soft_cap, sinks=sinks,
    )
    if validate:
        _check_values(
            "decode_attention",
            lambda s, e: inputs.decode_value_problems(s, e, shape.max_len),
            args.sequence_start, args.sequence_end,
        )
    choice = choose(shape, variant=variant, config=config, interpret=interpret)
    out = choice.variant.kernel(args, choice.config, interpret=interpret).astype(query.dtype)
    return out[:, None] if rank4 else out


def ragged_paged_attention(
    queries, kv_pages, context_lens, page_table, query_start_loc, num_seqs, *,
    softmax_scale: float | None = None,
    sliding_window: int | tuple[int, int] | None = None,
    logits_soft_cap: float | None = None,
    sinks: jax.Array | None = None,
    variant: str | None = None,
    config: Mapping[str, Any] | None = None,
    interpret: bool = False,
    validate: bool = False,
) -> jax.Array:
    """Attention for a ragged mix of prefill and decode tokens against a paged KV cache.

    queries [T, Hq, D]; kv_pages [P, page_size, 2 * Hkv, D] (key of head g at 2g, value at
    2g + 1); context_lens int32 [max_seqs]; page_table int32 [max_seqs, pages_per_seq];
    query_start_loc int32 [max_seqs + 1]; num_seqs int32 scalar or [1]. Returns [T, Hq, D]
    in the queries' dtype; rows past query_start_loc[num_seqs] are zeros. See SEMANTICS.md.
    """
    args, shape = inputs.prepare_paged(
        queries, kv_pages, context_lens, page_table, query_start_loc, num_seqs,
        softmax_scale=softmax_scale, sliding_window=sliding_window,
        logits_soft_cap=logits_soft_cap, sinks=sinks,
    )
    if validate:
        _check_values(
            "ragged_paged_attention",
            lambda c, t, q, n: inputs.paged_value_problems(
                c, t, q, n, num_pages=shape.num_pages, page_size=shape.page_size,
                num_tokens=shape.num_tokens),
            args.context_lens, args.page_table, args.query_start_loc, args.num_seqs,
        )
    choice = choose(shape, variant=variant, config=config, interpret=interpret)
    return choice.variant.kernel(args, choice.config, interpret=interpret).astype(queries.dtype)


def check_inputs(op: str, *arrays: Any, **kwargs: Any) -> None:
    """Host-side value check of an operator's arguments; raises ValueError listing problems.

    `op` is "decode" (arguments as decode_attention) or "paged" (as ragged_paged_attention).
    """
    if op == "decode":
        args, shape, _ = inputs.prepare_decode(*arrays, **kwargs)
        _raise_problems("decode_attention", inputs.decode_value_problems(
            np.asarray(args.sequence_start), np.asarray(args.sequence_end), shape.max_len))
    elif op == "paged":
        args, shape = inputs.prepare_paged(*arrays, **kwargs)
        _raise_problems("ragged_paged_attention", inputs.paged_value_problems(
            args.context_lens, args.page_table, args.query_start_loc, args.num_seqs,
            num_pages=shape.num_pages, page_size=shape.page_size, num_tokens=shape.num_tokens))
    else:
        raise ValueError(f"op must be 'decode' or 'paged', got {op!r}")
