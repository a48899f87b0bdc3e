"""What the v3 kernel variants share around the v2 kernels: the scales as one small array,
and the arguments of one launch per band group (decode band; chunked-prefill and mixed)."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from ..paged.inputs import PagedArgs
from .inputs import PagedV3Args


def kv_scales(args: PagedV3Args) -> jax.Array | None:
    """(k_scale, v_scale) as f32 [2] for the kernel, or None for a cache without scales."""
    if args.k_scale is None and args.v_scale is None:
        return None
    scales = [1.0 if s is None else s for s in (args.k_scale, args.v_scale)]
    return jnp.stack([jnp.asarray(s, jnp.float32).reshape(()) for s in scales])


def band_args(paged: PagedArgs, distribution: jax.Array
              ) -> tuple[PagedArgs, PagedArgs, jax.Array]:
    """(decode-band args, prefill-bands args, first row of the prefill bands)."""
    num_tokens = paged.queries.shape[0]
    max_seqs = paged.context_lens.shape[0]
    active = jnp.clip(distribution[2], 0, max_seqs)
    decode_seqs = jnp.clip(distribution[0], 0, active)
    boundary = jnp.clip(paged.query_start_loc[decode_seqs], 0, num_tokens)
    # Decode-band sequences own no rows in the second launch: rows before `boundary` are
    # its padding.
    sequence = jnp.arange(max_seqs + 1)
    starts = jnp.where(sequence < decode_seqs, paged.query_start_loc[decode_seqs],
                       paged.query_start_loc)
    return (paged._replace(num_seqs=decode_seqs),
            paged._replace(query_start_loc=starts, num_seqs=active), boundary)


def attend_by_band(paged: PagedArgs, distribution: jax.Array, attend: Callable, decode_config,
                   prefill_config) -> jax.Array:
    """`attend(args, config)` over all bands in one launch (`prefill_config` None), or the
    decode band with `decode_config` and the others with `prefill_config`, merged by row."""
    if prefill_config is None:
        return attend(paged, decode_config)
    decode_args, prefill_args, boundary = band_args(paged, distribution)
    decode_out = attend(decode_args, decode_config)
    prefill_out = attend(prefill_args, prefill_config)
    row = jnp.arange(paged.queries.shape[0])[:, None, None]
    return jnp.where(row < boundary, decode_out, prefill_out)
