"""Model presets: the attention geometry of real models, for sweep files (`model: NAME`)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class ModelPreset:
    """The attention geometry of a real model (one layer type), for sweep files."""

    q_heads: int
    kv_heads: int
    head_dim: int
    sliding_window: int | None = None
    logits_soft_cap: float | None = None
    sinks: bool = False
    note: str = ""


# Heads and features from the models' published configs. Models that alternate global and
# local layers get one preset per layer type.
MODEL_PRESETS: dict[str, ModelPreset] = {
    "llama-2-7b": ModelPreset(32, 32, 128, note="MHA (a KV head per query head)"),
    "llama-3-8b": ModelPreset(32, 8, 128, note="GQA 4"),
    "llama-3-70b": ModelPreset(64, 8, 128, note="GQA 8"),
    "qwen-2.5-7b": ModelPreset(28, 4, 128, note="GQA 7 (a group that is not a power of two)"),
    "mistral-7b": ModelPreset(32, 8, 128, sliding_window=4096, note="sliding window 4096"),
    "gemma-2-9b": ModelPreset(16, 8, 256, logits_soft_cap=50.0,
                              note="global layers: logit soft cap 50, D=256"),
    "gemma-2-9b-local": ModelPreset(16, 8, 256, sliding_window=4096, logits_soft_cap=50.0,
                                    note="local layers: window 4096 and soft cap 50"),
    "gpt-oss-20b": ModelPreset(64, 8, 64, sliding_window=128, sinks=True,
                               note="banded layers: sinks and window 128"),
    "gpt-oss-20b-full": ModelPreset(64, 8, 64, sinks=True, note="full layers: sinks"),
    "starcoder-15b": ModelPreset(48, 1, 128, note="MQA (one KV head)"),
    "gemma-2b": ModelPreset(8, 1, 256, note="MQA, D=256"),
}
