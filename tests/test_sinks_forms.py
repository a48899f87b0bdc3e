"""The serving stacks' sink forms reduce to one logit per query head (their log-sum-exp),
and the sharding keywords refuse what they cannot honour."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from attnbench import kernels
from attnbench.kernels.decode.problem import DecodeProblem

PROBLEM = DecodeProblem(batch=3, max_len=32, q_heads=4, kv_heads=2, head_dim=16,
                        dtype="float32")
HQ, HKV, G = 4, 2, 2


def decode(sinks, variant="reference"):
    args, _ = PROBLEM.make_inputs(0)
    return np.asarray(kernels.decode_attention(*args, sinks=sinks, variant=variant))


SETS = np.array([[0.5, -1.0, 2.0], [1.5, 0.0, -3.0]], np.float32)  # per KV head, 3 sinks


@pytest.mark.parametrize("variant", ["reference", "xla_blocked"])
def test_sink_forms_equal_their_log_sum_exp_per_head(variant):
    per_kv = np.log(np.exp(SETS.astype(np.float64)).sum(axis=1))
    # [Hkv, n]: query head h reads the set of its KV head h // G.
    expected = decode(jnp.asarray(np.repeat(per_kv, G).astype(np.float32)), variant)
    np.testing.assert_allclose(decode(jnp.asarray(SETS), variant), expected, atol=1e-6)
    # [Hq, n]: the same sets written out per query head.
    np.testing.assert_allclose(decode(jnp.asarray(np.repeat(SETS, G, axis=0)), variant),
                               expected, atol=1e-6)
    # [num_sinks]: one set shared by every head (length 3, not Hq).
    shared = np.log(np.exp(SETS[0].astype(np.float64)).sum())
    np.testing.assert_allclose(decode(jnp.asarray(SETS[0]), variant),
                               decode(jnp.full((HQ,), shared, jnp.float32), variant), atol=1e-6)
    # Several sinks hold more mass than one of them: the forms are not a no-op.
    assert not np.allclose(decode(jnp.asarray(SETS[0]), variant),
                           decode(jnp.full((HQ,), SETS[0, 0]), variant), atol=1e-4)


def test_sharding_keywords_refuse_what_they_cannot_honour():
    args, _ = PROBLEM.make_inputs(0)
    mesh = jax.make_mesh((1,), ("tp",))
    with pytest.raises(ValueError, match="in_specs needs mesh="):
        kernels.decode_attention(*args, in_specs=(P(),) * 5)
    with pytest.raises(ValueError, match=r"in_specs must be a sequence of 5 PartitionSpecs.*"
                                         r"query, key, value, sequence_start, sequence_end"):
        kernels.decode_attention(*args, mesh=mesh, in_specs=(P(),) * 4)
    with pytest.raises(ValueError, match=r"in_specs\[1\] \(key\) = .* names 5 axes"):
        kernels.decode_attention(*args, mesh=mesh,
                                 in_specs=(P(), P(None, None, "tp", None, None), P(), P(), P()))
    with pytest.raises(ValueError, match="head_axis 'model' is not an axis of the mesh"):
        kernels.decode_attention(*args, mesh=mesh, head_axis="model")
    with pytest.raises(TypeError, match="mesh must be a jax.sharding.Mesh"):
        kernels.decode_attention(*args, mesh="tp")
    # Argument errors name the argument as an unsharded call would.
    with pytest.raises(ValueError, match="sinks of rank 2 must have shape"):
        kernels.decode_attention(*args, mesh=mesh, sinks=jnp.zeros((3, 2)))
    # A wider index array is checked whole before the shards get int32.
    wide_end = np.full((PROBLEM.batch,), 2**32 + 4, np.int64)
    with pytest.raises(ValueError, match=r"sequence_end\[0\] = 4294967300 does not fit int32"):
        kernels.decode_attention(*args[:4], wide_end, mesh=mesh)
    # On a one-device mesh the keyword path gives the plain call's result.
    np.testing.assert_allclose(
        np.asarray(kernels.decode_attention(*args, mesh=mesh, sinks=jnp.asarray(SETS))),
        decode(jnp.asarray(SETS), "xla_blocked"), atol=1e-6)
