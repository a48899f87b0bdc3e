"""The chips attnbench knows: each normalized device kind's family and on-device cache.

The family lets a chip without its own sweep file or tuned table use those of a sibling
(an H200 those of the H100: same SM, same shared memory, a larger L2 and HBM). The cache
size sizes the buffer that cold-cache timing writes between timed calls.
"""

from __future__ import annotations

import dataclasses

MiB = 1024 * 1024


@dataclasses.dataclass(frozen=True)
class Chip:
    family: str  # a sweep file or a tuned table may name it in place of the kind
    cache_bytes: int  # the last cache level before HBM (L2 on NVIDIA, CMEM on TPU v4)


# L2 sizes from NVIDIA's architecture whitepapers and product briefs.
CHIPS: dict[str, Chip] = {
    "nvidia-a100": Chip("nvidia-ampere", 40 * MiB),
    "nvidia-a800": Chip("nvidia-ampere", 40 * MiB),
    "nvidia-a30": Chip("nvidia-ampere", 24 * MiB),
    "nvidia-a10": Chip("nvidia-ampere", 6 * MiB),
    "nvidia-a10g": Chip("nvidia-ampere", 6 * MiB),
    "nvidia-a40": Chip("nvidia-ampere", 6 * MiB),
    "nvidia-rtx-3090": Chip("nvidia-ampere", 6 * MiB),
    "nvidia-h100": Chip("nvidia-hopper", 50 * MiB),
    "nvidia-h800": Chip("nvidia-hopper", 50 * MiB),
    "nvidia-h200": Chip("nvidia-hopper", 60 * MiB),
    "nvidia-gh200": Chip("nvidia-hopper", 60 * MiB),
    "nvidia-h20": Chip("nvidia-hopper", 60 * MiB),
    "nvidia-l4": Chip("nvidia-ada", 48 * MiB),
    "nvidia-l40": Chip("nvidia-ada", 96 * MiB),
    "nvidia-l40s": Chip("nvidia-ada", 96 * MiB),
    "nvidia-rtx-4090": Chip("nvidia-ada", 72 * MiB),
    "nvidia-b200": Chip("nvidia-blackwell", 126 * MiB),
    "nvidia-gb200": Chip("nvidia-blackwell", 126 * MiB),
    "nvidia-b100": Chip("nvidia-blackwell", 126 * MiB),
    # TPU HBM sits behind no general cache except v4's 128 MiB CMEM.
    "tpu-v4": Chip("tpu-v4", 128 * MiB),
    "tpu-v5e": Chip("tpu-v5", 0),
    "tpu-v5p": Chip("tpu-v5", 0),
    "tpu-v6e": Chip("tpu-v6", 0),
    "tpu-v7x": Chip("tpu-v7", 0),
}
# An unknown GPU's cache is assumed at least this large, so a flush sized from it still
# evicts everything on any GPU listed above.
UNKNOWN_GPU_CACHE_BYTES = max(c.cache_bytes for k, c in CHIPS.items() if k.startswith("nvidia"))


def family_of(device_kind: str) -> str | None:
    """The chip family of a normalized device kind ('nvidia-h200' -> 'nvidia-hopper');
    None for a kind this table does not list (a CPU, an unknown chip)."""
    chip = CHIPS.get(device_kind)
    return chip.family if chip else None


def cache_bytes(device_kind: str, platform: str) -> int:
    """The device cache a cold-cache measurement must evict on this device (0: none).

    A CPU's caches are the host's and are handled by input rotation, so 0 here.
    """
    if device_kind in CHIPS:
        return CHIPS[device_kind].cache_bytes
    return UNKNOWN_GPU_CACHE_BYTES if platform == "gpu" else 0


def generic_sweep_pattern(platform: str) -> str | None:
    """What a sweep file lists in `devices` to be the fallback of a whole platform."""
    return {"gpu": "gpu", "tpu": "tpu"}.get(platform)


def platform_of_kind(device_kind: str) -> str | None:
    """'gpu', 'tpu' or 'cpu' for a normalized device kind, None when it does not say."""
    if device_kind == "cpu":
        return "cpu"
    if device_kind.startswith(("nvidia-", "amd-")):
        return "gpu"
    if device_kind.startswith("tpu-"):
        return "tpu"
    return None


def fallback_names(device_kind: str, platform: str | None = None) -> list[str]:
    """What else a sweep file or table may name to serve this kind, nearest first: the
    chip family, then the whole platform ('gpu', 'tpu')."""
    names = []
    family = family_of(device_kind)
    if family:
        names.append(family)
    generic = generic_sweep_pattern(platform or platform_of_kind(device_kind) or "")
    if generic:
        names.append(generic)
    return names


def siblings_of(device_kind: str) -> list[str]:
    """The other kinds of this kind's chip family, in the order CHIPS lists them."""
    family = family_of(device_kind)
    return [kind for kind, chip in CHIPS.items() if chip.family == family and kind != device_kind]
