"""decode_attention problems: B sequences in a contiguous cache, and their random inputs."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from ..inputs import window_left_of
from ..probes import ProbedRow, draw_sinks, head_temperatures, plant
from ..random_inputs import abstract_feature_kwargs, draw_lengths, feature_kwargs, features_of
from ..schema import Boolean, PositiveInt
from .inputs import DecodeShape


@dataclasses.dataclass(frozen=True)
class DecodeProblem:
    """A decode_attention problem: B sequences in a cache of S positions."""

    batch: int
    max_len: int  # S
    q_heads: int
    kv_heads: int
    head_dim: int
    dtype: str = "bfloat16"
    lengths: str = "uniform"
    min_len: int = 1
    random_start: bool = False  # sequences that begin after position 0 (start > 0)
    sliding_window: int | tuple[int, int] | None = None
    logits_soft_cap: float | None = None
    sinks: bool = False

    op: ClassVar[str] = "decode"
    # The fields a sweep-file problem entry may set besides the shared ones: (type, value
    # when the entry leaves it out).
    # The sweep field that counts sequences (`attnbench sweep --batch` sets it).
    sequences_field: ClassVar[str] = "batch"
    sweep_fields: ClassVar[dict[str, tuple[Any, Any]]] = {
        "batch": (PositiveInt, 8), "random_start": (Boolean, False)}

    @property
    def sequences(self) -> int:
        return self.batch

    def make_inputs(self, seed: int) -> tuple[tuple, dict[str, Any]]:
        """(positional args, keyword args) for decode_attention, drawn fresh from `seed`."""
        rng = np.random.default_rng(seed)
        end = draw_lengths(rng, self.batch, self.min_len, self.max_len, self.lengths)
        start = np.zeros_like(end)
        if self.random_start:
            start = (rng.random(self.batch) * end).astype(np.int32)
        cache = (self.batch, self.max_len, self.kv_heads, self.head_dim)
        query = rng.standard_normal((self.batch, self.q_heads, self.head_dim), np.float32)
        key = rng.standard_normal(cache, np.float32)
        value = rng.standard_normal(cache, np.float32)
        kwargs = feature_kwargs(rng, self.q_heads, self.sliding_window, self.logits_soft_cap,
                                self.sinks)
        query *= head_temperatures(rng, self.q_heads)[None, :, None]
        window_left = window_left_of(self.sliding_window)
        rows = []
        for b in range(self.batch):
            low = int(start[b]) if window_left is None else max(int(start[b]),
                                                                int(end[b]) - 1 - window_left)
            rows.append([ProbedRow(query[b], low, int(end[b]) - 1, self.max_len)]
                        if end[b] > low else [])

        def write_keys(b, g, positions, keys):
            key[b, positions, g] = keys

        log_totals = plant(rng, rows, lambda b, g: key[b, :, g], write_keys,
                           kv_heads=self.kv_heads, softmax_scale=self.head_dim**-0.5,
                           soft_cap=self.logits_soft_cap)
        if self.sinks:
            kwargs["sinks"] = jnp.asarray(draw_sinks(rng, log_totals, self.q_heads,
                                                     self.kv_heads))
        args = (
            jnp.asarray(query, self.dtype), jnp.asarray(key, self.dtype),
            jnp.asarray(value, self.dtype),
            jnp.asarray(start, jnp.int32), jnp.asarray(end, jnp.int32),
        )
        return args, kwargs

    def shape(self, seed: int = 0) -> DecodeShape:
        """The shape descriptor of `make_inputs(seed)` (the same for every seed)."""
        del seed
        return DecodeShape(batch=self.batch, max_len=self.max_len, q_heads=self.q_heads,
                           kv_heads=self.kv_heads, head_dim=self.head_dim, dtype=self.dtype,
                           features=features_of(self))

    def abstract_inputs(self) -> tuple[tuple, dict[str, Any]]:
        """ShapeDtypeStructs for the arrays (no data is made) and the static keywords;
        sinks, an array, come among the keywords as a ShapeDtypeStruct too."""
        struct = jax.ShapeDtypeStruct
        cache = (self.batch, self.max_len, self.kv_heads, self.head_dim)
        arrays = (struct((self.batch, self.q_heads, self.head_dim), self.dtype),
                  struct(cache, self.dtype), struct(cache, self.dtype),
                  struct((self.batch,), "int32"), struct((self.batch,), "int32"))
        return arrays, abstract_feature_kwargs(self)

    def size_text(self) -> str:
        """The sizes in a problem's label."""
        return f"B={self.batch} S={self.max_len}"

    def record_fields(self, shape: DecodeShape) -> dict[str, Any]:
        """The op's own columns of a measurement record."""
        return {"batch": self.batch}

    def constraint_sizes(self, shape: DecodeShape) -> dict[str, Any]:
        """The op's own size names a sweep-file constraint may read."""
        return {"batch": shape.batch}
