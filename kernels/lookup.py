"""Which variant and config an operator call uses: the tuned-table lookup.

Sources, first hit wins:
  1. an explicit ``config=`` (applied to ``variant=`` or the platform's default variant);
  2. the file or folder named by ``$ATTNBENCH_TUNED``;
  3. the user's tuned folder (``$XDG_DATA_HOME/attnbench/tuned``, where ``attnbench sweep``
     installs its winners);
  4. the tables shipped with the package under ``results/tuned/``.
Within a source, entries must match the key's discrete fields exactly; among those the
nearest size bucket (log2 distance) wins, after its config is clamped to the actual shape
and re-checked. With no exact match in any source (nor on a sibling chip), the nearest
entry tuned on this device for other head counts is used: same op, dtype, head dim, page
size and features; nearest group size Hq/Hkv, then KV heads, then size buckets (each a log2
distance); the first whose config is valid for the actual shape wins, and its source names
the key it was tuned for. No match: the variant's heuristic default, with one warning per
key. `Choice.chain` records each step, for `attnbench lookup`.
An entry tuned on other code of its variant (its recorded fingerprint differs) is skipped.

This runs at trace time and is memoized, so a jitted call pays nothing per step.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import platformdirs

from . import devices, registry
from .fingerprint import code_status
from .platform import current_device_kind, current_platform
from .table import (NEAREST_FIELDS, Entry, Table, TableError, group_size, key_distance,
                    key_text, make_key, nearest_distance, read_table)
from .tunables import KernelConfig
from .variant import UnsupportedError, Variant

TUNED_ENV = "ATTNBENCH_TUNED"


def user_tuned_dir() -> Path:
    """Where `attnbench sweep` installs tuned tables for this user (the user data folder:
    ``$XDG_DATA_HOME/attnbench/tuned`` on Linux)."""
    return platformdirs.user_data_path("attnbench") / "tuned"


def shipped_tuned_dir() -> Path:
    """The tables that ship inside the package (results/tuned/)."""
    # Installed packages are plain folders (the package data is not zipped), so the
    # resource is a real path the table reader can stat and glob.
    return Path(str(importlib.resources.files("attnbench") / "results" / "tuned"))


def table_sources() -> list[tuple[str, Path]]:
    """The table sources in priority order, as (label, file or folder)."""
    sources = []
    if os.environ.get(TUNED_ENV):
        named = Path(os.environ[TUNED_ENV])
        if not named.exists() and str(named) not in _warned_keys:
            _warned_keys.add(str(named))
            warnings.warn(f"attnbench: ${TUNED_ENV} names {named}, which does not exist; "
                          "it is ignored", stacklevel=2)
        sources.append((f"${TUNED_ENV}", named))
    sources.append(("user tuned folder", user_tuned_dir()))
    sources.append(("shipped tables", shipped_tuned_dir()))
    return sources


def _files_of(path: Path) -> list[Path]:
    """The table files of a source: regular files only (a FIFO named *.json would block)."""
    if path.is_dir():
        return sorted(p for p in path.glob("*.json") if p.is_file())
    return [path] if path.is_file() else []


def _fingerprint(path: Path) -> tuple[str, int, int]:
    stat = path.stat()
    return (str(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=256)
def _load(fingerprint: tuple[str, int, int]) -> Table | None:
    """Reads one table file; a bad file gives one warning (per version of it) and None."""
    try:
        return read_table(fingerprint[0])
    except TableError as error:
        warnings.warn(f"attnbench: skipping tuned table {error}", stacklevel=3)
        return None


def tables_in(path: Path) -> list[Table]:
    """The usable tables in a file or folder (unreadable or wrong-schema ones skipped)."""
    tables = []
    for file in _files_of(path):
        try:
            table = _load(_fingerprint(file))
        except OSError:
            continue
        if table is not None:
            tables.append(table)
    return tables


@dataclasses.dataclass(frozen=True)
class Choice:
    """What an operator call will run, and why."""

    variant: Variant
    config: KernelConfig
    key: dict[str, Any]
    # "explicit config", "<label>: <file> entries[i]" (with what it was tuned for when it is
    # a nearest entry), or "heuristic default"
    source: str
    entry: Entry | None = None
    # The lookup's steps in order: sources without an entry, entries passed over and why.
    chain: tuple[str, ...] = ()

    @property
    def kind(self) -> str:
        """tuned (an entry for this key), nearest (one tuned for other heads), heuristic
        (no entry) or explicit (config=)."""
        if self.entry is None:
            return "explicit" if self.source == "explicit config" else "heuristic"
        same = all(self.entry.key.get(field) == self.key.get(field)
                   for field in NEAREST_FIELDS)
        return "tuned" if same else "nearest"


def _config_from(variant: Variant, values: Mapping[str, Any], shape: Any) -> KernelConfig:
    config = variant.config_class.from_mapping(values).clamp(shape)
    reason = config.invalid_reason(shape)
    if reason:
        raise ValueError(f"config: {reason}")
    return config


def _candidates(table: Table, key: dict[str, Any], variant_name: str | None):
    """Entries of `table` that match `key`, nearest bucket first (ties: fastest first)."""
    ranked = []
    for index, entry in enumerate(table.entries):
        if variant_name is not None and entry.variant != variant_name:
            continue
        distance = key_distance(key, entry.key)
        if distance is not None:
            ranked.append((distance, entry.time_us if entry.time_us is not None else float("inf"),
                           index, entry))
    ranked.sort(key=lambda item: item[:3])
    return [(index, entry) for _, _, index, entry in ranked]


def _usable(shape, key, entry: Entry, table: Table, where: str, variant_name, platform,
            interpret, chain: list[str], warn: bool) -> tuple[Variant, KernelConfig] | None:
    """The entry's variant and its config fitted to `shape`, or None (the reason in `chain`)."""
    # Reading the table already refused unknown variants and bad tunables.
    variant = registry.get_variant(shape.op, entry.variant)
    if variant.peer is not None and variant_name is None:
        chain.append(f"passed over {where} ({entry.variant}): a peer's entry serves only "
                     "calls that name the peer")
        return None
    reason = variant.unsupported_reason(shape, platform, interpret)
    if reason:  # e.g. a GPU entry on a CPU: expected, not worth a warning
        chain.append(f"passed over {where} ({entry.variant}): {reason}")
        return None
    if not _code_matches(entry, variant, table, where, key):
        chain.append(f"passed over {where} ({entry.variant}): tuned on other code")
        return None
    try:
        config = _config_from(variant, entry.config, shape)
    except ValueError as error:
        chain.append(f"passed over {where} ({entry.variant}): {error}")
        if warn:
            warnings.warn(f"attnbench: skipping tuned entry {where} for "
                          f"{key_text(key)}: {error}", stacklevel=8)
        return None
    return variant, config


