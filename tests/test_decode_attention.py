"""The fused decode kernel (theworld_jax.decode_attention, run by Pallas's interpreter on CPU) equals the
XLA oracle over ring-buffer caches: empty and padding slots, windows, rows at different indices."""

import jax.numpy as jnp
import numpy as np
import pytest

from theworld_jax import decode_attention
from theworld_jax.attention import AttentionMask, _xla_attention

TOL = 2e-6


@pytest.fixture(autouse=True)
def interpreted(monkeypatch):
    monkeypatch.setattr(decode_attention, "INTERPRET", True)


def _case(seed: int, batch: int, kv_heads: int, group: int, slots: int, head_dim: int = 32):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((batch, 1, kv_heads * group, head_dim)).astype(np.float32)
    k, v = (rng.standard_normal((batch, kv_heads, slots, head_dim)).astype(np.float32) for _ in range(2))
    q_index = rng.integers(slots, 3 * slots, (batch, 1)).astype(np.int32)
    index = (q_index - rng.permutation(slots)[None, :]).astype(np.int32)  # the last `slots` tokens, ring order
    index[rng.random(index.shape) < 0.2] = -1  # empty slots and padding
    return [jnp.asarray(a) for a in (q, k, v, index, q_index)]


def _oracle(q, k, v, index, q_index, window, scale):
    mask = AttentionMask(q_index=q_index, k_index=index, k_valid=index >= 0, q_block=jnp.zeros_like(q_index),
                         k_block=jnp.zeros_like(index))
    return _xla_attention(q, jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), mask, window=window, scale=scale)


@pytest.mark.parametrize("batch,kv_heads,group,slots", [(1, 1, 2, 64), (3, 2, 2, 256), (2, 4, 1, 128),
                                                        (2, 1, 4, 192)])
@pytest.mark.parametrize("window", [None, 40])
def test_kernel_equals_the_oracle(batch, kv_heads, group, slots, window):
    args = _case(batch * 31 + slots, batch, kv_heads, group, slots)
    out = decode_attention.decode_attention(*args, window=window, scale=0.3)
    np.testing.assert_allclose(np.asarray(out), np.asarray(_oracle(*args, window, 0.3)), atol=TOL, rtol=TOL)


def test_kernel_splits_the_slots_into_slices():
    """Few rows and heads: the slots go to several programs, whose partial softmaxes are combined."""
    assert decode_attention.slices_for(1, 1, 256) == 4
    assert decode_attention.slices_for(8, 4, 4608) == 9


def test_a_row_that_sees_no_slot_gets_zeros():
    q, k, v, index, q_index = _case(3, 2, 1, 2, 64)
    index = index.at[1].set(-1)
    out = np.asarray(decode_attention.decode_attention(q, k, v, index, q_index, window=None, scale=1.0))
    assert np.all(out[1] == 0) and np.all(np.isfinite(out))
    np.testing.assert_allclose(out[0], np.asarray(_oracle(q, k, v, index, q_index, None, 1.0))[0], atol=TOL)


def test_kernel_serves_only_one_query_per_row():
    q, k, *_ = _case(0, 1, 1, 2, 64)
    assert decode_attention.supports(q, k)
    assert not decode_attention.supports(jnp.concatenate([q, q], axis=1), k)
    assert not decode_attention.supports(q, k[:, :, :48])  # slots not a multiple of the kernel's block
