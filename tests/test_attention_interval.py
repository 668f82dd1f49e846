"""The fast attention path's own logic (rolls, block-row recompute, interval rule), run through jax.nn's XLA
backend on CPU, against the XLA oracle: random masks, float32, outputs and gradients."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from theworld_jax.attention import Layout, _xla_attention, block_layout, dot_product_attention, make_attention_mask
from theworld_jax.interval_attention import interval_attention

SCALE = 0.3


def _random_batch(seed: int):
    """3 rows, left and right padding, 0-3 blocks per row (at the start, touching padding, long ones)."""
    rng = np.random.default_rng(seed)
    b, t = 3, int(rng.integers(40, 70))
    mask = np.ones((b, t), np.int32)
    types = np.zeros((b, t), np.int32)
    for row in range(b):
        left, right = rng.integers(0, 8, 2) * rng.integers(0, 2, 2)
        mask[row, :left] = 0
        mask[row, t - right:] = 0
        cursor = int(rng.integers(0, 3))
        for _ in range(int(rng.integers(0, 4))):
            length = int(rng.integers(1, 16))
            if cursor + length > t:
                break
            types[row, cursor:cursor + length] = 1
            cursor += length + int(rng.integers(1, 10))
    types[0, :5], types[0, 5] = 1, 0  # a block at the very start (inside the left padding of row 0)
    return mask, types


def _qkv(seed, b, t, n=4, kv=2, h=8):
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    return (jax.random.normal(keys[0], (b, t, n, h)), jax.random.normal(keys[1], (b, t, kv, h)),
            jax.random.normal(keys[2], (b, t, kv, h)))


def _interval(mask, window):
    return jax.jit(lambda q, k, v: interval_attention(q, k, v, mask, window=window, scale=SCALE, backend="xla",
                                                      multiple=16))


def _oracle(mask, window):
    return jax.jit(lambda q, k, v: _xla_attention(q, k, v, mask, window=window, scale=SCALE))


@pytest.mark.parametrize("seed", range(3))
def test_interval_path_equals_oracle(seed):
    attention_mask, types = _random_batch(seed)
    mask = make_attention_mask(attention_mask, types)
    q, k, v = _qkv(seed, *attention_mask.shape)
    real = attention_mask.astype(bool)
    for window in (None, 5):
        out = np.asarray(_interval(mask, window)(q, k, v))
        ref = np.asarray(_oracle(mask, window)(q, k, v))
        np.testing.assert_allclose(out[real], ref[real], atol=2e-6, rtol=1e-5, err_msg=f"window {window}")
        np.testing.assert_array_equal(out[~real], 0.0)


@pytest.mark.parametrize("seed,window", [(1, None), (2, 5)])
def test_interval_path_gradients_equal_oracle(seed, window):
    attention_mask, types = _random_batch(seed)
    mask = make_attention_mask(attention_mask, types)
    q, k, v = _qkv(seed, *attention_mask.shape)
    cotangent = jax.random.normal(jax.random.PRNGKey(9), q.shape) * attention_mask[:, :, None, None]

    def grads(fn):
        return jax.jit(jax.grad(lambda *x: jnp.sum(fn(*x) * cotangent), argnums=(0, 1, 2)))(q, k, v)

    for ours, ref, name in zip(grads(_interval(mask, window)), grads(_oracle(mask, window)), "qkv"):
        np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), atol=5e-6, rtol=1e-5, err_msg=f"d{name}")


def _right_padded(seed: int):
    """A _random_batch whose rows all begin at position 0 (right padding only)."""
    attention_mask, types = _random_batch(seed)
    for row in range(attention_mask.shape[0]):
        count = int(attention_mask[row].sum())
        attention_mask[row] = np.arange(attention_mask.shape[1]) < count
    return attention_mask, types


@pytest.mark.parametrize("seed,window", [(0, None), (1, 5)])
def test_without_left_padding_equals_oracle_outputs_and_gradients(seed, window):
    attention_mask, types = _right_padded(seed)
    mask = make_attention_mask(attention_mask, types)
    assert mask.layout.left_padding is False
    q, k, v = _qkv(seed, *attention_mask.shape)
    real = attention_mask.astype(bool)
    out, ref = np.asarray(_interval(mask, window)(q, k, v)), np.asarray(_oracle(mask, window)(q, k, v))
    np.testing.assert_allclose(out[real], ref[real], atol=2e-6, rtol=1e-5)
    np.testing.assert_array_equal(out[~real], 0.0)
    cotangent = jax.random.normal(jax.random.PRNGKey(9), q.shape) * attention_mask[:, :, None, None]

    def grads(fn):
        return jax.jit(jax.grad(lambda *x: jnp.sum(fn(*x) * cotangent), argnums=(0, 1, 2)))(q, k, v)

    for ours, theirs, name in zip(grads(_interval(mask, window)), grads(_oracle(mask, window)), "qkv"):
        np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), atol=5e-6, rtol=1e-5, err_msg=f"d{name}")


def _row_copies(mask, t: int) -> int:
    """dynamic_slice ops of interval_attention that cut a row out of a (T + 2 * padded T) buffer: the rolls."""
    q, k, v = _qkv(0, mask.k_valid.shape[0], t)
    jaxpr = jax.make_jaxpr(lambda *x: interval_attention(*x, mask, window=None, scale=SCALE, backend="xla",
                                                         multiple=16))(q, k, v)
    rolled = t + 2 * -(-t // 16) * 16
    return sum(1 for e in jaxpr.jaxpr.eqns
               if e.primitive.name == "dynamic_slice" and e.invars[0].aval.shape[1] == rolled)


def test_a_layout_without_left_padding_attends_in_place():
    attention_mask, types = _right_padded(2)
    mask = make_attention_mask(attention_mask, types)
    left = dataclasses.replace(mask, layout=dataclasses.replace(mask.layout, left_padding=True))
    t = attention_mask.shape[1]
    assert _row_copies(left, t) > 0
    assert _row_copies(mask, t) == 0


def test_a_left_padded_row_under_a_layout_without_left_padding_gets_nan():
    attention_mask = np.ones((2, 24), np.int32)
    attention_mask[1, :3] = 0
    mask = dataclasses.replace(make_attention_mask(attention_mask), layout=Layout((), left_padding=False))
    bad = np.isnan(np.asarray(_interval(mask, None)(*_qkv(6, 2, 24)))).any(axis=(1, 2, 3))
    np.testing.assert_array_equal(bad, [False, True])


def test_bidirectional_world_block_longer_than_the_window():
    """One long block (the world, bidirectional) plus a short one (an image), rows shifted by padding."""
    attention_mask = np.ones((2, 50), np.int32)
    attention_mask[1, :6] = 0
    types = np.zeros((2, 50), np.int32)
    types[0, 2:30], types[0, 33:37] = 1, 1
    types[1, 8:36], types[1, 40:44] = 1, 1
    mask = make_attention_mask(attention_mask, types)
    assert mask.layout == Layout((32, 8))
    q, k, v = _qkv(3, 2, 50)
    out, ref = _interval(mask, 7)(q, k, v), _oracle(mask, 7)(q, k, v)
    real = attention_mask.astype(bool)
    np.testing.assert_allclose(np.asarray(out)[real], np.asarray(ref)[real], atol=2e-6, rtol=1e-5)


def test_rows_that_break_the_layout_get_nan():
    attention_mask = np.ones((3, 24), np.int32)
    attention_mask[2, 10] = 0  # a hole: not one contiguous run of real tokens
    types = np.zeros((3, 24), np.int32)
    types[0, 3:15] = 1  # 12 tokens: more than the layout's 8
    types[1, 3:7] = 1
    mask = dataclasses.replace(make_attention_mask(attention_mask, types), layout=Layout((8,)))
    q, k, v = _qkv(4, 3, 24)
    bad = np.isnan(np.asarray(_interval(mask, None)(q, k, v))).any(axis=(1, 2, 3))
    np.testing.assert_array_equal(bad, [True, False, True])


def test_block_layout_from_host_values():
    types = np.array([[0, 1, 1, 0, 1, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0, 0, 0, 0]])
    mask = np.ones_like(types)
    mask[1, :2] = 0
    assert block_layout(types, mask, multiple=1) == Layout((3, 2, 1))
    assert block_layout(types, mask, extra_blocks=(20,), multiple=8) == Layout((24, 8, 8, 8))
    assert block_layout(None, mask) == Layout(())
    assert block_layout(types, mask).left_padding  # row 1 begins with padding
    right = np.ones_like(types)
    right[1, 8:] = 0
    assert not block_layout(types, right).left_padding
    assert block_layout(types, None).left_padding  # unknown: assume left padding
    layouts = []
    jax.eval_shape(lambda t: layouts.append(make_attention_mask(jnp.ones((1, 4)), t).layout), jnp.zeros((1, 4)))
    assert layouts == [None]  # traced token_type_ids, no bound given: the XLA path


def test_entry_point_on_cpu_takes_the_oracle_and_full_attention_without_a_mask():
    q, k, v = _qkv(5, 2, 9)
    full = dot_product_attention(q, k, v, None, window=None, scale=SCALE)
    ref = jax.nn.dot_product_attention(q, k, v, scale=SCALE, implementation="xla")
    np.testing.assert_allclose(np.asarray(full), np.asarray(ref), atol=1e-5, rtol=1e-5)


def test_blocks_past_the_window_take_the_band_and_equal_the_oracle(monkeypatch):
    """Every block at least W - 1 tokens past its row's start (the Layout's block_start, from the host
    mask): the block rows come from the band call (the reversed call is replaced by NaNs here, so taking
    it would fail), outputs and gradients exact."""
    import theworld_jax.interval_attention as interval

    monkeypatch.setattr(interval, "_reversed_block_rows",
                        lambda qr, kr, vr, e, *, bound, **_: jnp.full(qr.shape[:1] + (bound,) + qr.shape[2:], jnp.nan))
    attention_mask = np.ones((3, 60), np.int32)
    attention_mask[1, :5] = 0
    attention_mask[2, 52:] = 0
    types = np.zeros((3, 60), np.int32)
    types[0, 10:18], types[0, 25:29] = 1, 1
    types[1, 13:21] = 1  # 8 tokens past the row's first (5): exactly W - 1
    types[2, 40:52] = 1  # touches the right padding
    window, real = 9, attention_mask.astype(bool)
    mask = make_attention_mask(attention_mask, types, layout=block_layout(types, attention_mask, window=window))
    assert mask.layout.block_start == 8
    q, k, v = _qkv(7, 3, 60)
    out, ref = _interval(mask, window)(q, k, v), _oracle(mask, window)(q, k, v)
    np.testing.assert_allclose(np.asarray(out)[real], np.asarray(ref)[real], atol=2e-6, rtol=1e-5)
    cotangent = jax.random.normal(jax.random.PRNGKey(9), q.shape) * attention_mask[:, :, None, None]

    def grads(fn):
        return jax.jit(jax.grad(lambda *x: jnp.sum(fn(*x) * cotangent), argnums=(0, 1, 2)))(q, k, v)

    for ours, theirs, name in zip(grads(_interval(mask, window)), grads(_oracle(mask, window)), "qkv"):
        np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), atol=5e-6, rtol=1e-5, err_msg=f"d{name}")


def test_a_block_near_its_row_start_takes_the_reversed_call(monkeypatch):
    """One block closer than W - 1 to its row's start: the band would read keys before the row, so the
    reversed call serves (the band is replaced by NaNs here)."""
    import theworld_jax.interval_attention as interval

    monkeypatch.setattr(interval, "_band_block_rows",
                        lambda qr, kr, vr, e, *, bound, **_: jnp.full(qr.shape[:1] + (bound,) + qr.shape[2:], jnp.nan))
    attention_mask = np.ones((2, 48), np.int32)
    types = np.zeros((2, 48), np.int32)
    types[0, 20:28] = 1
    types[1, 7:15] = 1  # 7 tokens past the row's start: one short of W - 1
    mask = make_attention_mask(attention_mask, types, layout=Layout((8,), left_padding=False, block_start=7))
    q, k, v = _qkv(8, 2, 48)
    out, ref = _interval(mask, 9)(q, k, v), _oracle(mask, 9)(q, k, v)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-6, rtol=1e-5)


def test_a_block_before_the_layouts_block_start_gets_nan():
    attention_mask = np.ones((2, 48), np.int32)
    types = np.zeros((2, 48), np.int32)
    types[0, 20:28] = 1
    types[1, 5:13] = 1
    mask = make_attention_mask(attention_mask, types, layout=Layout((8,), left_padding=False, block_start=16))
    bad = np.isnan(np.asarray(_interval(mask, 9)(*_qkv(8, 2, 48)))).any(axis=(1, 2, 3))
    np.testing.assert_array_equal(bad, [False, True])


def test_block_start_from_host_values():
    types = np.zeros((2, 30), np.int32)
    types[0, 12:20], types[1, 9:15] = 1, 1
    mask = np.ones_like(types)
    mask[1, :4] = 0
    assert block_layout(types, mask, window=6).block_start == 5  # row 1: 9 - its first real token 4
    assert block_layout(types, mask, window=7).block_start == 0  # 5 < W - 1
    assert block_layout(types, window=10).block_start == 9
    assert block_layout(types, mask).block_start == 0  # no window given
    assert block_layout(types, mask, extra_blocks=(16,), window=2).block_start == 0  # the extra block: unknown
    assert block_layout(np.zeros_like(types), mask, window=2).block_start == 0
    with pytest.raises(ValueError, match="block_start"):
        Layout((8,), block_start=-1)
