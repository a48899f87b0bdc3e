"""The partial-softmax states every XLA variant is built from (kernels/softmax.py), against
the reference's one-pass softmax."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnbench.kernels import softmax
from attnbench.kernels.reference import masked_softmax_attention

ROWS, KEYS, D = 6, 40, 8


def case(seed, *, sinks=False):
    """Scores, a mask with row 0 fully masked and row 1 one key only, values and sinks."""
    rng = np.random.default_rng(seed)
    scores = jnp.asarray(rng.standard_normal((ROWS, KEYS)) * 4, jnp.float32)
    valid = rng.random((ROWS, KEYS)) < 0.6
    valid[0] = False
    valid[1] = np.arange(KEYS) == 17
    values = jnp.asarray(rng.standard_normal((ROWS, KEYS, D)), jnp.float32)
    sink = jnp.asarray(rng.standard_normal(ROWS), jnp.float32) if sinks else None
    return scores, jnp.asarray(valid), values, sink


def state(scores, valid, values):
    return softmax.block(scores, valid, lambda w: jnp.einsum("rn,rnd->rd", w, values))


@pytest.mark.parametrize("sinks", [False, True])
@pytest.mark.parametrize("cuts", [(), (13,), (1, 2, 39), (20, 21, 33)])
def test_blocks_merged_in_any_grouping_equal_the_one_pass_softmax(cuts, sinks):
    scores, valid, values, sink = case(len(cuts), sinks=sinks)
    expected = np.asarray(masked_softmax_attention(scores, valid, values, sink))
    edges = (0, *cuts, KEYS)
    parts = [state(scores[:, a:b], valid[:, a:b], values[:, a:b])
             for a, b in zip(edges, edges[1:])]
    left_to_right = parts[0]
    for part in parts[1:]:
        left_to_right = softmax.merge(left_to_right, part)
    right_to_left = parts[-1]
    for part in reversed(parts[:-1]):
        right_to_left = softmax.merge(part, right_to_left)
    for merged in (left_to_right, right_to_left):
        np.testing.assert_allclose(np.asarray(softmax.finalize(merged, sink)), expected,
                                   rtol=2e-6, atol=2e-6)
    # All blocks at once (padded to one width with masked keys) give the same again.
    width = max(b - a for a, b in zip(edges, edges[1:]))
    pad = lambda x, a, b, fill: jnp.concatenate(  # noqa: E731
        [x[:, a:b], jnp.full((ROWS, width - (b - a)) + x.shape[2:], fill, x.dtype)], axis=1)
    stacked = jax.vmap(state, in_axes=1, out_axes=1)(
        jnp.stack([pad(scores, a, b, 0.0) for a, b in zip(edges, edges[1:])], axis=1),
        jnp.stack([pad(valid, a, b, False) for a, b in zip(edges, edges[1:])], axis=1),
        jnp.stack([pad(values, a, b, 0.0) for a, b in zip(edges, edges[1:])], axis=1))
    at_once = softmax.merge_axis(stacked, axis=1)
    np.testing.assert_allclose(np.asarray(softmax.finalize(at_once, sink)), expected,
                               rtol=2e-6, atol=2e-6)


def test_empty_state_changes_nothing():
    scores, valid, values, _ = case(7)
    full = state(scores, valid, values)
    empty = softmax.empty((ROWS,), D)
    for merged in (softmax.merge(empty, full), softmax.merge(full, empty)):
        for got, want in zip(merged, full):
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_rows_without_a_valid_key_give_zeros_never_nan():
    scores, _, values, _ = case(8)
    nothing = jnp.zeros((ROWS, KEYS), bool)
    empty = state(scores, nothing, values)
    assert np.all(np.asarray(empty.row_max) == -np.inf) and not np.any(np.asarray(empty.total))
    for sinks in (None, jnp.zeros(ROWS), jnp.full(ROWS, -jnp.inf), jnp.full(ROWS, 80.0)):
        out = np.asarray(softmax.finalize(empty, sinks))
        assert np.all(out == 0.0), sinks
        merged = np.asarray(softmax.finalize(softmax.merge(empty, empty), sinks))
        assert np.all(merged == 0.0), sinks


def test_masked_logits_count_for_nothing_whatever_they_are():
    scores, valid, values, sink = case(9, sinks=True)
    garbage = jnp.where(valid, scores, jnp.asarray(np.random.default_rng(1).choice(
        [np.nan, np.inf, -np.inf, 1e30], scores.shape), jnp.float32))
    clean = softmax.finalize(state(scores, valid, values), sink)
    dirty = softmax.finalize(state(garbage, valid, values), sink)
    np.testing.assert_array_equal(np.asarray(dirty), np.asarray(clean))


def test_a_sink_only_joins_the_denominator():
    scores, valid, values, _ = case(10)
    row = state(scores, valid, values)
    plain = np.asarray(softmax.finalize(row))
    # A sink far below every logit changes nothing; one equal to log(total) halves the output.
    low = np.asarray(softmax.finalize(row, jnp.full(ROWS, -1e4)))
    np.testing.assert_array_equal(low, plain)
    log_total = np.asarray(row.row_max + jnp.log(row.total))[2:]
    halved = np.asarray(softmax.finalize(softmax.Partial(*(f[2:] for f in row)), log_total))
    np.testing.assert_allclose(halved, plain[2:] / 2, rtol=1e-6, atol=1e-7)


def test_a_nan_logit_of_a_valid_key_propagates():
    scores, valid, values, _ = case(11)
    scores = scores.at[3, int(np.flatnonzero(np.asarray(valid[3]))[0])].set(jnp.nan)
    out = np.asarray(softmax.finalize(state(scores, valid, values)))
    assert np.all(np.isnan(out[3]))
    assert np.all(np.isfinite(np.delete(out, 3, axis=0)))


def test_soft_cap_bounds_the_logits_and_none_leaves_them():
    scores = jnp.asarray([-1e4, -3.0, 0.0, 0.5, 1e4], jnp.float32)
    capped = np.asarray(softmax.soft_cap(scores, 5.0))
    assert np.all(np.abs(capped) <= 5.0) and np.all(np.diff(capped) > 0)
    np.testing.assert_allclose(capped[3], 5.0 * np.tanh(0.1), rtol=1e-6)
    assert softmax.soft_cap(scores, None) is scores
