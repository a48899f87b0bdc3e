"""Peer: JAX's Pallas GPU paged decode kernel (``jax.experimental.pallas.ops.gpu.paged_attention``).

A decode kernel: one query token per sequence against separate key and value page pools
laid out head-major ([Hkv, P, page_size, D] each), split over `k_splits` parts of each page
table row, `pages_per_compute_block` pages per loop step, merged outside the kernel.

Adapting the operator's call to it:

- the combined cache [P, page_size, 2 * Hkv, D] becomes the two head-major pools: converted
  once, outside the timed call (`convert_inputs`), as a server keeping its cache in this
  layout would hold it;
- the kernel takes no softmax scale, so the query is multiplied by it first (in float32,
  rounded back to the query's dtype, as a caller would do);
- each sequence's last query row is its decode token: those rows are gathered, and the
  kernel's outputs go back to them. A batch with prefill chunks is not what the kernel
  computes (the other rows stay zero) and the gate records it `wrong`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from .inputs import PagedArgs, PagedShape
from ..peers import PeerOrigin
from ..tunables import KernelConfig, POWER_OF_TWO, Rule, one_of, tunable
from ..variant import Variant

ORIGIN = PeerOrigin(project="jax", distribution="jax",
                    module="jax.experimental.pallas.ops.gpu.paged_attention",
                    function="paged_attention")

MULTIPLE_OF_16 = Rule(lambda v: POWER_OF_TWO.check(v) and v >= 16, "a power of two >= 16")


@dataclasses.dataclass(frozen=True)
class JaxGpuPagedConfig(KernelConfig):
    """paged_attention's own keyword arguments (defaults: paged_attention's)."""

    block_h: int = tunable(16, (16, 32), MULTIPLE_OF_16,
                           "query heads of one KV head per program (padded up to this)")
    pages_per_compute_block: int = tunable(8, (2, 4, 8, 16), POWER_OF_TWO,
                                           "pages per step of a program's loop")
    k_splits: int = tunable(16, (1, 4, 8, 16, 32), POWER_OF_TWO,
                            "parts of each page table row scanned by separate programs")
    num_warps: int = tunable(8, (4, 8), one_of(1, 2, 4, 8, 16), "Triton warps per program")
    num_stages: int = tunable(2, (1, 2, 3), one_of(1, 2, 3, 4, 5),
                              "Triton software-pipelining stages")

    def invalid_reason(self, shape: PagedShape) -> str | None:
        if shape.pages_per_seq % self.k_splits:
            return (f"k_splits {self.k_splits} must divide the pages per sequence "
                    f"({shape.pages_per_seq})")
        partition = shape.pages_per_seq // self.k_splits
        if partition % min(self.pages_per_compute_block, partition):
            return (f"pages_per_compute_block {self.pages_per_compute_block} must divide the "
                    f"pages per split ({partition})")
        if not POWER_OF_TWO.check(shape.head_dim) or not POWER_OF_TWO.check(shape.page_size):
            return (f"head dim {shape.head_dim} and page size {shape.page_size} must be "
                    "powers of two (Triton tiles)")
        return None

    def clamp(self, shape: PagedShape) -> JaxGpuPagedConfig:
        splits = self.k_splits
        while splits > 1 and shape.pages_per_seq % splits:
            splits //= 2
        partition = shape.pages_per_seq // splits
        pages = self.pages_per_compute_block
        while pages > 1 and partition % min(pages, partition):
            pages //= 2
        return self.replace(k_splits=splits, pages_per_compute_block=pages)


def heuristic(shape: PagedShape) -> JaxGpuPagedConfig:
    """paged_attention's defaults, cut to the page table."""
    return JaxGpuPagedConfig().clamp(shape)


def head_major_pools(args: PagedArgs) -> tuple[jax.Array, jax.Array]:
    """[P, page_size, 2 * Hkv, D] -> key pool and value pool, [Hkv, P, page_size, D] each."""
    keys = jnp.transpose(args.kv_pages[:, :, 0::2], (2, 0, 1, 3))
    values = jnp.transpose(args.kv_pages[:, :, 1::2], (2, 0, 1, 3))
    return keys, values


def on_pools(args: PagedArgs, pools: tuple, config: JaxGpuPagedConfig, *,
             interpret: bool = False) -> jax.Array:
    """The kernel on the head-major pools: each sequence's last query row. [T, Hq, D]."""
    paged_attention = ORIGIN.load()
    keys, values = pools
    num_tokens = args.queries.shape[0]
    max_seqs = args.page_table.shape[0]
    num_pages = args.kv_pages.shape[0]
    starts, ends = args.query_start_loc[:-1], args.query_start_loc[1:]
    active = (jnp.arange(max_seqs) < args.num_seqs) & (ends > starts) & (ends <= num_tokens)
    rows = jnp.clip(ends - 1, 0, max(num_tokens - 1, 0))
    query = (args.queries[rows].astype(jnp.float32) * args.softmax_scale).astype(
        args.queries.dtype)
    lengths = jnp.where(active, jnp.clip(args.context_lens, 0, None), 0).astype(jnp.int32)
    out = paged_attention(
        query, keys, values, jnp.clip(args.page_table, 0, num_pages - 1), lengths,
        block_h=config.block_h, pages_per_compute_block=config.pages_per_compute_block,
        k_splits=config.k_splits, num_warps=config.num_warps, num_stages=config.num_stages,
        attn_logits_soft_cap=args.logits_soft_cap, interpret=interpret)
    # Inactive sequences write nowhere (index T is dropped).
    target = jnp.where(active, rows, num_tokens)
    return jnp.zeros(args.queries.shape, out.dtype).at[target].set(out, mode="drop")


def jax_gpu_paged(args: PagedArgs, config: JaxGpuPagedConfig, *,
                  interpret: bool = False) -> jax.Array:
    """ragged_paged_attention's decode rows through paged_attention. [T, Hq, D]."""
    return on_pools(args, head_major_pools(args), config, interpret=interpret)


VARIANT = Variant(
    name="jax_gpu_paged_attention",
    op="paged",
    platforms=("gpu",),
    interpretable=True,
    features=frozenset({"logits_soft_cap"}),
    config_class=JaxGpuPagedConfig,
    kernel=jax_gpu_paged,
    heuristic=heuristic,
    description="peer: JAX's Pallas GPU paged decode kernel (paged_attention; one query "
                "row per sequence)",
    peer=ORIGIN,
    convert_inputs=head_major_pools,
    run_converted=on_pools,
    conversion="kv_pages [P, page_size, 2*Hkv, D] -> key and value pools [Hkv, P, "
               "page_size, D] (once per input set, not timed)",
)
