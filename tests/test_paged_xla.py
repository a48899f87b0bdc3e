"""The XLA ragged_paged_attention variants (xla_blocked, xla_decode) against the reference."""

from __future__ import annotations

import dataclasses
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnbench import kernels
from attnbench.kernels import registry
from attnbench.kernels import PagedShape
from attnbench.kernels.paged.inputs import prepare as prepare_paged
from attnbench.kernels.tunables import sample_configs
from attnbench.tuner.measure.accuracy import judge
from attnbench.kernels.paged.problem import PagedProblem
from checks import run_and_compare

VARIANTS = ("xla_blocked", "xla_decode")


def _seed(*parts) -> int:
    return zlib.crc32(repr(parts).encode())


def _shape(problem: PagedProblem, seed: int) -> PagedShape:
    args, kwargs = problem.make_inputs(seed)
    return prepare_paged(*args, **kwargs)[1]


def _configs(variant_name: str, problem: PagedProblem, count: int, seed: int) -> list:
    """The heuristic default plus `count` sampled valid configs."""
    variant = registry.get_variant("paged", variant_name)
    shape = _shape(problem, seed)
    default = variant.default_config(shape)
    sampled = [c for c in sample_configs(variant.config_class, shape, count, seed) if c != default]
    return [default, *sampled]


def _tiny(**changes) -> PagedProblem:
    base = PagedProblem(num_seqs=3, max_len=37, q_heads=4, kv_heads=2, head_dim=16,
                        page_size=4, dtype="float32", min_len=1)
    return dataclasses.replace(base, **changes)


# Batch kinds x page sizes. Contexts are drawn at random, so most are not multiples of the
# page size; prefill chunks shorter than the context start mid-page.
BATCHES = {
    "decode-p1-mha": _tiny(page_size=1, max_len=19, q_heads=2, kv_heads=2),
    "decode-p16": _tiny(page_size=16, max_len=70, num_seqs=5, padding_tokens=3),
    "prefill-p16-mqa": _tiny(page_size=16, max_len=45, kv_heads=1, prefill_fraction=1.0,
                             prefill_chunk=64, inactive_seqs=2),
    "mixed-p4": _tiny(page_size=4, num_seqs=4, prefill_fraction=0.5, prefill_chunk=9,
                      padding_tokens=5, inactive_seqs=1, lengths="long_tail"),
    "mixed-p128": _tiny(page_size=128, max_len=300, num_seqs=4, prefill_fraction=0.5,
                        prefill_chunk=20, padding_tokens=2),
}


@pytest.mark.parametrize("batch", sorted(BATCHES))
@pytest.mark.parametrize("variant", VARIANTS)
def test_batches_with_default_and_sampled_configs(variant, batch):
    problem = BATCHES[batch]
    seed = _seed(variant, batch)
    for index, config in enumerate(_configs(variant, problem, 1, seed)):
        run_and_compare(problem, variant, config, seed=seed + index)


FEATURES = {
    "window-int": dict(sliding_window=5),
    "window-tuple-soft-cap": dict(sliding_window=(6, 0), logits_soft_cap=2.0),
    "sinks": dict(sinks=True),
    "all-window-1": dict(sliding_window=1, logits_soft_cap=3.0, sinks=True),
}


def _feature_problem(variant: str, dtype: str = "float32", **features) -> PagedProblem:
    """xla_decode's own path runs on decode-only batches (others go to xla_blocked)."""
    fraction = 0.0 if variant == "xla_decode" else 0.5
    return _tiny(num_seqs=4, max_len=29, prefill_fraction=fraction, prefill_chunk=11,
                 padding_tokens=2, dtype=dtype, **features)


@pytest.mark.parametrize("feature", sorted(FEATURES))
@pytest.mark.parametrize("variant", VARIANTS)
def test_features(variant, feature):
    seed = _seed(variant, feature)
    problem = _feature_problem(variant, **FEATURES[feature])
    config = _configs(variant, problem, 1, seed)[-1]  # a sampled one where there is one
    run_and_compare(problem, variant, config, seed=seed)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])  # float32: every other test
@pytest.mark.parametrize("variant", VARIANTS)
def test_half_dtypes(variant, dtype):
    problem = _feature_problem(variant, dtype, sliding_window=9, logits_soft_cap=4.0, sinks=True)
    run_and_compare(problem, variant, None, seed=_seed(variant, dtype))


