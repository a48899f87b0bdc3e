"""ragged_paged_attention as blocked online softmax in plain XLA, one sequence at a time.

A loop over the active sequences; inside it a loop over blocks of ``queries_per_block`` query
rows of that sequence, and inside that a loop over blocks of ``kv_pages_per_block`` pages,
gathered through the page table, with a running (max, sum, output) per query row. Every trip
count is dynamic: a sequence costs the pages its rows can see (up to its context length,
from the window's start), never the whole page table row, and no whole cache is built.

Sequences of exactly one query row (decode rows) take a path with one-row query blocks, so a
mixed batch does not pay ``queries_per_block`` rows of work for each decode row.

The pieces shared with the decode-specialized variant (``xla_decode``) live here too:
sequence layout, one KV block's gather and scores, and its softmax state. The softmax
arithmetic itself (states, merge, sinks) is ``kernels/softmax.py``.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from .. import softmax
from .inputs import PagedArgs, PagedShape
from ..sharding import vary_like
from ..softmax import soft_cap
from ..tunables import POWER_OF_TWO, KernelConfig, cdiv, floor_power_of_two, one_of, tunable
from ..variant import Variant

# A step's score block ([Hkv, group * queries_per_block, kv block positions], float32) above
# this many elements stops fitting any cache and only costs memory.
MAX_SCORE_BLOCK_ELEMENTS = 1 << 22

PAGE_COPIES = ("pages", "heads")


@dataclasses.dataclass(frozen=True)
class XlaBlockedConfig(KernelConfig):
    kv_pages_per_block: int = tunable(
        32, (1, 2, 4, 8, 16, 32, 64, 128), POWER_OF_TWO,
        "pages gathered through the page table and computed together in one KV step")
    queries_per_block: int = tunable(
        64, (1, 8, 16, 32, 64, 128, 256), POWER_OF_TWO,
        "query rows of one sequence computed together (sequences of one row use 1)")
    page_copy: str = tunable(
        "pages", PAGE_COPIES, one_of(*PAGE_COPIES),
        "how a KV block leaves the cache: whole pages then a transpose, or per-head slabs")

    def invalid_reason(self, shape: PagedShape) -> str | None:
        if self.kv_pages_per_block > floor_power_of_two(shape.pages_per_seq):
            return (f"kv_pages_per_block {self.kv_pages_per_block} exceeds pages_per_seq "
                    f"{shape.pages_per_seq} (rounded down to a power of two)")
        if self.queries_per_block > floor_power_of_two(shape.num_tokens):
            return (f"queries_per_block {self.queries_per_block} exceeds the query rows "
                    f"T = {shape.num_tokens} (rounded down to a power of two)")
        elements = (shape.q_heads * self.queries_per_block
                    * self.kv_pages_per_block * shape.page_size)
        if elements > MAX_SCORE_BLOCK_ELEMENTS:
            return (f"a score block of Hq x queries_per_block x kv_pages_per_block x page_size "
                    f"= {elements} elements exceeds {MAX_SCORE_BLOCK_ELEMENTS}")
        return None

    def clamp(self, shape: PagedShape) -> XlaBlockedConfig:
        pages = min(self.kv_pages_per_block, floor_power_of_two(shape.pages_per_seq))
        queries = min(self.queries_per_block, floor_power_of_two(shape.num_tokens))
        while (queries > 1 and shape.q_heads * queries * pages * shape.page_size
               > MAX_SCORE_BLOCK_ELEMENTS):
            queries //= 2
        while (pages > 1 and shape.q_heads * queries * pages * shape.page_size
               > MAX_SCORE_BLOCK_ELEMENTS):
            pages //= 2
        return self.replace(kv_pages_per_block=pages, queries_per_block=queries)


def heuristic(shape: PagedShape) -> XlaBlockedConfig:
    """About 512 cache positions (at most 128 pages) per KV step and 64 query rows per
    prefill block: the fastest measured on CPU."""
    return XlaBlockedConfig(
        kv_pages_per_block=min(floor_power_of_two(max(512 // shape.page_size, 1)), 128),
        queries_per_block=64,
        page_copy="pages",
    ).clamp(shape)


# ---- Pieces shared with xla_decode --------------------------------------------------------


class Layout(NamedTuple):
    """Where each sequence's rows and keys are, all indices clamped into range."""

    num_seqs: jax.Array  # int32 scalar in [0, max_seqs]
    row_start: jax.Array  # int32 [max_seqs]: first query row, in [0, T]
    q_len: jax.Array  # int32 [max_seqs]: query rows (0 for inactive sequences)
    context: jax.Array  # int32 [max_seqs]: keys, in [0, pages_per_seq * page_size]


