"""Every operator and every kernel variant attnbench knows, and the default per platform.

To add a variant: write its module (kernel, config dataclass, heuristic, ``VARIANT``), add
it to ``VARIANTS`` below and, if it should be the untuned choice somewhere, to
``DEFAULT_VARIANT``. To add an operator: write its package (``kernels/<op>/``: inputs,
problem, operator object, reference, variants) and add its ``OPERATOR`` to ``OPERATORS``.
Variant modules import heavy toolchains (triton, torch) lazily, so importing this registry
stays cheap on any install.
"""

from __future__ import annotations

from .decode import cpu_native as decode_cpu_native
from .decode import operator as decode_operator
from .decode import pallas_tpu as decode_pallas_tpu
from .decode import peer_ejkernel as decode_peer_ejkernel
from .decode import peer_jax_gpu as decode_peer_jax_gpu
from .decode import reference as decode_reference
from .decode import triton_splitkv as decode_triton_splitkv
from .decode import xla_blocked as decode_xla_blocked
from .decode import xla_dense as decode_xla_dense
from .operator import Operator
from .paged import cpu_native as paged_cpu_native
from .paged import operator as paged_operator
from .paged import pallas_tpu as paged_pallas_tpu
from .paged import peer_ejkernel as paged_peer_ejkernel
from .paged import peer_jax_gpu as paged_peer_jax_gpu
from .paged import peer_jax_tpu as paged_peer_jax_tpu
from .paged import reference as paged_reference
from .paged import triton_paged as paged_triton
from .paged import xla_blocked as paged_xla_blocked
from .paged import xla_decode as paged_xla_decode
from .paged_v3 import cpu_native as paged_v3_cpu_native
from .paged_v3 import operator as paged_v3_operator
from .paged_v3 import pallas_tpu as paged_v3_pallas_tpu
from .paged_v3 import reference as paged_v3_reference
from .paged_v3 import triton_paged as paged_v3_triton
from .paged_v3 import xla as paged_v3_xla
from .variant import Variant

OPERATORS: tuple[Operator, ...] = (
    decode_operator.OPERATOR,
    paged_operator.OPERATOR,
    paged_v3_operator.OPERATOR,
)

VARIANTS: tuple[Variant, ...] = (
    decode_reference.VARIANT,
    paged_reference.VARIANT,
    decode_xla_blocked.VARIANT,
    decode_xla_dense.VARIANT,
    decode_pallas_tpu.VARIANT,
    decode_triton_splitkv.VARIANT,
    paged_pallas_tpu.VARIANT,
    paged_triton.VARIANT,
    paged_xla_blocked.VARIANT,
    paged_xla_decode.VARIANT,
    paged_v3_reference.VARIANT,
    paged_v3_xla.VARIANT,
    paged_v3_triton.VARIANT,
    paged_v3_pallas_tpu.VARIANT,
    decode_cpu_native.VARIANT,
    paged_cpu_native.VARIANT,
    paged_v3_cpu_native.VARIANT,
    # Peers: other projects' kernels, gated and timed like ours (kernels/peers.py).
    decode_peer_jax_gpu.VARIANT,
    paged_peer_jax_gpu.VARIANT,
    paged_peer_jax_tpu.VARIANT,
    *decode_peer_ejkernel.VARIANTS,  # XLA, Triton, Pallas TPU
    *paged_peer_ejkernel.VARIANTS,
)

# The variants an operator uses when no tuned table entry matches, per (op, platform), in
# order of preference: the first that can run the call is the untuned choice. On a CPU the
# native kernels are several times faster than XLA's, but they exist only where the machine's
# compiler built them; the XLA variants run everywhere.
DEFAULT_VARIANT: dict[tuple[str, str], tuple[str, ...]] = {
    ("decode", "cpu"): ("cpu_native", "xla_blocked"),
    ("decode", "gpu"): ("triton_splitkv",),
    ("decode", "tpu"): ("pallas_tpu",),
    ("paged", "cpu"): ("cpu_native", "xla_decode"),
    ("paged", "gpu"): ("triton",),
    ("paged", "tpu"): ("pallas_tpu",),
    ("paged_v3", "cpu"): ("cpu_native", "xla"),
    ("paged_v3", "gpu"): ("triton",),
    ("paged_v3", "tpu"): ("pallas_tpu",),
}

OPERATOR_NAMES = tuple(operator.name for operator in OPERATORS)
assert all(v.op in OPERATOR_NAMES for v in VARIANTS), "a variant names an unknown operator"
# A peer is measured beside ours, never what an untuned call runs.
assert not any(v.peer for v in VARIANTS
               if (v.op, v.name) in {(op, name) for (op, _), names in DEFAULT_VARIANT.items()
                                     for name in names})


def get_operator(name: str) -> Operator:
    """The operator called `name` ("decode", "paged"); a ValueError listing them otherwise."""
    for operator in OPERATORS:
        if operator.name == name:
            return operator
    raise ValueError(f"op: unknown operator {name!r}; known: {list(OPERATOR_NAMES)}")


def variants(op: str | None = None) -> tuple[Variant, ...]:
    """All registered variants, or those of one operator."""
    return tuple(v for v in VARIANTS if op is None or v.op == op)


def get_variant(op: str, name: str) -> Variant:
    """The variant `name` of `op`; a ValueError listing the known names otherwise."""
    for candidate in VARIANTS:
        if candidate.op == op and candidate.name == name:
            return candidate
    known = [v.name for v in variants(op)]
    raise ValueError(f"variant: unknown {op} variant {name!r}; known: {known}")


def peers(op: str | None = None) -> tuple[Variant, ...]:
    """The registered peer variants (other projects' kernels), or those of one operator."""
    return tuple(v for v in variants(op) if v.peer is not None)


def default_variant(op: str, platform: str, shape=None, interpret: bool = False) -> Variant:
    """The untuned choice of `op` on `platform`: the first of its ``DEFAULT_VARIANT`` that can
    run here (and run `shape`, when given); the last one when none can, so that the error a
    call then raises is about the variant that runs everywhere."""
    names = DEFAULT_VARIANT[(op, platform)]
    for name in names[:-1]:
        variant = get_variant(op, name)
        if shape is None:
            reason = variant.unavailable_reason()
        else:
            reason = variant.unsupported_reason(shape, platform, interpret)
        if reason is None:
            return variant
    return get_variant(op, names[-1])


def default_variant_name(op: str, platform: str) -> str | None:
    """The name of :func:`default_variant`, or None for a platform the operator has none on."""
    if (op, platform) not in DEFAULT_VARIANT:
        return None
    return default_variant(op, platform).name
