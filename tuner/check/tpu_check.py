"""Compile TPU configs through Mosaic on a host without a TPU: libtpu's compile-only devices.

Each config's jitted operator call is traced (milliseconds); configs whose traced programs are
the same text compile to the same executable, so each distinct program (hashed with the
target and the libtpu and jaxlib versions: :func:`program_key`) is compiled once, for a
compile-only device of the target's topology (``jax.experimental.topologies``). A compile
error is the verdict ``compile_error``; a config whose VMEM estimate exceeds the target's
scoped VMEM (or the limit the config raises it to) is ``unlaunchable``.

VMEM per config is the kernel's own estimate (its config's ``vmem_estimate_bytes``; see
``kernels/tpu_limits.py``): the compiled executable's memory analysis covers HBM only, and
Mosaic leaves its VMEM estimate in the executable empty.

Requires libtpu (the `tpu` or `test` extra).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os

import jax

from attnbench.kernels.fingerprint import toolchain_versions
from attnbench.kernels.platform import lowering_for
from attnbench.kernels.tpu_limits import SCOPED_VMEM_BYTES
from attnbench.kernels.tunables import KernelConfig

from .cuda_check import _call_and_inputs


@dataclasses.dataclass(frozen=True)
class TpuTarget:
    name: str  # "v5e"
    topology: str  # a libtpu topology whose compile-only devices stand in for the chip
    device_kind: str  # the normalized kind, e.g. "tpu-v5e"
    scoped_vmem_bytes: int  # what a kernel may use without raising its VMEM limit


TPU_TARGETS = {name: TpuTarget(name, f"{name}:2x2", f"tpu-{name}", SCOPED_VMEM_BYTES[f"tpu-{name}"])
               for name in ("v5e", "v6e")}


def parse_target(text: str) -> TpuTarget:
    """'tpu:v5e' (or 'v5e') -> its TpuTarget; a ValueError lists the known ones."""
    name = text.removeprefix("tpu:")
    if name not in TPU_TARGETS:
        raise ValueError(f"--target: unknown TPU target {text!r}; known: "
                         f"{['tpu:' + known for known in TPU_TARGETS]}")
    return TPU_TARGETS[name]


def tpu_kernel_variants(op: str | None = None) -> list:
    """The variants that compile TPU kernels of their own (those that run natively only
    there). Peers are left to the sweep: their defaults may ask the chip itself (JAX's and
    ejkernel's tables of tuned block sizes), which a compile-only device cannot answer."""
    from attnbench.kernels import registry

    return [v for v in registry.variants(op)
            if tuple(v.platforms) == ("tpu",) and v.peer is None]


@functools.cache
def compile_device(target: TpuTarget):
    """A compile-only TPU device of the target's topology (needs libtpu, not a TPU)."""
    # libtpu's lock file guards a real chip between processes; compile-only devices touch
    # none, and the check's compile processes load libtpu beside this one.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    import libtpu  # noqa: F401 -- a clear ImportError without the tpu extra
    from jax.experimental import topologies

    return topologies.get_topology_desc(target.topology, "tpu").devices[0]


def _traced(problem, variant: str, config: KernelConfig, target: TpuTarget):
    device = compile_device(target)
    sharding = jax.sharding.SingleDeviceSharding(device)
    call, inputs = _call_and_inputs(problem, variant, config)
    specs = [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding) for x in inputs]
    with lowering_for("tpu", target.device_kind), jax.default_device(device):
        return jax.jit(call).trace(*specs)


def program_key(problem, variant: str, config: KernelConfig, target: TpuTarget) -> str:
    """A hash of the traced program (its jaxpr text: kernel body, block shapes, grid,
    compiler parameters), the target and the compiler versions. Launch-code errors propagate."""
    versions = toolchain_versions()
    text = repr((str(_traced(problem, variant, config, target).jaxpr), target.topology,
                 versions["libtpu"], versions["jaxlib"]))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def compile_program(problem, variant: str, config: KernelConfig, target: TpuTarget) -> str:
    """Compiles the call for the target through Mosaic; "" on success, else the error."""
    device = compile_device(target)
    try:
        with jax.default_device(device):
            _traced(problem, variant, config, target).lower().compile()
    except Exception as error:  # noqa: BLE001 -- a config that does not compile is a result
        return f"{type(error).__name__}: {error}"[:2000]
    return ""


def granted_vmem_bytes(config: KernelConfig, target: TpuTarget) -> int:
    """The scoped VMEM a config's kernel gets on the target: the limit it raises the
    compiler's to (its ``vmem_limit_bytes()``), else the target's default."""
    limit = getattr(config, "vmem_limit_bytes", None)
    granted = None if limit is None else limit()
    return target.scoped_vmem_bytes if granted is None else int(granted)


def vmem_estimate(problem, config: KernelConfig) -> int | None:
    """The kernel's own VMEM estimate for this problem, or None if its config has none."""
    estimate = getattr(config, "vmem_estimate_bytes", None)
    return None if estimate is None else int(estimate(problem.shape(0)))
