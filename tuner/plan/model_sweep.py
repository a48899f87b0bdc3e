"""A sweep of one model's attention layer types, made from a device's sweep file.

The device's file keeps what it knows about the device (variants, grids, constraints,
timing, search); its problems become templates: each template's sizes and length
distribution are kept (or replaced by ``--batch``, ``--context``, ``--page-size``), and its
model geometry is replaced by each of the model's layer types. The result is an ordinary
sweep file, written out so that the run folder keeps it and ``--resume`` reads it.
"""

from __future__ import annotations

import copy
import itertools
import json
from pathlib import Path
from typing import Any

import yaml

from attnbench.kernels import registry

from . import sweep_file
from .model_config import ModelAttention

# The fields of a problem entry that say which model it is; a layer type replaces them.
GEOMETRY_FIELDS = ("model", "q_heads", "kv_heads", "head_dim", "sliding_window",
                   "logits_soft_cap", "sinks")


def _size_overrides(op: str, batch: list[int], context: list[int],
                    page_size: list[int]) -> list[dict[str, Any]]:
    """Every combination of the sizes asked for, as this op's problem fields."""
    problem_class = registry.get_operator(op).problem_class
    axes: dict[str, list[int]] = {}
    if batch:
        axes[problem_class.sequences_field] = batch
    if context:
        axes["context"] = context
    if page_size and "page_size" in problem_class.sweep_fields:
        axes["page_size"] = page_size
    return [dict(zip(axes, values)) for values in itertools.product(*axes.values())]


def _layer_entry(template: dict[str, Any], layer_fields: dict[str, Any],
                 sizes: dict[str, Any]) -> dict[str, Any]:
    entry = {name: value for name, value in template.items() if name not in GEOMETRY_FIELDS}
    entry.update(sizes)
    entry.update({name: value for name, value in layer_fields.items()
                  if value is not None and value is not False})
    if "context" in sizes and isinstance(entry.get("min_len"), int):
        # A template's shortest length may exceed a shorter context asked for.
        entry["min_len"] = min(entry["min_len"], sizes["context"])
    return entry


def model_sweep_data(base: dict[str, Any], model: ModelAttention, *,
                     batch: list[int] = (), context: list[int] = (),
                     page_size: list[int] = ()) -> dict[str, Any]:
    """The sweep file (as data) of `model`'s layer types, from a device sweep file's data."""
    data = copy.deepcopy(base)
    data["name"] = f"{base.get('name') or 'sweep'}-{model.name}"
    layers = "; ".join(layer.describe() for layer in model.layer_types)
    shards = f", per shard of {model.tp}" if model.tp > 1 else ""
    data["description"] = f"{model.name} ({layers}{shards}) on the problems of {base.get('name')}"
    for op, section in (data.get("ops") or {}).items():
        if not isinstance(section, dict) or not isinstance(section.get("problems"), list):
            continue  # the loader reports it, located
        entries, seen = [], set()
        for template in section["problems"]:
            if not isinstance(template, dict):
                continue
            for sizes in _size_overrides(op, list(batch), list(context), list(page_size)):
                for layer in model.layer_types:
                    entry = _layer_entry(template, layer.problem_fields(), sizes)
                    text = json.dumps(entry, sort_keys=True)
                    if text not in seen:
                        seen.add(text)
                        entries.append(entry)
        section["problems"] = entries
    return data


def write_model_sweep(base_path: Path, model: ModelAttention, folder: Path, *,
                      batch: list[int] = (), context: list[int] = (),
                      page_size: list[int] = ()) -> Path:
    """Writes the model's sweep file into `folder` and checks it; returns its path.
    SweepFileError names the base file's problems, or the derived file's."""
    base, _, problems = sweep_file.read_sweep_data(base_path)
    if not problems and not isinstance(base, dict):
        problems = ["(top level): must be a mapping with devices, ops, ..."]
    if problems:
        raise sweep_file.SweepFileError(str(base_path), problems)
    base = {**base, "name": base.get("name") or base_path.stem}
    data = model_sweep_data(base, model, batch=batch, context=context, page_size=page_size)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{data['name']}.yaml"
    header = (f"# Made by `attnbench sweep --model` from {base_path}: its variants, grids and "
              "timing, the model's layer types.\n")
    path.write_text(header + yaml.safe_dump(data, sort_keys=False, width=100))
    sweep_file.load_sweep(path)
    return path
