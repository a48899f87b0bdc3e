"""Peers: ejkernel's ``ragged_decode_attention`` (what EasyDeL calls for decode steps), on its
XLA, Triton and Pallas TPU platforms.

Its call takes the operator's layout and lengths as they are (query [B, Hq, D], key/value
[B, S, Hkv, D], start and end per row), so nothing is converted. Windows go in as
``(left, 0)`` and per-head sinks as ``softmax_aux`` [Hq, 1] where the platform's interface
documents that form (its Triton interface takes sinks per KV head only, so there sinks are
refused). Each platform's config holds the ``FwdParams`` fields that platform reads; the
rest of ``FwdParams`` is left unset, as ejkernel's own defaults leave it. ejkernel is the
optional ``peers`` extra: without it these variants are unavailable, with that reason.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from .inputs import DecodeArgs, DecodeShape
from ..peers import PeerOrigin, ejkernel_origins
from ..tunables import KernelConfig, POWER_OF_TWO, floor_power_of_two, one_of, tunable
from ..variant import Variant

ALGORITHM = "ragged_decode_attention"


CONFIG_CLASS = "ejkernel.modules.operations.configs.RaggedDecodeAttentionConfig"


def _easydel_entry(platform: str, backend: str):
    """The EasyDeL operation config of a tuned entry: ejkernel's RaggedDecodeAttentionConfig
    with the tuned FwdParams fields and the platform pinned."""
    def entry(key: dict, config: dict) -> dict:
        fields = dict(config)
        if platform == "pallas":
            fields["q_blocksize"] = 1  # what the platform's own default sets
        return {"operation": ALGORITHM, "config_class": CONFIG_CLASS,
                "fields": {"fwd_params": fields, "platform": platform, "backend": backend}}
    return entry


XLA_ORIGIN, TRITON_ORIGIN, PALLAS_TPU_ORIGIN = ejkernel_origins(ALGORITHM, _easydel_entry)


@dataclasses.dataclass(frozen=True)
class EjkernelDecodeXlaConfig(KernelConfig):
    """FwdParams fields the XLA platform reads (default: ejkernel's)."""

    kv_blocksize: int = tunable(256, (64, 128, 256, 512, 1024), POWER_OF_TWO,
                                "cache positions per step of its online-softmax scan")

    def fwd_params(self) -> dict:
        return {"kv_blocksize": self.kv_blocksize}


@dataclasses.dataclass(frozen=True)
class EjkernelDecodeTritonConfig(KernelConfig):
    """FwdParams fields the Triton platform reads (defaults: ejkernel's)."""

    kv_blocksize: int = tunable(256, (64, 128, 256, 512), POWER_OF_TWO,
                                "cache positions per Triton program step")
    num_warps: int = tunable(4, (2, 4, 8), one_of(1, 2, 4, 8, 16), "Triton warps per program")
    num_stages: int = tunable(2, (1, 2, 3), one_of(1, 2, 3, 4, 5),
                              "Triton software-pipelining stages")

    def fwd_params(self) -> dict:
        return {"kv_blocksize": self.kv_blocksize, "num_warps": self.num_warps,
                "num_stages": self.num_stages}


@dataclasses.dataclass(frozen=True)
class EjkernelDecodePallasTpuConfig(KernelConfig):
    """FwdParams fields the Pallas TPU platform reads (its default: min(S, 128) per block,
    one query per block)."""

    kv_blocksize: int = tunable(128, (128, 256, 512, 1024), POWER_OF_TWO,
                                "cache positions per Pallas grid step")

    def invalid_reason(self, shape: DecodeShape) -> str | None:
        if shape.max_len % min(self.kv_blocksize, shape.max_len):
            return f"kv_blocksize {self.kv_blocksize} must divide the cache length {shape.max_len}"
        return None

    def clamp(self, shape: DecodeShape) -> EjkernelDecodePallasTpuConfig:
        return self.replace(kv_blocksize=min(self.kv_blocksize,
                                             floor_power_of_two(shape.max_len)))

    def fwd_params(self) -> dict:
        return {"q_blocksize": 1, "kv_blocksize": self.kv_blocksize}


def _call(origin: PeerOrigin, args: DecodeArgs, config, *, sinks: bool) -> jax.Array:
    from ejkernel.ops import FwdParams

    kernel = origin.load()
    max_len = args.key.shape[1]
    end = jnp.clip(args.sequence_end, 0, max_len)
    start = jnp.clip(args.sequence_start, 0, end)
    window = None if args.window_left is None else (int(min(args.window_left, max_len)), 0)
    aux = args.sinks[:, None] if sinks and args.sinks is not None else None
    return kernel(args.query, args.key, args.value, start, end,
                  softmax_scale=args.softmax_scale, fwd_params=FwdParams(**config.fwd_params()),
                  sliding_window=window, logits_soft_cap=args.logits_soft_cap,
                  softmax_aux=aux)


def ejkernel_decode_xla(args: DecodeArgs, config: EjkernelDecodeXlaConfig, *,
                        interpret: bool = False) -> jax.Array:
    del interpret  # plain XLA runs natively everywhere
    return _call(XLA_ORIGIN, args, config, sinks=True)


def ejkernel_decode_triton(args: DecodeArgs, config: EjkernelDecodeTritonConfig, *,
                           interpret: bool = False) -> jax.Array:
    del interpret  # not interpretable (VARIANT_TRITON)
    return _call(TRITON_ORIGIN, args, config, sinks=False)


def ejkernel_decode_pallas_tpu(args: DecodeArgs, config: EjkernelDecodePallasTpuConfig, *,
                               interpret: bool = False) -> jax.Array:
    if not interpret:
        return _call(PALLAS_TPU_ORIGIN, args, config, sinks=True)
    from ..jax_compat import forced_tpu_interpret_mode
    from ..pallas_tpu_common import interpret_params

    with forced_tpu_interpret_mode(interpret_params(True)):
        return _call(PALLAS_TPU_ORIGIN, args, config, sinks=True)


ALL_FEATURES = frozenset({"sliding_window", "logits_soft_cap", "sinks"})

VARIANT_XLA = Variant(
    name="ejkernel_ragged_decode_xla", op="decode", platforms=("cpu", "gpu", "tpu"),
    interpretable=True, features=ALL_FEATURES, config_class=EjkernelDecodeXlaConfig,
    kernel=ejkernel_decode_xla, heuristic=lambda shape: EjkernelDecodeXlaConfig(),
    description="peer: ejkernel's ragged_decode_attention, XLA platform (blocked online "
                "softmax scan)",
    peer=XLA_ORIGIN)

VARIANT_TRITON = Variant(
    name="ejkernel_ragged_decode_triton", op="decode", platforms=("gpu",),
    # ejkernel launches Triton through its own call path, which has no interpreter mode.
    interpretable=False, features=frozenset({"sliding_window", "logits_soft_cap"}),
    config_class=EjkernelDecodeTritonConfig, kernel=ejkernel_decode_triton,
    heuristic=lambda shape: EjkernelDecodeTritonConfig(),
    description="peer: ejkernel's ragged_decode_attention, Triton platform",
    peer=TRITON_ORIGIN)

VARIANT_PALLAS_TPU = Variant(
    name="ejkernel_ragged_decode_pallas_tpu", op="decode", platforms=("tpu",),
    # Traced under TPU interpret mode (interpret=True on the kernel), ejkernel 0.0.80.3's
    # vmapped Pallas call fails inside JAX 0.10 (`safe_zip() argument 1 has length 2 but
    # argument 0 has length 3`); tests/test_peers.py checks that this is still so.
    interpretable=False, features=ALL_FEATURES, config_class=EjkernelDecodePallasTpuConfig,
    kernel=ejkernel_decode_pallas_tpu,
    heuristic=lambda shape: EjkernelDecodePallasTpuConfig().clamp(shape),
    description="peer: ejkernel's ragged_decode_attention, Pallas TPU platform",
    peer=PALLAS_TPU_ORIGIN)

VARIANTS = (VARIANT_XLA, VARIANT_TRITON, VARIANT_PALLAS_TPU)