def _from_tables(shape, key, variant_name, platform, interpret,
                 chain: list[str]) -> Choice | None:
    for label, path in table_sources():
        found_any = False
        for table in tables_in(path):
            for index, entry in _candidates(table, key, variant_name):
                found_any = True
                where = f"{table.path} entries[{table.file_index(index)}]"
                usable = _usable(shape, key, entry, table, where, variant_name, platform,
                                 interpret, chain, warn=True)
                if usable is not None:
                    source = f"{label}: {where}"
                    chain.append(f"exact: {source}")
                    return Choice(*usable, key, source, entry)
        if not found_any:
            chain.append(f"exact: no entry in the {label} ({path})")
    return None


def _heads_text(key: dict[str, Any]) -> str:
    return f"Hq={key['q_heads']} Hkv={key['kv_heads']} (group {group_size(key):g})"


def _from_nearest(shape, key, variant_name, platform, interpret,
                  chain: list[str]) -> Choice | None:
    """The nearest entry tuned on this device for other head counts (module docstring)."""
    ranked = []
    for rank, (label, path) in enumerate(table_sources()):
        for table in tables_in(path):
            for index, entry in enumerate(table.entries):
                if variant_name is not None and entry.variant != variant_name:
                    continue
                distance = nearest_distance(key, entry.key)
                # Entries with the key's own heads were tried (and passed over) already.
                if distance is None or distance[:2] == (0.0, 0.0):
                    continue
                time = entry.time_us if entry.time_us is not None else float("inf")
                ranked.append((distance, rank, time, index, label, table, entry))
    ranked.sort(key=lambda item: item[:4])
    if not ranked:
        chain.append("nearest: no entry on this device with the same op, dtype, head dim, "
                     "page size and features")
    for _, _, _, index, label, table, entry in ranked:
        where = f"{table.path} entries[{table.file_index(index)}]"
        usable = _usable(shape, key, entry, table, where, variant_name, platform,
                         interpret, chain, warn=False)
        if usable is not None:
            source = (f"{label}: {where} (nearest entry: tuned for "
                      f"{_heads_text(entry.key)}, {_sizes_text(entry.key)}; this call "
                      f"{_heads_text(key)})")
            chain.append(f"nearest: {source}")
            return Choice(*usable, key, source, entry)
    return None


def _sizes_text(key: dict[str, Any]) -> str:
    from .registry import get_operator

    return " ".join(f"{axis}={key[axis]}" for axis in get_operator(key["op"]).size_axes)


