"""jit_module: compiled once per structure, reads the live values of the module's variables on every call."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from theworld_jax.jit import jit_module


class Scale(nnx.Module):
    def __init__(self, param: nnx.Param):
        self.w = param


def apply(module, x):
    return module.w[...] * x


def test_a_call_sees_values_assigned_after_the_first_call():
    module = Scale(nnx.Param(jnp.full((3,), 2.0)))
    x = jnp.ones((3,))
    np.testing.assert_array_equal(jit_module(apply, module)(x), 2.0)
    module.w.set_value(jnp.full((3,), 5.0))
    np.testing.assert_array_equal(jit_module(apply, module)(x), 5.0)


@pytest.mark.filterwarnings("ignore:Variable hooks are deprecated")
def test_a_read_hook_applies_once():
    """A variable with an on_get_value hook is read through it once, inside the program."""
    module = Scale(nnx.Param(jnp.full((3,), 2.0), on_get_value=lambda variable, value: value * 10))
    np.testing.assert_array_equal(jit_module(apply, module)(jnp.ones((3,))), 20.0)
