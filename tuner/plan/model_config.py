"""A model's attention layer types, read from its Hugging Face ``config.json`` or a preset.

`attnbench sweep --model` and `attnbench lookup --model` tune and look up what a model's
layers call: one attention geometry per layer type (heads, KV heads, head dim, window, logit
soft cap, sinks). The fields read:

- ``num_attention_heads``, ``num_key_value_heads``: required;
- ``head_dim``, else ``hidden_size / num_attention_heads``;
- ``sliding_window`` with ``use_sliding_window`` (false: no layer has a window, as Qwen2
  writes it) and the per-layer ``layer_types`` (``full_attention`` / ``sliding_attention``),
  or ``sliding_window_pattern`` (every N-th layer full); without either, every layer is
  windowed (Mistral), except for model types whose configs leave the alternation implicit;
- ``attn_logit_softcapping`` (``final_logit_softcapping`` caps the LM head, not attention);
- sinks: gpt-oss's attention layers each learn one sink logit per head; its config has no
  field for them, so its model type says so.

Multimodal configs keep these in ``text_config``. A field that would change attention in a
way the operators do not compute (latent attention, chunked attention, ALiBi) is an error
naming it, and so is a missing or malformed required field.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from attnbench.kernels import limited_files

from .presets import MODEL_PRESETS, ModelPreset

LAYER_TYPES = ("full_attention", "sliding_attention")
# Model types whose layers alternate windowed and full attention without saying so in
# config.json (the modelling code decides): windowed on layers i with i % N == 0... N - 2.
IMPLICIT_SLIDING_PATTERN = {"gemma2": 2}
MODEL_TYPES_WITH_SINKS = ("gpt_oss",)
# Fields whose attention the operators do not compute, and what each means.
UNSUPPORTED_FIELDS = {
    "kv_lora_rank": "multi-head latent attention",
    "q_lora_rank": "multi-head latent attention",
    "attention_chunk_size": "chunked local attention",
    "alibi": "ALiBi position biases",
    "use_alibi": "ALiBi position biases",
}
MAX_CONFIG_BYTES = 4 << 20


class ModelConfigError(ValueError):
    """A config.json the operators cannot serve; the message names the field."""


@dataclasses.dataclass(frozen=True)
class LayerType:
    """One attention geometry of a model, and how many of its layers use it."""

    name: str  # full_attention, sliding_attention, or the preset's name
    q_heads: int
    kv_heads: int
    head_dim: int
    sliding_window: int | None
    logits_soft_cap: float | None
    sinks: bool
    layers: int

    @property
    def features(self) -> frozenset[str]:
        present = {"sliding_window": self.sliding_window is not None,
                   "logits_soft_cap": self.logits_soft_cap is not None, "sinks": self.sinks}
        return frozenset(name for name, on in present.items() if on)

    def problem_fields(self) -> dict[str, Any]:
        """The geometry as a sweep file's problem fields."""
        return {"q_heads": self.q_heads, "kv_heads": self.kv_heads, "head_dim": self.head_dim,
                "sliding_window": self.sliding_window, "logits_soft_cap": self.logits_soft_cap,
                "sinks": self.sinks}

    def describe(self) -> str:
        extras = [f"window {self.sliding_window}" if self.sliding_window is not None else "",
                  f"soft cap {self.logits_soft_cap:g}" if self.logits_soft_cap is not None else "",
                  "sinks" if self.sinks else ""]
        shown = ", ".join(e for e in extras if e)
        return (f"{self.name}: Hq={self.q_heads} Hkv={self.kv_heads} D={self.head_dim}"
                f"{', ' + shown if shown else ''} ({self.layers} layer"
                f"{'s' if self.layers != 1 else ''})")


@dataclasses.dataclass(frozen=True)
class ModelAttention:
    """A model's attention layer types (per tensor-parallel shard when `tp` > 1)."""

    name: str
    layer_types: tuple[LayerType, ...]
    tp: int = 1


def _positive_int(config: dict[str, Any], field: str, where: str) -> int:
    if field not in config:
        raise ModelConfigError(f"{where}: missing field {field!r}")
    value = config[field]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ModelConfigError(f"{where}: field {field!r} must be a positive int, got {value!r}")
    return value


def _head_dim(config: dict[str, Any], heads: int, where: str) -> int:
    if config.get("head_dim") is not None:
        return _positive_int(config, "head_dim", where)
    if "hidden_size" not in config:
        raise ModelConfigError(f"{where}: missing field 'head_dim' (or 'hidden_size', from "
                               "which it is hidden_size / num_attention_heads)")
    hidden = _positive_int(config, "hidden_size", where)
    if hidden % heads:
        raise ModelConfigError(f"{where}: field 'hidden_size' {hidden} is not a multiple of "
                               f"num_attention_heads {heads}; give 'head_dim'")
    return hidden // heads


def _window(config: dict[str, Any], where: str) -> int | None:
    if config.get("use_sliding_window") is False or config.get("sliding_window") is None:
        return None
    return _positive_int(config, "sliding_window", where)


def _soft_cap(config: dict[str, Any], where: str) -> float | None:
    value = config.get("attn_logit_softcapping")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ModelConfigError(f"{where}: field 'attn_logit_softcapping' must be a number > 0 "
                               f"or null, got {value!r}")
    return float(value)


