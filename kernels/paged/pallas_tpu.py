"""ragged_paged_attention as a Pallas TPU (Mosaic) kernel, prefill and decode mixed.

The T query rows are cut into blocks of `query_rows_per_block`. A block may hold rows of
several sequences (many decode rows, or the seam between two prefill chunks), so the grid
walks a *work list* of (query block, sequence) pairs, built in XLA from query_start_loc and
num_seqs and scalar-prefetched into SMEM with the flattened page table:

    grid = (KV head, work item, KV block)

Consecutive work items of one query block keep the same output block index, so the block
stays in VMEM and its online softmax (scratch, one row per (query head, query row))
carries over; the last item of a block writes it. Each item updates only its own rows.
A KV block is `pages_per_block` pages, each fetched by its own BlockSpec whose index_map
reads the page table (clamped), so Pallas' pipeline double-buffers the page gathers with
no manual DMA. KV blocks outside an item's causal/window range skip compute (`pl.when`)
and their index_map is clamped into the range, so no DMA is issued for them either.

Layout: queries and output as [Hkv, G, T, D] (a transpose of the small query tensor);
kv_pages [P, page_size, 2 * Hkv, D] viewed as [P, page_size, 2 * Hkv * D] (free) so the key
of head g is lane-block 2g; head dims that are not a multiple of 128 take a transposed copy
[P, 2 * Hkv, page_size, D] instead (one extra pass over the cache).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from ..jax_compat import tpu_compiler_params
from ..pallas_tpu_common import finish_softmax, interpret_params, online_softmax_step, scores_of
from ..sharding import out_struct, vary_like
from ..tpu_limits import (
    LANES, MiB, block_dtype, padded_tile_bytes, query_block_dtype, sublane_tile,
    vmem_budget_bytes,
)
from .inputs import PagedArgs, PagedShape
from ..tunables import KernelConfig, POSITIVE_INT, cdiv, tunable
from ..variant import Variant


@dataclasses.dataclass(frozen=True)
class PallasTpuPagedConfig(KernelConfig):
    """Block sizes of the TPU ragged paged attention kernel."""

    pages_per_block: int = tunable(
        16, (1, 2, 4, 8, 16, 32, 64), POSITIVE_INT,
        "KV pages gathered per grid step (more than 1 needs page_size a multiple of the "
        "sublane tile, so the pages stack into one aligned block)")
    query_rows_per_block: int = tunable(
        32, (16, 32, 64, 128, 256), POSITIVE_INT,
        "query rows per block (a multiple of the sublane tile); decode rows of different "
        "sequences share a block")

    def invalid_reason(self, shape: PagedShape) -> str | None:
        tile = sublane_tile(shape.dtype)
        if self.query_rows_per_block % tile:
            return (f"query_rows_per_block {self.query_rows_per_block} must be a multiple of "
                    f"the {tile}-row sublane tile of {shape.dtype}")
        if self.pages_per_block > 1 and shape.page_size % tile:
            return (f"pages_per_block {self.pages_per_block} > 1 needs page_size "
                    f"({shape.page_size}) to be a multiple of the {tile}-row sublane tile of "
                    f"{shape.dtype}")
        need, budget = paged_vmem_bytes(self, shape), self.vmem_budget_bytes()
        if need > budget:
            return (f"needs ~{need / MiB:.1f} MiB of VMEM, more than the {budget / MiB:.1f} MiB "
                    "budget of this target")
        return None

    def vmem_budget_bytes(self) -> int:
        """The VMEM this config may plan for (a config that raises the limit plans for more)."""
        return vmem_budget_bytes()

    def vmem_estimate_bytes(self, shape: PagedShape) -> int:
        """This kernel's own estimate of the VMEM it needs (what the check reports: Mosaic's
        compiled executables do not report their VMEM use)."""
        return paged_vmem_bytes(self, shape)

    def clamp(self, shape: PagedShape) -> PallasTpuPagedConfig:
        tile = sublane_tile(shape.dtype)
        all_rows = max(tile, cdiv(shape.num_tokens, tile) * tile)
        return self.replace(pages_per_block=min(self.pages_per_block, shape.pages_per_seq),
                            query_rows_per_block=min(self.query_rows_per_block, all_rows))


def paged_vmem_bytes(config: PallasTpuPagedConfig, shape: PagedShape) -> int:
    """VMEM estimate: double-buffered blocks, scratch and the logits temporaries."""
    rows = shape.group_size * config.query_rows_per_block
    kv_rows = config.pages_per_block * shape.page_size
    kv_dtype = block_dtype(shape.dtype)
    dim = shape.head_dim
    blocks = (2 * padded_tile_bytes(rows, dim, "float32")  # queries, output (at most f32)
              + 2 * config.pages_per_block * padded_tile_bytes(shape.page_size, dim, kv_dtype)
              + 2 * padded_tile_bytes(rows, 1, "float32"))  # row offsets, sinks
    scratch = padded_tile_bytes(rows, dim, "float32") + 2 * padded_tile_bytes(rows, 1, "float32")
    temporaries = (3 * padded_tile_bytes(rows, kv_rows, "float32")  # scores, weights, mask
                   + 2 * padded_tile_bytes(kv_rows, dim, kv_dtype))  # stacked K and V
    return 2 * blocks + scratch + temporaries


def heuristic(shape: PagedShape) -> PallasTpuPagedConfig:
    """~512 cache positions per step; 32 query rows (16 when the group is large)."""
    tile = sublane_tile(shape.dtype)
    pages = max(1, 512 // shape.page_size) if shape.page_size % tile == 0 else 1
    rows = 16 if shape.group_size >= 8 else 32
    config = PallasTpuPagedConfig(pages_per_block=pages, query_rows_per_block=rows).clamp(shape)
    while config.invalid_reason(shape) and config.pages_per_block > 1:
        config = config.replace(pages_per_block=config.pages_per_block // 2)
    while config.invalid_reason(shape) and config.query_rows_per_block > tile:
        config = config.replace(query_rows_per_block=config.query_rows_per_block // 2)
    return config


# ---- The work list ----------------------------------------------------------------------------

# Fields of one work item, flattened into one int32 SMEM array (2-D SMEM arrays pad rows).
(QUERY_BLOCK, SEQUENCE, FIRST_OF_BLOCK, LAST_OF_BLOCK, ROW_LO, ROW_HI, POSITION_OFFSET,
 KEY_LO, KEY_HI, KV_FIRST, KV_LAST) = range(11)
NUM_FIELDS = 11


def work_list(args: PagedArgs, query_rows: int, kv_rows: int, num_kv_blocks: int) -> jax.Array:
    """The (query block, sequence) pairs the grid walks: int32 [num_items * NUM_FIELDS].

    Every query block gets at least one item (a block of only padding rows gets one with no
    rows, so its zeros are still written). Each sequence adds at most one item beyond the
    blocks it spans, so cdiv(T, query_rows) + max_seqs items always suffice; unused ones
    repeat the last block and do nothing. All indices are clamped here.
    """
    num_tokens = args.queries.shape[0]
    page_size = args.kv_pages.shape[1]
    max_seqs, pages_per_seq = args.page_table.shape
    num_blocks = cdiv(num_tokens, query_rows)
    num_items = num_blocks + max_seqs

    num_seqs = jnp.clip(args.num_seqs, 0, max_seqs)
    # Clamped and made non-decreasing, so bad values give wrong rows, never bad indices.
    starts = jax.lax.cummax(jnp.clip(args.query_start_loc, 0, num_tokens))
    active = jnp.arange(max_seqs) < num_seqs
    real_end = starts[num_seqs]
    begins = jnp.where(active, starts[:-1], real_end)
    ends = jnp.where(active, starts[1:], real_end)
    context = jnp.clip(args.context_lens, 0, pages_per_seq * page_size)
    offset = context - (ends - begins) - begins  # position of row r of seq i: r + offset[i]

    block = jnp.arange(num_blocks)
    # Sequences meeting block t form the contiguous range [first, first + count).
    first = jnp.sum(ends[None, :] <= (block * query_rows)[:, None], axis=1)
    past = jnp.sum(begins[None, :] < ((block + 1) * query_rows)[:, None], axis=1)
    count = jnp.maximum(past - first, 0)
    items_of_block = jnp.maximum(count, 1)
    items_end = jnp.cumsum(items_of_block)

    item = jnp.arange(num_items)
    in_use = item < items_end[-1]
    t = jnp.minimum(jnp.sum(items_end[None, :] <= item[:, None], axis=1), num_blocks - 1)
    k = item - (items_end[t] - items_of_block[t])
    has_seq = in_use & (count[t] > 0)
    seq = jnp.clip(first[t] + k, 0, max_seqs - 1)
    row_lo = jnp.maximum(begins[seq], t * query_rows)
    row_hi = jnp.where(has_seq, jnp.minimum(ends[seq], (t + 1) * query_rows), row_lo)
    key_hi = jnp.minimum(context[seq], row_hi - 1 + offset[seq] + 1)
    key_lo = jnp.zeros_like(key_hi)
    if args.window_left is not None:
        key_lo = jnp.maximum(row_lo + offset[seq] - args.window_left, 0)
    nonempty = has_seq & (row_hi > row_lo) & (key_hi > key_lo)
    kv_first = jnp.clip(key_lo // kv_rows, 0, num_kv_blocks - 1)
    kv_last = jnp.where(nonempty, jnp.clip((key_hi - 1) // kv_rows, 0, num_kv_blocks - 1),
                        kv_first - 1)
    fields = [None] * NUM_FIELDS
    fields[QUERY_BLOCK] = t
    fields[SEQUENCE] = seq
    fields[FIRST_OF_BLOCK] = in_use & (k == 0)
    fields[LAST_OF_BLOCK] = in_use & (k == items_of_block[t] - 1)
    fields[ROW_LO] = row_lo
    fields[ROW_HI] = row_hi
    fields[POSITION_OFFSET] = offset[seq]
    fields[KEY_LO] = key_lo
    fields[KEY_HI] = key_hi
    fields[KV_FIRST] = kv_first
    fields[KV_LAST] = kv_last
    return jnp.stack([f.astype(jnp.int32) for f in fields], axis=1).reshape(-1)


# ---- Kernel -----------------------------------------------------------------------------------


def _paged_kernel(work_ref, table_ref, query_ref, *refs, pages_per_block: int,
                  query_rows: int, kv_rows: int, softmax_scale: float,
                  soft_cap: float | None, window_left: int | None, has_sinks: bool,
                  has_kv_scales: bool, head_dim: int):
    from jax.experimental import pallas as pl

    key_refs = refs[:pages_per_block]
    value_refs = refs[pages_per_block:2 * pages_per_block]
    rest = refs[2 * pages_per_block:]
    row_ref = rest[0]
    sinks_ref = rest[1] if has_sinks else None
    scales_ref = rest[1 + has_sinks] if has_kv_scales else None
    out_ref, m_ref, l_ref, acc_ref = rest[-4:]  # the poisoned alias input sits before them

    item, kv_block = pl.program_id(1), pl.program_id(2)

    def field(index):
        return work_ref[item * NUM_FIELDS + index]

    @pl.when((field(FIRST_OF_BLOCK) != 0) & (kv_block == 0))
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    @pl.when((kv_block >= field(KV_FIRST)) & (kv_block <= field(KV_LAST)))
    def _accumulate():
        groups, rows, dim = query_ref.shape
        query = query_ref[...].reshape(groups * rows, dim)

        def load(ref):
            block = ref[...]
            if block.dtype.itemsize == 1:
                # float8/int8 values are exact in the queries' dtype (via float32: Mosaic
                # widens 8-bit types to 32 bits only).
                block = block.astype(jnp.float32).astype(query.dtype)
            return block

        if pages_per_block == 1:
            keys, values = load(key_refs[0]), load(value_refs[0])
        else:
            keys = jnp.concatenate([load(r) for r in key_refs], axis=0)
            values = jnp.concatenate([load(r) for r in value_refs], axis=0)
        if dim > head_dim:
            # Padding lanes of the cache may hold anything; the query's are zero.
            lane = jax.lax.broadcasted_iota(jnp.int32, (1, dim), 1)
            keys = jnp.where(lane < head_dim, keys, jnp.zeros_like(keys))
        scale = softmax_scale
        if has_kv_scales:
            scale = scales_ref[0] * softmax_scale
        scores = scores_of(query, keys, scale, soft_cap)
        row = field(QUERY_BLOCK) * query_rows + row_ref[...]  # [G * rows, 1]
        position = row + field(POSITION_OFFSET)
        key = kv_block * kv_rows + jax.lax.broadcasted_iota(jnp.int32, (1, kv_rows), 1)
        valid = ((row >= field(ROW_LO)) & (row < field(ROW_HI))
                 & (key <= position) & (key < field(KEY_HI)))
        if window_left is not None:
            valid = valid & (key >= position - window_left)
        # Slots no row of this item may read (unused, unowned, past the context) may hold
        # NaN, and 0 * NaN would leak into P @ V.
        slot = kv_block * kv_rows + jax.lax.broadcasted_iota(jnp.int32, (kv_rows, 1), 0)
        values = jnp.where((slot >= field(KEY_LO)) & (slot < field(KEY_HI)), values,
                           jnp.zeros_like(values))
        online_softmax_step(scores, valid, values, m_ref, l_ref, acc_ref)

    @pl.when((field(LAST_OF_BLOCK) != 0) & (kv_block == pl.num_programs(2) - 1))
    def _finish():
        sinks = None if sinks_ref is None else sinks_ref[...]
        out = finish_softmax(m_ref, l_ref, acc_ref, sinks)
        if has_kv_scales:
            out = out * scales_ref[1]
        out_ref[...] = out.reshape(out_ref.shape).astype(out_ref.dtype)


def pallas_tpu_paged(args: PagedArgs, config: PallasTpuPagedConfig, *,
                     interpret: bool = False, kv_scales: jax.Array | None = None,
                     kv_heads: int | None = None,
                     vmem_limit_bytes: int | None = None) -> jax.Array:
    """ragged_paged_attention on TPU (or in TPU interpret mode). Returns [T, Hq, D].

    kv_pages may be float8_e4m3fn or int8 (widened in the kernel to the queries' dtype), with
    kv_scales f32 [2] = (key scale, value scale) multiplying the logits and the output.
    kv_heads: Hkv when kv_pages has padding slots (more than 2 * Hkv) or padding lanes (a
    lane count, a multiple of 128, above D); None: none. vmem_limit_bytes: Mosaic's scoped
    VMEM limit (None: the compiler's default).
    """
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import tpu as pltpu

    num_tokens, q_heads, head_dim = args.queries.shape
    num_pages, page_size, combined_heads, kv_lanes = args.kv_pages.shape
    kv_heads = combined_heads // 2 if kv_heads is None else kv_heads
    group = q_heads // kv_heads
    max_seqs, pages_per_seq = args.page_table.shape
    pages, query_rows = config.pages_per_block, config.query_rows_per_block
    kv_rows = pages * page_size
    num_blocks = cdiv(num_tokens, query_rows)
    padded_tokens = num_blocks * query_rows
    num_kv_blocks = cdiv(pages_per_seq, pages)

    work = work_list(args, query_rows, kv_rows, num_kv_blocks)
    table = args.page_table.reshape(-1)
    num_items = work.shape[0] // NUM_FIELDS

    def page_of(item, kv_block, work_ref, table_ref, index):
        first = work_ref[item * NUM_FIELDS + KV_FIRST]
        last = jnp.maximum(work_ref[item * NUM_FIELDS + KV_LAST], first)
        # Blocks that skip compute map onto a needed one: unchanged index, no DMA.
        kv_block = jnp.clip(kv_block, first, last)
        logical = jnp.minimum(kv_block * pages + index, pages_per_seq - 1)
        seq = work_ref[item * NUM_FIELDS + SEQUENCE]
        return jnp.clip(table_ref[seq * pages_per_seq + logical], 0, num_pages - 1)

    kv = args.kv_pages.astype(block_dtype(args.kv_pages.dtype))
    if kv_lanes % LANES == 0:
        kv = kv.reshape(num_pages, page_size, combined_heads * kv_lanes)

        def kv_spec(index, part):
            return pl.BlockSpec(
                (None, page_size, kv_lanes),
                lambda h, i, kb, work_ref, table_ref: (
                    page_of(i, kb, work_ref, table_ref, index), 0, 2 * h + part))
    else:
        kv = jnp.transpose(kv, (0, 2, 1, 3))

        def kv_spec(index, part):
            return pl.BlockSpec(
                (None, None, page_size, kv_lanes),
                lambda h, i, kb, work_ref, table_ref: (
                    page_of(i, kb, work_ref, table_ref, index), 2 * h + part, 0, 0))

    if jnp.dtype(args.kv_pages.dtype).itemsize == 1:
        dtype = block_dtype(args.queries.dtype)
    else:
        dtype = query_block_dtype(args.queries.dtype, args.kv_pages.dtype)
    queries = jnp.pad(args.queries.astype(dtype),
                      ((0, padded_tokens - num_tokens), (0, 0), (0, kv_lanes - head_dim)))
    queries = jnp.transpose(queries.reshape(padded_tokens, kv_heads, group, kv_lanes),
                            (1, 2, 0, 3))
    head_spec = pl.BlockSpec(
        (None, group, query_rows, kv_lanes),
        lambda h, i, kb, work_ref, table_ref: (h, 0, work_ref[i * NUM_FIELDS + QUERY_BLOCK], 0))
    row_in_block = jnp.tile(jnp.arange(query_rows, dtype=jnp.int32), group)[:, None]

    operands = [queries] + [kv] * (2 * pages) + [row_in_block]
    in_specs = ([head_spec] + [kv_spec(n, 0) for n in range(pages)]
                + [kv_spec(n, 1) for n in range(pages)]
                + [pl.BlockSpec((group * query_rows, 1), lambda h, i, kb, w, t: (0, 0))])
    if args.sinks is not None:
        sinks = jnp.repeat(args.sinks.reshape(kv_heads, group), query_rows, axis=1)
        operands.append(sinks[..., None])
        in_specs.append(pl.BlockSpec((None, group * query_rows, 1),
                                     lambda h, i, kb, w, t: (h, 0, 0)))
    if kv_scales is not None:
        operands.append(jnp.asarray(kv_scales, jnp.float32).reshape(2))
        in_specs.append(pl.BlockSpec(memory_space=pltpu.SMEM))
    # NaN-filled output buffer: any element the kernel fails to write stays NaN.
    out_shape = (kv_heads, group, padded_tokens, kv_lanes)
    # Per shard (shard_map), the buffer and the output vary over the axes the inputs do.
    operands.append(vary_like(jnp.full(out_shape, jnp.nan, dtype), work, table, operands))
    in_specs.append(pl.BlockSpec(memory_space=pl.ANY))

    kernel = functools.partial(
        _paged_kernel, pages_per_block=pages, query_rows=query_rows, kv_rows=kv_rows,
        softmax_scale=args.softmax_scale, soft_cap=args.logits_soft_cap,
        window_left=args.window_left, has_sinks=args.sinks is not None,
        has_kv_scales=kv_scales is not None, head_dim=head_dim)
    rows = group * query_rows
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(kv_heads, num_items, num_kv_blocks),
        in_specs=in_specs,
        out_specs=head_spec,
        scratch_shapes=[pltpu.VMEM((rows, 1), jnp.float32),
                        pltpu.VMEM((rows, 1), jnp.float32),
                        pltpu.VMEM((rows, kv_lanes), jnp.float32)],
    )
    out = pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=out_struct(out_shape, dtype, work, table, operands),
        # Operand indices count the two scalar-prefetch arrays first.
        input_output_aliases={2 + len(operands) - 1: 0},
        # Work items of one query block share its output block and scratch: sequential.
        compiler_params=tpu_compiler_params(
            dimension_semantics=("parallel", "arbitrary", "arbitrary"),
            **({} if vmem_limit_bytes is None else {"vmem_limit_bytes": vmem_limit_bytes})),
        interpret=interpret_params(interpret),
        name="attnbench_paged_pallas_tpu",
    )(work, table, *operands)
    out = jnp.transpose(out, (2, 0, 1, 3))[:num_tokens, :, :, :head_dim]
    return out.reshape(num_tokens, q_heads, head_dim)


VARIANT = Variant(
    name="pallas_tpu",
    op="paged",
    platforms=("tpu",),
    interpretable=True,
    features=frozenset({"sliding_window", "logits_soft_cap", "sinks"}),
    config_class=PallasTpuPagedConfig,
    kernel=pallas_tpu_paged,
    heuristic=heuristic,
    description="Pallas TPU (Mosaic) ragged paged attention: a work list of (query block, "
                "sequence) pairs x blocks of KV pages gathered by BlockSpec index_maps",
)
