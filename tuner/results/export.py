"""`attnbench export`: a tuned table's peer entries, written for the stacks that call them.

- ``easydel``: EasyDeL's ``operation_configs``, ejkernel's config classes with the tuned
  fields and the platform pinned, one set per table key (a model config takes the set of
  its shapes). As JSON (class names and fields; :func:`build_easydel_configs` makes the
  objects) or as a Python file that builds them on import.
- ``jax-rpa``: the block sizes of JAX's TPU ragged paged attention, in the dictionary form of
  its ``tuned_block_sizes.py`` (chip name -> simplified key -> (pages, queries) per block).

Each peer says how one of its entries reads in its format (kernels/peers.py:
``PeerOrigin.export_entry``); entries of our variants, and of peers of another format, are
left out, and an export with nothing to write is an error naming the format.
"""

from __future__ import annotations

import importlib
import json
import pprint
from typing import Any

from attnbench.kernels import registry
from attnbench.kernels.peers import EXPORT_FORMATS
from attnbench.kernels.table import Table, key_text


class ExportError(ValueError):
    """The table holds nothing the asked-for format can express."""


def _entries_in(table: Table, format: str) -> list[tuple[Any, dict]]:
    """(entry, exported) for each entry whose peer writes `format`."""
    if format not in EXPORT_FORMATS:
        raise ExportError(f"format: unknown export format {format!r}; choose from "
                          f"{list(EXPORT_FORMATS)}")
    found = []
    for entry in table.entries:
        try:
            origin = registry.get_variant(entry.op, entry.variant).peer
        except ValueError:
            continue
        if origin is None or origin.export_format != format:
            continue
        found.append((entry, origin.export_entry(entry.key, entry.config)))
    if not found:
        peers = sorted({v.name for v in registry.peers() if v.peer.export_format == format})
        raise ExportError(f"{table.path or 'the table'} has no tuned entry of a peer that "
                          f"{format} takes ({', '.join(peers)}): run a sweep that includes "
                          "them (`attnbench sweep`, peers in the sweep file's variants)")
    return found


def easydel_operation_configs(table: Table) -> list[dict[str, Any]]:
    """Per table key: its text, the key and {operation: {config_class, fields}}."""
    by_key: dict[str, dict[str, Any]] = {}
    for entry, exported in _entries_in(table, "easydel"):
        text = key_text(entry.key)
        item = by_key.setdefault(text, {"key": text, "table_key": entry.key,
                                        "operation_configs": {}, "time_us": {}})
        operation = exported["operation"]
        previous = item["time_us"].get(operation)
        # Two platforms of one operation tuned for one key: the faster one is the choice.
        if previous is None or (entry.time_us or float("inf")) < previous:
            item["operation_configs"][operation] = {"config_class": exported["config_class"],
                                                    "fields": exported["fields"]}
            item["time_us"][operation] = entry.time_us or float("inf")
    return list(by_key.values())


def build_easydel_configs(exported: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The ejkernel config objects of an `easydel` JSON export, per key text (needs
    ejkernel: the `peers` extra)."""
    built = {}
    for item in exported:
        configs = {}
        for operation, spec in item["operation_configs"].items():
            module_name, _, class_name = spec["config_class"].rpartition(".")
            config_class = getattr(importlib.import_module(module_name), class_name)
            configs[operation] = config_class(**spec["fields"])
        built[item["key"]] = configs
    return built


def easydel_json(table: Table) -> str:
    items = [{k: v for k, v in item.items() if k != "time_us"}
             for item in easydel_operation_configs(table)]
    return json.dumps({"format": "easydel", "operation_configs_by_key": items}, indent=2) + "\n"


def easydel_python(table: Table) -> str:
    """A Python file: OPERATION_CONFIGS_BY_KEY maps each key's text to the operation configs
    (ejkernel objects) EasyDeL's model config takes as `operation_configs`."""
    lines = ['"""EasyDeL operation_configs tuned by attnbench, one set per tuned-table key.',
             "",
             "Pick the set of the model's shapes: ``config.operation_configs = "
             "OPERATION_CONFIGS_BY_KEY[key]``.",
             '"""', ""]
    items = easydel_operation_configs(table)
    imports = sorted({spec["config_class"] for item in items
                      for spec in item["operation_configs"].values()} | {
        "ejkernel.ops.FwdParams"})
    for qualified in imports:
        module_name, _, class_name = qualified.rpartition(".")
        lines.append(f"from {module_name} import {class_name}")
    lines += ["", "OPERATION_CONFIGS_BY_KEY = {"]
    for item in items:
        lines.append(f"    {item['key']!r}: {{")
        for operation, spec in item["operation_configs"].items():
            class_name = spec["config_class"].rpartition(".")[2]
            arguments = []
            for name, value in spec["fields"].items():
                if name == "fwd_params":
                    inner = ", ".join(f"{k}={v!r}" for k, v in value.items())
                    arguments.append(f"fwd_params=FwdParams({inner})")
                else:
                    arguments.append(f"{name}={value!r}")
            lines.append(f"        {operation!r}: {class_name}({', '.join(arguments)}),")
        lines.append("    },")
    lines += ["}", ""]
    return "\n".join(lines)


def jax_rpa_block_sizes(table: Table) -> dict[str, dict[tuple, tuple[int, int]]]:
    """{chip name: {simplified key: (num_kv_pages_per_block, num_queries_per_block)}}."""
    sizes: dict[str, dict[tuple, tuple[int, int]]] = {}
    for _, exported in _entries_in(table, "jax-rpa"):
        sizes.setdefault(exported["device"], {})[tuple(exported["key"])] = tuple(
            exported["block_sizes"])
    return sizes


def jax_rpa_python(table: Table) -> str:
    """TUNED_BLOCK_SIZES in the form of JAX's ragged_paged_attention/tuned_block_sizes.py."""
    text = pprint.pformat(jax_rpa_block_sizes(table), indent=4, width=100)
    return ('"""Block sizes for JAX\'s TPU ragged paged attention, tuned by attnbench.\n\n'
            "Keys as in jax/experimental/pallas/ops/tpu/ragged_paged_attention/"
            "tuned_block_sizes.py:\n(q_dtype, kv_dtype, q heads per block, kv heads per "
            "block, head_dim padded to 128,\npage_size, max_num_batched_tokens, page_size * "
            "pages_per_seq) -> (num_kv_pages_per_block,\nnum_queries_per_block).\n"
            '"""\n\nTUNED_BLOCK_SIZES = ' + text + "\n")


def export_text(table: Table, format: str, python: bool) -> str:
    """The export of `table` in `format` (easydel: Python when `python`, else JSON)."""
    if format == "jax-rpa":
        return jax_rpa_python(table)
    if format == "easydel":
        return easydel_python(table) if python else easydel_json(table)
    _entries_in(table, format)  # raises the unknown-format error
    raise AssertionError(format)
