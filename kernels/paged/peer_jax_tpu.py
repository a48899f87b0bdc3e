"""Peer: JAX's Pallas TPU ragged paged attention
(``jax.experimental.pallas.ops.tpu.ragged_paged_attention``).

The kernel vLLM's TPU backend grew from: mixed prefill and decode tokens against the
combined [P, page_size, 2 * Hkv, D] cache, the operator's own layout, so nothing is
converted. Its tunables are the blocks of its grid and Mosaic's VMEM limit; without them it
reads its own table of tuned block sizes (`tuned_block_sizes.py`), which is its default here.
Its entry point takes no ``interpret=``: `interpret=True` traces it under Pallas' forced TPU
interpret mode with the settings our own TPU kernels are checked with, but JAX 0.10's TPU
interpreter cannot read the reshaped VMEM views the kernel takes of its KV buffers
(``AttributeError: 'ReshapeTransform' object has no attribute 'indices'`` when the call
runs), so the variant is not declared interpretable; tests/test_peers.py checks that this
is still so.
"""

from __future__ import annotations

import dataclasses
import importlib

import jax
import jax.numpy as jnp

from .inputs import PagedArgs, PagedShape
from ..jax_compat import forced_tpu_interpret_mode
from ..pallas_tpu_common import interpret_params
from ..peers import PeerOrigin
from ..tunables import KernelConfig, POSITIVE_INT, Rule, tunable
from ..variant import Variant

PACKAGE = "jax.experimental.pallas.ops.tpu.ragged_paged_attention"
MiB = 1 << 20


def tuned_block_sizes_entry(key: dict, config: dict) -> dict:
    """A tuned entry as a line of the kernel's `tuned_block_sizes.py`: its chip name (the
    first two words of the device kind JAX reports: 'TPU v6'), its simplified key (dtypes,
    heads per block, head dim padded to 128, page size, token count and page_size *
    pages_per_seq, as that module's `simplify_key` makes them) and the block sizes."""
    module = _module()
    dtype = jnp.dtype(key["dtype"])
    q_heads_per_block, combined_per_block = module.get_min_heads_per_blk(
        key["q_heads"], 2 * key["kv_heads"], dtype, dtype)
    pages_per_seq = max(key["max_len"] // key["page_size"], 1)
    simplified = importlib.import_module(PACKAGE + ".tuned_block_sizes").simplify_key(
        (dtype, dtype, q_heads_per_block, combined_per_block // 2, key["head_dim"],
         key["page_size"], key["tokens"], pages_per_seq))
    generation = key["device_kind"].removeprefix("tpu-").rstrip("abcdefghijklmnopqrstuvwxyz")
    return {"device": f"TPU {generation}", "key": list(simplified),
            "block_sizes": [config["num_kv_pages_per_block"], config["num_queries_per_block"]]}


ORIGIN = PeerOrigin(project="jax", distribution="jax", module=PACKAGE,
                    function="ragged_paged_attention", export_format="jax-rpa",
                    export_entry=tuned_block_sizes_entry)
LIMIT_OR_NONE = Rule(lambda v: v is None or POSITIVE_INT.check(v),
                     "None (Mosaic's default) or a positive int of bytes")


@dataclasses.dataclass(frozen=True)
class JaxTpuRaggedPagedConfig(KernelConfig):
    """ragged_paged_attention's own keyword arguments."""

    num_kv_pages_per_block: int = tunable(
        16, (8, 16, 32, 64), POSITIVE_INT,
        "pages of one sequence per flash-attention step (at most the pages per sequence)")
    num_queries_per_block: int = tunable(
        32, (8, 16, 32, 64, 128), POSITIVE_INT, "query tokens per grid step")
    vmem_limit_bytes: int | None = tunable(
        None, (None, 64 * MiB), LIMIT_OR_NONE, "Mosaic's scoped VMEM limit")

    def invalid_reason(self, shape: PagedShape) -> str | None:
        if self.num_kv_pages_per_block > shape.pages_per_seq:
            return (f"num_kv_pages_per_block {self.num_kv_pages_per_block} must be at most the "
                    f"pages per sequence ({shape.pages_per_seq})")
        return heads_reason(shape)

    def clamp(self, shape: PagedShape) -> JaxTpuRaggedPagedConfig:
        return self.replace(
            num_kv_pages_per_block=min(self.num_kv_pages_per_block, shape.pages_per_seq))


def _module():
    return importlib.import_module(PACKAGE + ".kernel")


def heads_reason(shape: PagedShape) -> str | None:
    """Why the kernel cannot tile these head counts (its own check), or None."""
    try:
        _module().get_min_heads_per_blk(shape.q_heads, 2 * shape.kv_heads,
                                        jnp.dtype(shape.dtype), jnp.dtype(shape.dtype))
    except ValueError as error:
        return str(error)
    return None


def heuristic(shape: PagedShape) -> JaxTpuRaggedPagedConfig:
    """The kernel's own fallback outside its tuned table (128 pages, 32 queries per block,
    cut to the shape). Its table is keyed by the running chip, which the sweep's parent may
    not ask for; `attnbench export --format jax-rpa` writes entries in that table's form."""
    return JaxTpuRaggedPagedConfig(
        num_kv_pages_per_block=min(128, shape.pages_per_seq),
        num_queries_per_block=min(32, max(shape.num_tokens, 1)))


def jax_tpu_ragged_paged(args: PagedArgs, config: JaxTpuRaggedPagedConfig, *,
                         interpret: bool = False) -> jax.Array:
    """ragged_paged_attention through JAX's TPU kernel. [T, Hq, D]."""
    kernel = ORIGIN.load()
    max_len = args.page_table.shape[1] * args.kv_pages.shape[1]
    # Its window W keeps keys j > p - W; ours keeps j >= p - left. A window reaching past
    # every position is no window (and W must fit int32 inside the kernel).
    window = None
    if args.window_left is not None and args.window_left < max_len:
        window = args.window_left + 1
    call = lambda: kernel(  # noqa: E731
        args.queries, args.kv_pages, args.context_lens, args.page_table, args.query_start_loc,
        args.num_seqs.reshape(1), sm_scale=args.softmax_scale, sliding_window=window,
        soft_cap=args.logits_soft_cap,
        num_kv_pages_per_block=config.num_kv_pages_per_block,
        num_queries_per_block=config.num_queries_per_block,
        vmem_limit_bytes=config.vmem_limit_bytes)
    if not interpret:
        return call()
    with forced_tpu_interpret_mode(interpret_params(True)):
        return call()


VARIANT = Variant(
    name="jax_tpu_ragged_paged_attention",
    op="paged",
    platforms=("tpu",),
    interpretable=False,  # see the module docstring
    features=frozenset({"sliding_window", "logits_soft_cap"}),
    config_class=JaxTpuRaggedPagedConfig,
    kernel=jax_tpu_ragged_paged,
    heuristic=heuristic,
    description="peer: JAX's Pallas TPU ragged paged attention (mixed prefill and decode)",
    peer=ORIGIN,
)
