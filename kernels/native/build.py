"""Builds the native CPU attention library on first use and registers its FFI handlers.

The library is compiled with the machine's C++ compiler against the FFI headers jaxlib ships,
into the user cache folder under a key that hashes the source, the compiler's identity, the
flags and the CPU's features, so a changed source, compiler or machine never reuses a stale
build. A file lock serializes builders of one key: the compiler writes a temporary file that
is renamed into place, so a reader never sees half a library. Any failure (no compiler, a
compile error) is remembered and becomes the reason the native variants are unavailable.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

SOURCE = Path(__file__).with_name("attention.cc")
KERNEL_SOURCES = (SOURCE,)  # fingerprinted with the variants that call the library
HANDLERS = {"attnbench_decode": "attnbench_decode", "attnbench_paged": "attnbench_paged"}
BASE_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC")
# Instruction sets the kernel has dedicated code for; the rest it leaves to the compiler.
_KERNEL_FEATURES = ("avx512f", "avx512bw", "avx512_bf16", "f16c", "avx2", "fma")


class NativeBuildError(RuntimeError):
    """The native library could not be built or loaded; the message says why."""


@dataclass(frozen=True)
class Build:
    library: Path
    flags: tuple[str, ...]


def cpu_features() -> frozenset[str]:
    """The CPU's feature flags as Linux reports them (empty where /proc/cpuinfo is absent)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def compiler() -> str | None:
    """The C++ compiler: $CXX, else g++ or c++ on the PATH."""
    explicit = os.environ.get("CXX")
    if explicit:
        return shutil.which(explicit) or explicit
    return shutil.which("g++") or shutil.which("c++")


def flags(features: frozenset[str], extra: tuple[str, ...] = ()) -> tuple[str, ...]:
    """Native code for this CPU; 512-bit vectors where it has AVX-512, since the compiler
    otherwise keeps to 256 bits on some AVX-512 CPUs (Zen 4 among them)."""
    chosen = BASE_FLAGS + ("-march=native",)
    if "avx512f" in features:
        chosen += ("-mprefer-vector-width=512",)
    return chosen + tuple(extra)


def cache_root() -> Path:
    """$ATTNBENCH_NATIVE_CACHE, else the user cache folder's native/."""
    import platformdirs

    override = os.environ.get("ATTNBENCH_NATIVE_CACHE")
    return Path(override) if override else platformdirs.user_cache_path("attnbench") / "native"


def _compiler_identity(cxx: str) -> str:
    try:
        done = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise NativeBuildError(f"C++ compiler {cxx!r} cannot run: {error}") from error
    if done.returncode != 0:
        raise NativeBuildError(f"C++ compiler {cxx!r} failed on --version: {done.stderr.strip()}")
    return done.stdout.strip()


def build_key(source: bytes, identity: str, chosen_flags: tuple[str, ...],
              features: frozenset[str], include_dir: str) -> str:
    digest = hashlib.sha256()
    for part in (source, identity.encode(), " ".join(chosen_flags).encode(),
                 " ".join(sorted(features)).encode(), include_dir.encode()):
        digest.update(part)
        digest.update(b"\0")
    return digest.hexdigest()[:24]


def build(extra_flags: tuple[str, ...] = (), root: Path | None = None,
          source: Path = SOURCE) -> Build:
    """The library for this machine, compiled now unless the cache holds it."""
    import filelock
    import jax.ffi

    cxx = compiler()
    if cxx is None:
        raise NativeBuildError("no C++ compiler found (set CXX, or install g++)")
    identity = _compiler_identity(cxx)
    features = cpu_features()
    chosen = flags(features, extra_flags)
    include_dir = jax.ffi.include_dir()
    text = source.read_bytes()
    folder = (root or cache_root()) / build_key(text, identity, chosen, features, include_dir)
    library = folder / "libattnbench_native.so"
    if library.exists():
        return Build(library, chosen)
    folder.mkdir(parents=True, exist_ok=True)
    with filelock.FileLock(str(folder / "build.lock"), timeout=600):
        if library.exists():  # another process built it while this one waited
            return Build(library, chosen)
        partial = folder / f"libattnbench_native.so.{os.getpid()}.tmp"
        command = [cxx, *chosen, f"-I{include_dir}", str(source), "-o", str(partial)]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as error:
            raise NativeBuildError(f"{' '.join(command)}: {error}") from error
        if done.returncode != 0:
            partial.unlink(missing_ok=True)
            message = "\n".join(done.stderr.strip().splitlines()[-20:])
            raise NativeBuildError(f"compiling {source.name} failed:\n{message}")
        (folder / "command.txt").write_text(" ".join(command) + "\n")
        os.replace(partial, library)
    return Build(library, chosen)


@functools.cache
def load() -> ctypes.CDLL:
    """Builds (or finds) the library, loads it and registers its handlers with XLA:CPU."""
    import jax.ffi

    # Extra flags (a sanitizer build, say) get a cache entry of their own through the key.
    extra = tuple(os.environ.get("ATTNBENCH_NATIVE_FLAGS", "").split())
    library = ctypes.cdll.LoadLibrary(str(build(extra).library))
    for target, symbol in HANDLERS.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)),
                                    platform="cpu")
    return library


@functools.cache
def unavailable_reason() -> str | None:
    """Why the native variants cannot run here (the builder's message), or None."""
    try:
        load()
    except (NativeBuildError, OSError, AttributeError) as error:
        return f"the native CPU library is unavailable: {error}"
    return None
