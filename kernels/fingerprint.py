"""What a tuned choice or a compile result depends on: the variant's code and the toolchain.

:func:`variant_fingerprint` hashes the source files that make up a variant's kernel: the
module that defines ``variant.kernel``, its ``<module>_kernels.py`` sibling when there is one,
and the ``attnbench.kernels`` modules it draws code from (launch helpers such as
``triton_launch``), with the non-Python sources those modules name in ``KERNEL_SOURCES``
(the native variants' C++). The modules that only describe a variant (its config classes, the
feature names, the registry) are left out: editing a docstring there should not make every
tuned entry stale. :func:`toolchain_versions` names the versions that change generated code.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import inspect
import sys
import types
from pathlib import Path
from typing import Any

# Modules that describe variants rather than generate code (see the module docstring).
_DESCRIPTIVE = frozenset({"variant", "tunables", "inputs", "registry", "operator", "platform",
                          "peers"})
_TOOLCHAIN = ("attnbench", "jax", "jaxlib", "triton", "jax-triton", "libtpu")


def _kernels_package() -> str:
    return __name__.rsplit(".", 1)[0]


def _referenced_modules(module: types.ModuleType) -> set[str]:
    """The attnbench.kernels modules whose objects `module`'s globals hold."""
    package = _kernels_package()
    found = set()
    for value in vars(module).values():
        name = value.__name__ if isinstance(value, types.ModuleType) else getattr(
            value, "__module__", None)
        if isinstance(name, str) and name.startswith(package + ".") and name != module.__name__:
            if name.rsplit(".", 1)[-1] not in _DESCRIPTIVE:
                found.add(name)
    return found


def variant_files(variant: Any) -> list[Path]:
    """The source files :func:`variant_fingerprint` hashes, in a stable order."""
    module = inspect.getmodule(variant.kernel)
    if module is None or not getattr(module, "__file__", None):
        raise ValueError(f"variant {variant.name!r}: cannot find the module of its kernel")
    own = Path(module.__file__)
    files = {own}
    sibling = own.with_name(own.stem + "_kernels.py")
    if sibling.exists():
        files.add(sibling)
    modules = [module] + [sys.modules[name] for name in _referenced_modules(module)
                          if name in sys.modules]
    for each in modules:
        path = getattr(each, "__file__", None)
        if path:
            files.add(Path(path))
        files.update(Path(source) for source in getattr(each, "KERNEL_SOURCES", ()))
    return sorted(files, key=_relative_name)


def _relative_name(path: Path) -> str:
    """'kernels/decode/reference.py': the file's name inside the package, wherever it lives."""
    root = Path(__file__).resolve().parent.parent
    resolved = path.resolve()
    return str(resolved.relative_to(root)) if resolved.is_relative_to(root) else resolved.name


@functools.cache
def _file_digest(path: Path, size: int, mtime_ns: int) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def variant_fingerprint(variant: Any) -> str:
    """A short hash of the variant's kernel code (see :func:`variant_files`)."""
    digest = hashlib.sha256()
    for path in variant_files(variant):
        stat = path.stat()
        # Names inside the package, so where a checkout lives does not matter.
        digest.update(_relative_name(path).encode() + b"\0")
        digest.update(_file_digest(path, stat.st_size, stat.st_mtime_ns).encode() + b"\0")
    peer = getattr(variant, "peer", None)
    if peer is not None:  # a peer's kernel is its project's code: its version counts
        digest.update(f"{peer.distribution}=={peer.version()} {peer.entry_point}".encode())
    return digest.hexdigest()[:16]


@functools.cache
def toolchain_versions() -> dict[str, str | None]:
    """Installed versions of attnbench and the compilers that generate its kernels' code
    (None for one that is not installed)."""
    versions: dict[str, str | None] = {}
    for name in _TOOLCHAIN:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def provenance(variant: Any) -> dict[str, Any]:
    """What a tuned entry for `variant` records about the code that produced it."""
    return {"fingerprint": variant_fingerprint(variant), "versions": toolchain_versions()}


def code_status(source: Any, variant: Any) -> tuple[str, str]:
    """Whether a tuned entry's recorded code (its ``source``) is the variant's code now:
    ('current', ''), ('stale', why) or ('unknown', why) for an entry that records none
    (tables written before entries carried fingerprints)."""
    recorded = source.get("fingerprint") if isinstance(source, dict) else None
    if recorded is None:
        return "unknown", "records no fingerprint of its variant's code"
    now = variant_fingerprint(variant)
    if recorded != now:
        return "stale", (f"tuned on code {recorded} of variant {variant.name!r}, whose code is "
                         f"now {now}; re-tune it (attnbench sweep)")
    return "current", ""


def table_code_report(table: Any) -> tuple[list[str], list[str]]:
    """(stale entries, warnings) of a read table, each a line naming the entry: entries whose
    variant's code changed since they were tuned, and those that record no fingerprint or
    were tuned with other toolchain versions than the installed ones."""
    from . import registry
    from .table import key_text

    stale, unknown, other_versions = [], 0, {}
    installed = toolchain_versions()
    for position, entry in enumerate(table.entries):
        where = f"entries[{table.file_index(position)}]"
        variant = registry.get_variant(entry.op, entry.variant)
        status, why = code_status(entry.source, variant)
        if status == "stale":
            stale.append(f"{where} ({entry.variant} for {key_text(entry.key)}): stale: {why}")
        unknown += status == "unknown"
        recorded = entry.source.get("versions") if isinstance(entry.source, dict) else None
        for name, version in (recorded or {}).items():
            if name in installed and version != installed[name]:
                other_versions.setdefault((name, version), []).append(where)
    warnings = []
    if unknown:
        warnings.append(f"{unknown} of {len(table.entries)} entries record no fingerprint of "
                        "their variant's code (unknown provenance); lookup uses them as they are")
    for (name, version), places in sorted(other_versions.items(), key=str):
        warnings.append(f"{len(places)} entries ({', '.join(places[:5])}"
                        f"{', ...' if len(places) > 5 else ''}) were tuned with {name} {version}; "
                        f"{installed[name]} is installed")
    return stale, warnings
