"""Which machine we are on: the platform family and the normalized device kind."""

from __future__ import annotations

import contextlib
import contextvars
import re

import jax

# Set while lowering for another platform than the local one (e.g. exporting a call for
# CUDA on a CPU-only host), so that variant choice and table keys follow the target.
_target: contextvars.ContextVar[tuple[str, str] | None] = contextvars.ContextVar(
    "attnbench_target", default=None)


@contextlib.contextmanager
def lowering_for(platform: str, device_kind: str):
    """Within this block, operators choose variants as if running on `platform`
    ('cpu', 'gpu' or 'tpu') with the normalized `device_kind` (e.g. 'nvidia-h100')."""
    token = _target.set((platform, device_kind))
    try:
        yield
    finally:
        _target.reset(token)


def lowering_target() -> tuple[str, str] | None:
    """The (platform, device kind) of the enclosing `lowering_for`, or None."""
    return _target.get()


def current_platform() -> str:
    """'cpu', 'gpu' or 'tpu': the family of JAX's default backend (or of `lowering_for`)."""
    if _target.get() is not None:
        return _target.get()[0]
    backend = jax.default_backend()
    return "gpu" if backend in ("gpu", "cuda", "rocm") else backend


def normalize_device_kind(device_kind: str) -> str:
    """A short stable name for a device kind, used in table keys and sweep file matching.

    'NVIDIA H100 80GB HBM3' -> 'nvidia-h100', 'NVIDIA A100-SXM4-40GB' -> 'nvidia-a100',
    'NVIDIA L4' -> 'nvidia-l4', 'NVIDIA GeForce RTX 4090' -> 'nvidia-rtx-4090',
    'TPU v5 lite' -> 'tpu-v5e', 'TPU v6 lite' -> 'tpu-v6e', 'TPU v5p' -> 'tpu-v5p',
    'TPU v5' -> 'tpu-v5p' (how JAX names a v5p), 'TPU7x' -> 'tpu-v7x', 'cpu' -> 'cpu'.
    """
    kind = device_kind.strip().lower()
    if kind in ("cpu", "") or "cpu" in kind:
        return "cpu"
    tpu = re.match(r"tpu\s*v?(\d+)\s*(lite|e|p|x)?", kind)
    if tpu:
        generation, suffix = tpu.groups()
        suffix = {"lite": "e", None: ""}.get(suffix, suffix)
        # The generations that came in one flavour only, or whose bare name is one flavour.
        suffix = suffix or {"5": "p", "7": "x"}.get(generation, "")
        return f"tpu-v{generation}{suffix}"
    if "nvidia" in kind:
        rtx = re.search(r"\brtx\s*(\d{4})\b", kind)
        if rtx:
            return f"nvidia-rtx-{rtx.group(1)}"
        model = re.search(r"\b([a-z]{1,2}\d{1,4}[a-z]?)\b", kind.replace("nvidia", " "))
        if model:
            return f"nvidia-{model.group(1)}"
    return re.sub(r"[^a-z0-9]+", "-", kind).strip("-")


def current_device_kind() -> str:
    """The normalized kind of JAX's first default device (or of `lowering_for`)."""
    if _target.get() is not None:
        return _target.get()[1]
    return normalize_device_kind(jax.devices()[0].device_kind)