def sequence_layout(args: PagedArgs) -> Layout:
    """The clamped per-sequence layout: no value of the inputs can index out of range."""
    num_tokens = args.queries.shape[0]
    max_seqs, pages_per_seq = args.page_table.shape
    page_size = args.kv_pages.shape[1]
    num_seqs = jnp.clip(args.num_seqs, 0, max_seqs)
    starts = jnp.clip(args.query_start_loc, 0, num_tokens)
    active = jnp.arange(max_seqs) < num_seqs
    # A decreasing query_start_loc (invalid) gives an empty sequence, never a negative
    # row count.
    q_len = jnp.where(active, jnp.maximum(starts[1:] - starts[:-1], 0), 0)
    context = jnp.clip(args.context_lens, 0, pages_per_seq * page_size)
    return Layout(num_seqs, starts[:-1], q_len, context)


def loop_variant(kv_pages: jax.Array, counter: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`kv_pages` tied to a loop counter so XLA cannot hoist work on the whole cache.

    Without this tie, loop-invariant code motion lifts the elementwise op that feeds the
    gather (a bitcast, or XLA:CPU's float32 round trip for 16-bit floats) out of the KV
    loop, applied to the *entire* cache: every call then copies every page. Tied, it stays
    fused into the gather of one block.
    """
    return jax.lax.optimization_barrier((kv_pages, counter))


def gather_kv_block(kv_pages: jax.Array, page_ids: jax.Array,
                    page_copy: str = "pages") -> tuple[jax.Array, jax.Array]:
    """Keys and values of the pages `page_ids` [..., n] (already clamped into [0, P)).

    Returns keys and values [..., Hkv, n * page_size, D], head-major so that both products
    are plain batched matrix products (XLA:CPU is several times slower contracting the
    cache's [position, head, D] layout directly).

    page_copy "pages": gather whole pages (contiguous), then transpose in cache. "heads":
    gather each (page, head) slab straight into the head-major layout (one pass less, but
    page_size x D elements per gathered slice instead of a whole page).
    """
    _, page_size, combined_heads, head_dim = kv_pages.shape
    kv_heads = combined_heads // 2
    dtype = kv_pages.dtype
    if dtype.itemsize == 2:
        # XLA:CPU gathers 16-bit floats through float32 and back; as integers it copies.
        kv_pages = jax.lax.bitcast_convert_type(kv_pages, jnp.uint16)
    lead, count = page_ids.shape[:-1], page_ids.shape[-1]
    if page_copy == "pages":
        block = kv_pages[page_ids].reshape(*lead, count * page_size, kv_heads, 2, head_dim)
        block = jnp.moveaxis(block, -3, -4)  # [..., Hkv, positions, 2, D]
        keys, values = block[..., 0, :], block[..., 1, :]
    elif page_copy == "heads":
        heads = jnp.arange(kv_heads)[:, None]
        pages = page_ids[..., None, :]  # [..., 1, n] against heads [Hkv, 1]
        # Advanced indices split by a slice put their broadcast shape first:
        # [..., Hkv, n, page_size, D].
        keys = kv_pages[pages, :, 2 * heads, :].reshape(*lead, kv_heads, -1, head_dim)
        values = kv_pages[pages, :, 2 * heads + 1, :].reshape(*lead, kv_heads, -1, head_dim)
    else:
        raise ValueError(f"page_copy must be one of {PAGE_COPIES}, got {page_copy!r}")
    if dtype.itemsize == 2:
        keys = jax.lax.bitcast_convert_type(keys, dtype)
        values = jax.lax.bitcast_convert_type(values, dtype)
    return keys, values


def compute_dtype(args: PagedArgs):
    """The dtype the two products take their operands in (accumulation is always float32).

    An 8-bit cache (float8, int8) is read in the queries' dtype: JAX has no implicit
    promotion for float8, and every float8_e4m3fn and int8 value is exact in float16,
    bfloat16 and float32."""
    if jnp.dtype(args.kv_pages.dtype).itemsize == 1:
        return jnp.dtype(args.queries.dtype)
    return jnp.promote_types(args.queries.dtype, args.kv_pages.dtype)


def block_scores(args: PagedArgs, queries: jax.Array, keys: jax.Array) -> jax.Array:
    """Scaled, soft-capped logits of `queries` [..., Hkv, R, D] against `keys` [..., Hkv, N, D].

    Returns float32 [..., Hkv, R, N] (not yet masked).
    """
    dtype = compute_dtype(args)
    scores = jnp.einsum("...hrd,...hnd->...hrn", queries.astype(dtype), keys.astype(dtype),
                        preferred_element_type=jnp.float32)
    return soft_cap(scores * args.softmax_scale, args.logits_soft_cap)


def block_softmax(scores: jax.Array, valid: jax.Array, values: jax.Array) -> softmax.Partial:
    """The softmax state of one KV block: scores f32 [..., R, N], valid bool, values
    [..., N, D]."""

    # 0 * NaN is NaN: a value no row of the block may read is dropped, not just weighted 0.
    values = jnp.where(jnp.any(valid, axis=-2)[..., None], values, 0)

    def weighted_values(weights):
        # Weights stay float32 (values are widened): on XLA:CPU this costs no time and keeps
        # the error ~100x below rounding the weights to a 16-bit cache dtype.
        return jnp.einsum("...rn,...nd->...rd", weights, values.astype(jnp.float32),
                          preferred_element_type=jnp.float32)

    return softmax.block(scores, valid, weighted_values)


def grouped_sinks(args: PagedArgs, rows: int) -> jax.Array | None:
    """sinks [Hq] laid out as the score rows of a query block: [Hkv, rows * G], row-major."""
    if args.sinks is None:
        return None
    kv_heads = args.kv_pages.shape[2] // 2
    group = args.queries.shape[1] // kv_heads
    sinks = args.sinks.reshape(kv_heads, 1, group)
    return jnp.broadcast_to(sinks, (kv_heads, rows, group)).reshape(kv_heads, rows * group)


# ---- The blocked kernel -------------------------------------------------------------------


def _attend_query_block(args: PagedArgs, seq: jax.Array, layout: Layout, first_row: jax.Array,
                        queries: jax.Array, rows: int, pages_per_block: int,
                        page_copy: str) -> jax.Array:
    """Attention of `rows` query rows of sequence `seq`, starting at row `first_row` of it.

    queries: [rows, Hq, D] (rows past the sequence's q_len are ignored). Returns f32
    [rows, Hq, D]. Only the pages between the window start of the first row and the
    position of the last row are gathered.
    """
    num_pages, page_size, combined_heads, head_dim = args.kv_pages.shape
    kv_heads = combined_heads // 2
    q_heads = args.queries.shape[1]
    group = q_heads // kv_heads
    pages_per_seq = args.page_table.shape[1]
    block_len = pages_per_block * page_size

    q_len = layout.q_len[seq]
    context = layout.context[seq]
    row = first_row + jnp.arange(rows)
    row_ok = row < q_len
    position = context - q_len + row  # [rows]
    last_position = context - q_len + jnp.minimum(first_row + rows, q_len) - 1
    first_key = jnp.int32(0)
    if args.window_left is not None:
        first_key = jnp.maximum(context - q_len + first_row - args.window_left, 0)
    first_page = first_key // page_size
    last_page = jnp.maximum(last_position, 0) // page_size
    num_blocks = jnp.where(last_position >= first_key,
                           cdiv(last_page - first_page + 1, pages_per_block), 0)
    table_row = args.page_table[seq]

    # [Hkv, rows * G, D]: the rows of one KV head's scores are (query row, group member).
    grouped = queries.reshape(rows, kv_heads, group, head_dim).transpose(1, 0, 2, 3)
    grouped = grouped.reshape(kv_heads, rows * group, head_dim)
    row_position = jnp.repeat(position, group)  # [rows * G]
    row_valid = jnp.repeat(row_ok, group)

    def body(carry):
        step, state = carry
        kv_pages, step = loop_variant(args.kv_pages, step)
        block_first_page = first_page + step * pages_per_block
        logical = block_first_page + jnp.arange(pages_per_block)
        # Pages past the last needed one re-read that page (already in cache) rather than a
        # page past the context; their positions are masked below.
        logical = jnp.clip(jnp.minimum(logical, last_page), 0, pages_per_seq - 1)
        page_ids = jnp.clip(table_row[logical], 0, num_pages - 1)
        keys, values = gather_kv_block(kv_pages, page_ids, page_copy)
        scores = block_scores(args, grouped, keys)  # [Hkv, rows * G, block_len]
        key_position = block_first_page * page_size + jnp.arange(block_len)
        valid = ((key_position[None, :] <= row_position[:, None])
                 & (key_position[None, :] < context) & row_valid[:, None])
        if args.window_left is not None:
            valid &= key_position[None, :] >= row_position[:, None] - args.window_left
        return step + 1, softmax.merge(state, block_softmax(scores, valid[None], values))

    _, state = jax.lax.while_loop(
        lambda carry: carry[0] < num_blocks, body,
        vary_like((jnp.int32(0), softmax.empty((kv_heads, rows * group), head_dim)), args, seq,
                  queries, first_row))
    out = softmax.finalize(state, grouped_sinks(args, rows))  # [Hkv, rows * G, D]
    return out.reshape(kv_heads, rows, group, head_dim).transpose(1, 0, 2, 3).reshape(
        rows, q_heads, head_dim)


def _attend_sequence(args: PagedArgs, layout: Layout, seq: jax.Array, out: jax.Array,
                     padded_queries: jax.Array, rows: int, pages_per_block: int,
                     page_copy: str) -> jax.Array:
    """Writes sequence `seq`'s rows of `out` ([T + rows, Hq, D] f32), `rows` at a time."""

    def query_block(index, out):
        first_row = index * rows
        start = layout.row_start[seq] + first_row  # <= T: padded_queries has `rows` spare
        queries = jax.lax.dynamic_slice_in_dim(padded_queries, start, rows)
        result = _attend_query_block(args, seq, layout, first_row, queries, rows,
                                     pages_per_block, page_copy)
        # A block may run past this sequence into the next one's rows: keep those.
        keep = (first_row + jnp.arange(rows) < layout.q_len[seq])[:, None, None]
        previous = jax.lax.dynamic_slice_in_dim(out, start, rows)
        return jax.lax.dynamic_update_slice_in_dim(out, jnp.where(keep, result, previous),
                                                   start, 0)

    return jax.lax.fori_loop(0, cdiv(layout.q_len[seq], rows), query_block, out)


def ragged_paged_attention_blocked(args: PagedArgs, config: XlaBlockedConfig, *,
                                   interpret: bool = False) -> jax.Array:
    """The xla_blocked kernel. Returns f32 [T, Hq, D]; rows no sequence owns are zeros."""
    del interpret  # plain XLA runs natively everywhere
    num_tokens, q_heads, head_dim = args.queries.shape
    if num_tokens == 0 or args.kv_pages.shape[0] == 0 or args.page_table.shape[1] == 0:
        return jnp.zeros((num_tokens, q_heads, head_dim), jnp.float32)
    rows = config.queries_per_block
    pages_per_block = config.kv_pages_per_block
    layout = sequence_layout(args)
    spare = jnp.zeros((rows, q_heads, head_dim), args.queries.dtype)
    padded_queries = jnp.concatenate([args.queries, spare])

    def one_sequence(seq, out):
        def decode(out):
            return _attend_sequence(args, layout, seq, out, padded_queries, 1, pages_per_block,
                                    config.page_copy)

        def prefill(out):
            return _attend_sequence(args, layout, seq, out, padded_queries, rows,
                                    pages_per_block, config.page_copy)

        if rows == 1:
            return decode(out)
        return jax.lax.cond(layout.q_len[seq] <= 1, decode, prefill, out)

    out = vary_like(jnp.zeros((num_tokens + rows, q_heads, head_dim), jnp.float32), args)
    out = jax.lax.fori_loop(0, layout.num_seqs, one_sequence, out)
    return out[:num_tokens]


VARIANT = Variant(
    name="xla_blocked",
    op="paged",
    platforms=("cpu", "gpu", "tpu"),
    interpretable=True,
    features=frozenset({"sliding_window", "logits_soft_cap", "sinks"}),
    config_class=XlaBlockedConfig,
    kernel=ragged_paged_attention_blocked,
    heuristic=heuristic,
    description="XLA online softmax per sequence: query-row blocks x gathered KV page blocks, "
                "dynamic trip counts bounded by each context and window",
)
