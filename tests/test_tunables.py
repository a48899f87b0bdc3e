"""The integer helpers configs and kernels share (kernels/tunables.py)."""

import jax
import jax.numpy as jnp
import pytest

from attnbench.kernels.tunables import cdiv, floor_power_of_two, next_power_of_two


@pytest.mark.parametrize("a", [-9, -8, -1, 0, 1, 7, 8, 9, 2**40 + 1])
@pytest.mark.parametrize("b", [1, 3, 8])
def test_cdiv_is_the_ceiling_for_ints_and_traced_arrays(a, b):
    quotient, remainder = divmod(a, b)
    ceiling = quotient + (remainder > 0)
    assert cdiv(a, b) == ceiling
    if abs(a) < 2**31:
        traced = jax.jit(cdiv)(jnp.int32(a), jnp.int32(b))
        assert traced.dtype == jnp.int32 and int(traced) == ceiling


@pytest.mark.parametrize("n,below,above", [(-3, 1, 1), (0, 1, 1), (1, 1, 1), (2, 2, 2),
                                           (3, 2, 4), (1000, 512, 1024), (1024, 1024, 1024)])
def test_powers_of_two_around_n(n, below, above):
    assert floor_power_of_two(n) == below and next_power_of_two(n) == above