@dataclasses.dataclass(frozen=True)
class FixedBatch:
    """A hand-written batch for run_and_compare: sequences given as (context, q_len)."""

    sequences: tuple[tuple[int, int], ...]
    page_size: int = 4
    pages_per_seq: int = 6
    q_heads: int = 4
    kv_heads: int = 2
    head_dim: int = 16
    dtype: str = "float32"
    padding_tokens: int = 2
    inactive_seqs: int = 1

    op = "paged"

    def make_inputs(self, seed: int):
        rng = np.random.default_rng(seed)
        max_seqs = len(self.sequences) + self.inactive_seqs
        num_pages = max_seqs * self.pages_per_seq + 3
        table = rng.permutation(num_pages)[: max_seqs * self.pages_per_seq]
        q_lens = [q for _, q in self.sequences]
        starts = np.concatenate([[0], np.cumsum(q_lens)])
        starts = np.concatenate([starts, np.full(self.inactive_seqs, starts[-1])])
        contexts = [c for c, _ in self.sequences] + [0] * self.inactive_seqs
        num_tokens = int(sum(q_lens)) + self.padding_tokens
        args = (
            jnp.asarray(rng.standard_normal((num_tokens, self.q_heads, self.head_dim)),
                        self.dtype),
            jnp.asarray(rng.standard_normal(
                (num_pages, self.page_size, 2 * self.kv_heads, self.head_dim)), self.dtype),
            jnp.asarray(contexts, jnp.int32),
            jnp.asarray(table.reshape(max_seqs, self.pages_per_seq), jnp.int32),
            jnp.asarray(starts, jnp.int32),
            jnp.asarray(len(self.sequences), jnp.int32),
        )
        return args, {}


@pytest.mark.parametrize("variant", VARIANTS)
def test_prefill_chunk_starting_mid_page_and_empty_sequences(variant):
    # (context, q_len): a chunk starting at position 7 of page 1 (page_size 4), one starting
    # at a page boundary, a decode row, a sequence with keys but no query row, and a
    # sequence with no keys at all, whose row must give zeros.
    batch = FixedBatch(sequences=((13, 6), (8, 4), (21, 1), (9, 0), (0, 0), (24, 24)))
    default, *sampled = _configs(variant, batch, 1, 5)
    other_copy = "heads" if default.page_copy == "pages" else "pages"
    for index, config in enumerate([default, default.replace(page_copy=other_copy), *sampled]):
        run_and_compare(batch, variant, config, seed=index)


