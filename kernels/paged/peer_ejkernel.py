"""Peers: ejkernel's ``ragged_page_attention_v2`` (what EasyDeL's paged attention calls), on
its XLA, Triton and Pallas TPU platforms.

Its call takes the operator's arguments as they are: the combined [P, page_size, 2 * Hkv, D]
cache with keys and values interleaved, context lengths, page tables, query offsets and the
sequence count; nothing is converted. A window W keeps keys j > p - W (ours: j >= p - left),
so W = left + 1, and a window reaching past every position is passed as none. Sinks go in as
``softmax_aux`` [Hq]. ``compute_dtype`` keeps ejkernel's default (bfloat16), which is what a
caller that does not set it gets. Each platform's config holds the keyword arguments that
platform reads: the XLA platform discards every block size, so it has nothing to tune.
ejkernel is the optional ``peers`` extra.
"""

from __future__ import annotations

import dataclasses

import jax

from .inputs import PagedArgs, PagedShape
from ..peers import PeerOrigin, ejkernel_origins
from ..tunables import KernelConfig, NoConfig, POSITIVE_INT, Rule, one_of, tunable
from ..variant import Variant

ALGORITHM = "ragged_page_attention_v2"
MiB = 1 << 20
POSITIVE_OR_NONE = Rule(lambda v: v is None or POSITIVE_INT.check(v),
                        "None (ejkernel chooses) or a positive int")


CONFIG_CLASS = "ejkernel.modules.operations.configs.RaggedPageAttentionv2Config"


def _easydel_entry(platform: str, backend: str):
    """The EasyDeL operation config of a tuned entry: ejkernel's RaggedPageAttentionv2Config
    with the tuned fields (those left to ejkernel keep the class's defaults) and the
    platform pinned."""
    def entry(key: dict, config: dict) -> dict:
        fields = {name: value for name, value in config.items()
                  if name != "vmem_limit_bytes" and value is not None}
        return {"operation": ALGORITHM, "config_class": CONFIG_CLASS,
                "fields": {**fields, "platform": platform, "backend": backend}}
    return entry


XLA_ORIGIN, TRITON_ORIGIN, PALLAS_TPU_ORIGIN = ejkernel_origins(ALGORITHM, _easydel_entry)


def _pages_reason(pages: int | None, shape: PagedShape) -> str | None:
    if pages is not None and pages > shape.pages_per_seq:
        return (f"num_kv_pages_per_block {pages} must be at most the pages per sequence "
                f"({shape.pages_per_seq})")
    return None


@dataclasses.dataclass(frozen=True)
class EjkernelRaggedPagedTritonConfig(KernelConfig):
    """The v2 keyword arguments the Triton platform reads (ejkernel's defaults)."""

    num_kv_pages_per_block: int | None = tunable(None, (None, 4, 8, 16), POSITIVE_OR_NONE,
                                                 "pages per step of a program's loop")
    num_queries_per_block: int | None = tunable(None, (None, 8, 16, 32), POSITIVE_OR_NONE,
                                                "query tokens per program")
    num_warps: int | None = tunable(None, (None, 4, 8), Rule(
        lambda v: v is None or v in (1, 2, 4, 8, 16), "None or one of [1, 2, 4, 8, 16]"),
        "Triton warps per program")
    num_stages: int | None = tunable(None, (None, 1, 2, 3), Rule(
        lambda v: v is None or v in (1, 2, 3, 4, 5), "None or one of [1, 2, 3, 4, 5]"),
        "Triton software-pipelining stages")

    def invalid_reason(self, shape: PagedShape) -> str | None:
        return _pages_reason(self.num_kv_pages_per_block, shape)


@dataclasses.dataclass(frozen=True)
class EjkernelRaggedPagedPallasTpuConfig(KernelConfig):
    """The v2 keyword arguments the Pallas TPU platform reads (ejkernel's defaults)."""

    num_kv_pages_per_block: int | None = tunable(None, (None, 8, 16, 32, 64), POSITIVE_OR_NONE,
                                                 "pages per flash-attention step")
    num_queries_per_block: int | None = tunable(None, (None, 16, 32, 64), POSITIVE_OR_NONE,
                                                "query tokens per grid step")
    vmem_limit_bytes: int | None = tunable(None, (None, 64 * MiB), POSITIVE_OR_NONE,
                                           "Mosaic's scoped VMEM limit")

    def invalid_reason(self, shape: PagedShape) -> str | None:
        return _pages_reason(self.num_kv_pages_per_block, shape)


