"""jit_module: compiled once per structure, reads the live values of the module's variables on every call."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from theworld_jax.jit import jit_module, shared_call


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


class Affine(nnx.Module):
    def __init__(self, seed: int):
        self.w = nnx.Param(jnp.asarray(np.random.default_rng(seed).normal(size=(3, 3)), jnp.float32))

    def __call__(self, x, *, power: int = 1):
        traces.append(power)
        return jnp.tanh(x @ self.w[...]) ** power


traces = []


def test_shared_call_traces_one_structure_once_and_matches_direct_calls():
    import jax

    layers = [Affine(seed) for seed in range(4)]
    x = jnp.asarray(np.random.default_rng(9).normal(size=(2, 3)), jnp.float32)

    def run(x, call):
        for layer in layers:
            x = call(layer, x)
        return jnp.sum(x)

    def shared(layer, x):
        return shared_call(layer, x, power=3, remat_policy=jax.checkpoint_policies.nothing_saveable)

    direct = jax.value_and_grad(lambda x: run(x, lambda layer, x: layer(x, power=3)))(x)
    traces.clear()
    ours = jax.jit(jax.value_and_grad(lambda x: run(x, shared)))(x)
    assert traces == [3]  # four layers, one trace
    for a, b in zip(ours, direct):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