def _layer_kinds(config: dict[str, Any], window: int | None, where: str) -> list[str]:
    """Each layer's type, in order."""
    layers = config.get("num_hidden_layers")
    if layers is not None:
        layers = _positive_int(config, "num_hidden_layers", where)
    if config.get("layer_types") is not None:
        kinds = config["layer_types"]
        if not isinstance(kinds, list) or not kinds:
            raise ModelConfigError(f"{where}: field 'layer_types' must be a non-empty list")
        for index, kind in enumerate(kinds):
            if kind not in LAYER_TYPES:
                raise ModelConfigError(f"{where}: field 'layer_types[{index}]' is {kind!r}; "
                                       f"the operators serve {list(LAYER_TYPES)}")
        if layers is not None and len(kinds) != layers:
            raise ModelConfigError(f"{where}: field 'layer_types' lists {len(kinds)} layers, "
                                   f"num_hidden_layers is {layers}")
        if "sliding_attention" in kinds and window is None:
            raise ModelConfigError(f"{where}: field 'sliding_window' is missing or null, but "
                                   "'layer_types' has sliding_attention layers")
        return list(kinds)
    count = layers or 1
    if window is None:
        return ["full_attention"] * count
    pattern = config.get("sliding_window_pattern")
    if pattern is None:
        pattern = IMPLICIT_SLIDING_PATTERN.get(config.get("model_type"))
    elif isinstance(pattern, bool) or not isinstance(pattern, int) or pattern < 1:
        raise ModelConfigError(f"{where}: field 'sliding_window_pattern' must be a positive "
                               f"int, got {pattern!r}")
    if pattern is None:
        return ["sliding_attention"] * count
    return ["full_attention" if (index + 1) % pattern == 0 else "sliding_attention"
            for index in range(count)]


def _check_tp(heads: int, kv_heads: int, tp: int) -> None:
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1 or heads % tp or kv_heads % tp:
        raise ModelConfigError(f"--tp {tp} must be >= 1 and divide num_attention_heads {heads} "
                               f"and num_key_value_heads {kv_heads} (each shard holds whole "
                               "heads)")


def model_from_config(config: Any, where: str = "config.json", tp: int = 1,
                      name: str | None = None) -> ModelAttention:
    """A model's attention layer types from a parsed config.json (per shard of `tp`)."""
    if not isinstance(config, dict):
        raise ModelConfigError(f"{where}: must be a JSON object of model fields")
    name = name or str(config.get("_name_or_path") or config.get("model_type") or where)
    if "num_attention_heads" not in config and isinstance(config.get("text_config"), dict):
        config, where = config["text_config"], f"{where} text_config"
    for field, meaning in UNSUPPORTED_FIELDS.items():
        if config.get(field) not in (None, False, 0):
            raise ModelConfigError(f"{where}: field {field!r} asks for {meaning}, which the "
                                   "attnbench operators do not compute")
    heads = _positive_int(config, "num_attention_heads", where)
    kv_heads = _positive_int(config, "num_key_value_heads", where)
    if heads % kv_heads:
        raise ModelConfigError(f"{where}: field 'num_key_value_heads' {kv_heads} does not "
                               f"divide num_attention_heads {heads}")
    _check_tp(heads, kv_heads, tp)
    head_dim = _head_dim(config, heads, where)
    window = _window(config, where)
    soft_cap = _soft_cap(config, where)
    sinks = config.get("model_type") in MODEL_TYPES_WITH_SINKS
    kinds = _layer_kinds(config, window, where)
    layer_types = tuple(
        LayerType(kind, heads // tp, kv_heads // tp, head_dim,
                  window if kind == "sliding_attention" else None, soft_cap, sinks,
                  kinds.count(kind))
        for kind in LAYER_TYPES if kind in kinds)
    return ModelAttention(name, layer_types, tp)


def model_from_preset(name: str, tp: int = 1) -> ModelAttention:
    """The one layer type of a preset (presets.MODEL_PRESETS), per shard of `tp`."""
    preset: ModelPreset = MODEL_PRESETS[name]
    _check_tp(preset.q_heads, preset.kv_heads, tp)
    layer = LayerType(name, preset.q_heads // tp, preset.kv_heads // tp, preset.head_dim,
                      preset.sliding_window, preset.logits_soft_cap, preset.sinks, 1)
    return ModelAttention(name, (layer,), tp)


def load_model(path_or_name: str, tp: int = 1) -> ModelAttention:
    """A preset's name, a config.json, or a folder holding one."""
    if path_or_name in MODEL_PRESETS:
        return model_from_preset(path_or_name, tp)
    path = Path(path_or_name)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ModelConfigError(
            f"--model {path_or_name!r} is neither a preset ({', '.join(sorted(MODEL_PRESETS))}) "
            "nor a config.json file or a folder holding one")
    try:
        data = limited_files.parse_json(limited_files.read_text(path, MAX_CONFIG_BYTES))
    except limited_files.FileLimitError as error:
        raise ModelConfigError(f"{path}: {error}") from None
    except json.JSONDecodeError as error:
        raise ModelConfigError(f"{path}: is not valid JSON ({error})") from None
    # A folder's config.json is named after the folder (as a checkpoint's is).
    name = path.parent.name if path.name == "config.json" else path.stem
    return model_from_config(data, str(path), tp, name=name or None)
