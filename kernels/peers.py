"""Where a peer variant comes from: the project that ships the kernel, and its version.

A peer is a kernel another project ships (JAX's own Pallas kernels, ejkernel's), registered
as a variant of one of our operators so it is gated, timed and tuned like ours. Its module
(``kernels/<op>/peer_*.py``) adapts the operator's arguments to the kernel's call and
declares only the features, dtypes and platforms the kernel itself handles; its config
fields are the kernel's own keyword arguments, so a tuned entry is a call a user can make.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import importlib.util
from collections.abc import Callable
from typing import Any

# Formats `attnbench export` writes for the stacks that call peers.
EXPORT_FORMATS = ("easydel", "jax-rpa")


@dataclasses.dataclass(frozen=True)
class PeerOrigin:
    """The project, its distribution and the function a peer variant calls."""

    project: str  # "jax", "ejkernel"
    distribution: str  # the pip distribution whose version is reported
    module: str  # the module defining the kernel's entry point
    function: str  # the entry point, a name in `module`
    extra: str | None = None  # the attnbench extra that installs it, when not a dependency
    # How a tuned entry of this peer is written for the stack that calls it: the format
    # (one of EXPORT_FORMATS) and `export_entry(key, config) -> dict`, the entry in that
    # format's terms (tuner/results/export.py assembles the file).
    export_format: str | None = None
    export_entry: Callable[[dict, dict], dict] | None = None

    @property
    def entry_point(self) -> str:
        return f"{self.module}.{self.function}"

    def version(self) -> str | None:
        return _distribution_version(self.distribution)

    def missing_reason(self) -> str | None:
        """Why the peer's project is not importable here, or None."""
        if self.version() is None:
            hint = f" (pip install 'attnbench[{self.extra}]')" if self.extra else ""
            return f"{self.distribution} is not installed{hint}"
        if not _module_exists(self.module):
            return (f"{self.distribution} {self.version()} has no module {self.module} "
                    "(another version moved or removed it)")
        return None

    def load(self) -> Any:
        """The entry point itself (imports the project)."""
        import importlib

        return getattr(importlib.import_module(self.module), self.function)

    def describe(self) -> dict[str, Any]:
        return {"project": self.project, "distribution": self.distribution,
                "version": self.version(), "entry_point": self.entry_point,
                "extra": self.extra}


@functools.cache
def _distribution_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


@functools.cache
def _module_exists(module: str) -> bool:
    """Whether `module` is installed, found on disk: importing a project (ejkernel takes
    seconds) is left to the first call of its kernel."""
    top, *rest = module.split(".")
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return False
    if spec is None:
        return False
    if not rest:
        return True
    from pathlib import Path

    for location in spec.submodule_search_locations or ():
        base = Path(location).joinpath(*rest)
        if base.with_suffix(".py").is_file() or (base / "__init__.py").is_file():
            return True
    return False


# ejkernel's platform packages and the backend each serves, in the order the peer modules
# register them: XLA (anywhere), Triton (GPUs), Pallas (TPUs).
_EJKERNEL_PLATFORMS = (("_xla", "xla", "any"), ("_triton", "triton", "gpu"),
                       ("_pallas.tpu", "pallas", "tpu"))


def ejkernel_origins(algorithm: str, export_entry: Callable[[str, str], Callable]
                     ) -> tuple[PeerOrigin, ...]:
    """The origins of ejkernel's `algorithm` on its XLA, Triton and Pallas TPU platforms;
    `export_entry(platform, backend)` gives each one's EasyDeL entry writer."""
    return tuple(PeerOrigin(project="ejkernel", distribution="ejkernel",
                            module=f"ejkernel.kernels.{package}.{algorithm}",
                            function=algorithm, extra="peers", export_format="easydel",
                            export_entry=export_entry(platform, backend))
                 for package, platform, backend in _EJKERNEL_PLATFORMS)