def _from_family_tables(shape, key, variant_name, platform, interpret,
                        chain: list[str]) -> Choice | None:
    """A sibling chip's tuned entry when this device kind has none (an H200 takes an H100's:
    same SMs and shared memory), the sibling named in its source."""
    own = key["device_kind"]
    family = devices.family_of(own)
    for sibling in devices.siblings_of(own):
        found = _from_tables(shape, make_key(shape, sibling), variant_name, platform, interpret,
                             [])
        if found is not None:
            source = f"{found.source} (tuned on {sibling}, same chip family {family}: no table for {own})"
            chain.append(f"family: {source}")
            return dataclasses.replace(found, key=key, source=source)
    if devices.siblings_of(own):
        chain.append(f"family: no exact entry for a sibling of {own} ({family})")
    return None


_warned_keys: set[str] = set()


def _code_matches(entry: Entry, variant: Variant, table: Table, where: str,
                  key: dict[str, Any]) -> bool:
    """False for an entry tuned on other code of its variant (one warning per key); an entry
    that records no code fingerprint is used, with one warning per table."""
    status, why = code_status(entry.source, variant)
    if status == "stale":
        text = f"stale {where} {key_text(key)}"
        if text not in _warned_keys:
            _warned_keys.add(text)
            warnings.warn(f"attnbench: skipping tuned entry {where} for {key_text(key)}: {why}",
                          stacklevel=9)
        return False
    if status == "unknown" and f"unknown {table.path}" not in _warned_keys:
        _warned_keys.add(f"unknown {table.path}")
        warnings.warn(f"attnbench: tuned entry {where} {why}: its provenance is unknown, so it "
                      "is used as it is (warned once per table)", stacklevel=9)
    return True


def _warn_untuned(key: dict[str, Any], variant: Variant) -> None:
    text = key_text(key)
    if text not in _warned_keys:
        _warned_keys.add(text)
        warnings.warn(
            f"attnbench: no tuned config for {text}; using variant {variant.name!r} with its "
            "heuristic default config (run `attnbench sweep` to tune this device)",
            stacklevel=6,  # the user's call of the operator
        )


def _sources_signature() -> tuple:
    signature = []
    for label, path in table_sources():
        try:
            signature.append((label, tuple(_fingerprint(f) for f in _files_of(path))))
        except OSError:
            signature.append((label, ()))
    return tuple(signature)


def choose(
    shape: Any,
    *,
    variant: str | None = None,
    config: Mapping[str, Any] | None = None,
    interpret: bool = False,
    device_kind: str | None = None,
    platform: str | None = None,
) -> Choice:
    """The variant and config a call with this shape runs (see the module docstring)."""
    frozen_config = None if config is None else tuple(sorted(dict(config).items()))
    return _choose(shape, variant, frozen_config, interpret,
                   device_kind or current_device_kind(), platform or current_platform(),
                   _sources_signature())


def _require_support(variant: Variant, shape, platform: str, interpret: bool) -> Variant:
    reason = variant.unsupported_reason(shape, platform, interpret)
    if reason:
        raise UnsupportedError(reason)
    return variant


@functools.lru_cache(maxsize=1024)
def _choose(shape, variant_name, frozen_config, interpret, device_kind, platform, _signature):
    key = make_key(shape, device_kind)
    if variant_name is not None:
        # A variant asked for by name must be able to run this call, whatever the tables say.
        fallback = _require_support(registry.get_variant(shape.op, variant_name), shape,
                                    platform, interpret)
    else:
        fallback = registry.default_variant(shape.op, platform, shape, interpret)
    if frozen_config is not None:
        chosen = _require_support(fallback, shape, platform, interpret)
        return Choice(chosen, _config_from(chosen, dict(frozen_config), shape), key,
                      "explicit config")
    chain: list[str] = []
    found = (_from_tables(shape, key, variant_name, platform, interpret, chain)
             or _from_family_tables(shape, key, variant_name, platform, interpret, chain)
             or _from_nearest(shape, key, variant_name, platform, interpret, chain))
    if found is not None:
        return dataclasses.replace(found, chain=tuple(chain))
    chosen = _require_support(fallback, shape, platform, interpret)
    if chosen.config_class.tunable_names():  # nothing to tune, nothing to warn about
        _warn_untuned(key, chosen)
    chain.append(f"heuristic default of {chosen.name}")
    return Choice(chosen, chosen.default_config(shape), key, "heuristic default", None,
                  tuple(chain))


def clear_caches() -> None:
    """Forgets memoized tables, choices and warnings (tests and long-lived tools use it)."""
    _load.cache_clear()
    _choose.cache_clear()
    _warned_keys.clear()
