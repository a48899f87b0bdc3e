"""Kernel compile results of `attnbench check`, kept on disk between runs.

One JSON file per (target, toolchain, variant, variant fingerprint) under the user's cache
folder (``<user cache>/attnbench/static-check``), mapping kernel keys
(:func:`cuda_check.kernel_key`, :func:`tpu_check.program_key`) to what they compiled to. A
change to a variant's code gives it a new fingerprint and so a new file; a new Triton,
jax-triton, libtpu or jaxlib a new folder.
Several checks may share the cache: writes merge under a file lock and replace the file whole.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from typing import Any

from attnbench.kernels.fingerprint import toolchain_versions, variant_fingerprint


def default_cache_dir() -> Path:
    import platformdirs

    return platformdirs.user_cache_path("attnbench") / "static-check"


def _toolchain_tag() -> str:
    versions = toolchain_versions()
    return "_".join(f"{name}-{versions[name]}"
                    for name in ("triton", "jax-triton", "libtpu", "jaxlib"))


def cache_file(folder: Path, target_name: str, variant) -> Path:
    return (Path(folder) / target_name / _toolchain_tag()
            / f"{variant.op}-{variant.name}-{variant_fingerprint(variant)}.json")


def load(path: Path) -> dict[str, dict[str, Any]]:
    """The results in `path` ({} when there is none or it cannot be read: a cache that is
    lost is rebuilt, never trusted half-read)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {key: value for key, value in data.items() if isinstance(value, dict)}


def store(path: Path, results: dict[str, dict[str, Any]]) -> None:
    """Merges `results` into the file at `path` under its lock."""
    from filelock import FileLock

    if not results:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        merged = load(path)
        merged.update(results)
        handle, temporary = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(handle, "w") as file:
            json.dump(merged, file, sort_keys=True)
        os.replace(temporary, path)