@pytest.mark.parametrize("variant", ("reference", *VARIANTS))
def test_nan_in_a_valid_key_reaches_its_rows_and_a_masked_one_nothing(variant):
    # Decode rows, so xla_decode takes its own path: (context, q_len) per sequence.
    batch = FixedBatch(sequences=((13, 1), (8, 1), (21, 1)), inactive_seqs=0)
    args, _ = batch.make_inputs(6)
    queries, kv_pages, contexts, table, starts, count = args
    run = jax.jit(lambda *a: kernels.ragged_paged_attention(*a, variant=variant))
    clean = np.asarray(run(*args))
    page_size = batch.page_size
    # Key position 5 of sequence 1 (context 8) is valid; position 14 of sequence 0 (context
    # 13) lies in a page it uses but past its context.
    valid_page, masked_page = int(table[1, 5 // page_size]), int(table[0, 14 // page_size])
    poisoned = (kv_pages.at[valid_page, 5 % page_size, 0::2].set(jnp.nan)
                .at[masked_page, 14 % page_size, 0::2].set(jnp.nan))
    out = np.asarray(run(queries, poisoned, contexts, table, starts, count))
    assert np.all(np.isnan(out[1]))
    np.testing.assert_array_equal(out[[0, 2]], clean[[0, 2]])


def _corrupt(args, *, page_table=None, context_lens=None, num_seqs=None, query_start_loc=None):
    queries, kv_pages, contexts, table, starts, count = args
    return (queries, kv_pages,
            contexts if context_lens is None else context_lens,
            table if page_table is None else page_table,
            starts if query_start_loc is None else query_start_loc,
            count if num_seqs is None else num_seqs)


@pytest.mark.parametrize("variant", VARIANTS)
def test_out_of_range_values_stay_in_bounds(variant):
    """Bad page indices and lengths in one sequence: no crash, finite output, the other
    sequences' rows equal the reference on the clean batch."""
    for fraction in (0.0, 0.5):
        problem = _tiny(num_seqs=4, max_len=24, prefill_fraction=fraction, prefill_chunk=5,
                        padding_tokens=2, inactive_seqs=1)
        args, _ = problem.make_inputs(3)
        starts = np.asarray(args[4])
        rows_of = lambda i: slice(int(starts[i]), int(starts[i + 1]))  # noqa: E731
        clean = kernels.ragged_paged_attention(*args, variant="reference")
        table = np.asarray(args[3]).copy()
        table[1, :] = [10**6, -(10**6), 2**31 - 1, -1, 10**4, 7][: table.shape[1]]
        contexts = np.asarray(args[2]).copy()
        contexts[2] = 10**6
        bad_cases = {
            "pages of seq 1, context of seq 2": (
                _corrupt(args, page_table=jnp.asarray(table),
                         context_lens=jnp.asarray(contexts)), (0, 3)),
            "negative context of seq 1": (
                _corrupt(args, context_lens=jnp.asarray(args[2]).at[1].set(-50)), (0, 2, 3)),
        }
        run = jax.jit(lambda *a: kernels.ragged_paged_attention(*a, variant=variant))
        for name, (bad_args, good_seqs) in bad_cases.items():
            out = np.asarray(run(*bad_args), np.float32)
            assert np.all(np.isfinite(out)), name
            for i in good_seqs:
                accuracy = judge(out[rows_of(i)], clean[rows_of(i)], problem.dtype)
                assert accuracy.ok, f"{variant} {name}: sequence {i}: {accuracy.reason}"
            assert not np.any(out[int(starts[4]):]), f"{name}: padding rows are not zero"
        # num_seqs and query_start_loc far out of range: no crash, finite.
        for bad_args in (
            _corrupt(args, num_seqs=jnp.asarray(10**6, jnp.int32)),
            _corrupt(args, num_seqs=jnp.asarray(-5, jnp.int32)),
            _corrupt(args, query_start_loc=jnp.asarray(args[4])[::-1] * 1000),
        ):
            assert np.all(np.isfinite(np.asarray(run(*bad_args), np.float32)))


@pytest.mark.parametrize("variant", VARIANTS)
def test_invalid_configs_are_refused(variant):
    problem = _tiny(num_seqs=2, max_len=16, page_size=4)  # pages_per_seq 4, T 2
    args, _ = problem.make_inputs(0)
    config_class = registry.get_variant("paged", variant).config_class
    with pytest.raises(ValueError, match="kv_pages_per_block must be a power of two"):
        config_class(kv_pages_per_block=3)
    with pytest.raises(ValueError, match="unknown tunable"):
        kernels.ragged_paged_attention(*args, variant=variant, config={"block": 4})
    # Too many pages per block for this page table: refused by name, after clamping
    # could not help (explicit configs are clamped, so use a rule clamping cannot fix).
    shape = _shape(problem, 0)
    too_big = config_class(kv_pages_per_block=8)
    assert "kv_pages_per_block" in too_big.invalid_reason(shape)
    assert too_big.clamp(shape).invalid_reason(shape) is None


@pytest.mark.parametrize("variant", VARIANTS)
def test_heuristic_is_valid_for_many_shapes(variant):
    v = registry.get_variant("paged", variant)
    for tokens in (1, 3, 8, 1000):
        for page_size in (1, 16, 128):
            for pages_per_seq in (1, 2, 5, 512):
                for q_heads, kv_heads in ((32, 8), (4, 1), (64, 64)):
                    shape = PagedShape(
                        num_tokens=tokens, max_seqs=max(tokens // 2, 1),
                        pages_per_seq=pages_per_seq, page_size=page_size,
                        num_pages=pages_per_seq * 4, q_heads=q_heads, kv_heads=kv_heads,
                        head_dim=128, dtype="bfloat16")
                    config = v.default_config(shape)
                    assert config.invalid_reason(shape) is None, (shape, config)


def test_cpu_default_is_an_xla_variant():
    # That both run on the CPU with every feature is what the tests above exercise.
    assert registry.DEFAULT_VARIANT[("paged", "cpu")][-1] in VARIANTS