def _call(origin: PeerOrigin, args: PagedArgs, config: KernelConfig) -> jax.Array:
    kernel = origin.load()
    max_len = args.page_table.shape[1] * args.kv_pages.shape[1]
    window = None
    if args.window_left is not None and args.window_left < max_len:
        window = args.window_left + 1
    return kernel(args.queries, args.kv_pages, args.context_lens, args.page_table,
                  args.query_start_loc, args.num_seqs.reshape(1),
                  softmax_scale=args.softmax_scale, logits_soft_cap=args.logits_soft_cap,
                  sliding_window=window, softmax_aux=args.sinks, **config.to_dict())


def ejkernel_ragged_paged_xla(args: PagedArgs, config: NoConfig, *,
                              interpret: bool = False) -> jax.Array:
    del interpret  # plain XLA runs natively everywhere
    return _call(XLA_ORIGIN, args, config)


def ejkernel_ragged_paged_triton(args: PagedArgs, config: EjkernelRaggedPagedTritonConfig, *,
                                 interpret: bool = False) -> jax.Array:
    del interpret  # not interpretable (VARIANT_TRITON)
    return _call(TRITON_ORIGIN, args, config)


def ejkernel_ragged_paged_pallas_tpu(args: PagedArgs, config: EjkernelRaggedPagedPallasTpuConfig,
                                     *, interpret: bool = False) -> jax.Array:
    if not interpret:
        return _call(PALLAS_TPU_ORIGIN, args, config)
    from ..jax_compat import forced_tpu_interpret_mode
    from ..pallas_tpu_common import interpret_params

    with forced_tpu_interpret_mode(interpret_params(True)):
        return _call(PALLAS_TPU_ORIGIN, args, config)


ALL_FEATURES = frozenset({"sliding_window", "logits_soft_cap", "sinks"})

VARIANT_XLA = Variant(
    name="ejkernel_rpa_v2_xla", op="paged", platforms=("cpu", "gpu", "tpu"),
    interpretable=True, features=ALL_FEATURES, config_class=NoConfig,
    kernel=ejkernel_ragged_paged_xla, heuristic=lambda shape: NoConfig(),
    description="peer: ejkernel's ragged_page_attention_v2, XLA platform",
    peer=XLA_ORIGIN)

VARIANT_TRITON = Variant(
    name="ejkernel_rpa_v2_triton", op="paged", platforms=("gpu",),
    # ejkernel launches Triton through its own call path, which has no interpreter mode.
    interpretable=False, features=ALL_FEATURES, config_class=EjkernelRaggedPagedTritonConfig,
    kernel=ejkernel_ragged_paged_triton,
    heuristic=lambda shape: EjkernelRaggedPagedTritonConfig(),
    description="peer: ejkernel's ragged_page_attention_v2, Triton platform",
    peer=TRITON_ORIGIN)

VARIANT_PALLAS_TPU = Variant(
    name="ejkernel_rpa_v2_pallas_tpu", op="paged", platforms=("tpu",),
    # JAX 0.10's TPU interpreter cannot read the reshaped VMEM views this kernel takes, as
    # for JAX's own kernel it derives from (kernels/paged/peer_jax_tpu.py), and without
    # block sizes it asks the chip for its tuned ones; tests/test_peers.py checks both.
    interpretable=False, features=ALL_FEATURES, config_class=EjkernelRaggedPagedPallasTpuConfig,
    kernel=ejkernel_ragged_paged_pallas_tpu,
    heuristic=lambda shape: EjkernelRaggedPagedPallasTpuConfig(),
    description="peer: ejkernel's ragged_page_attention_v2, Pallas TPU platform",
    peer=PALLAS_TPU_ORIGIN)

VARIANTS = (VARIANT_XLA, VARIANT_TRITON, VARIANT_PALLAS_TPU)
