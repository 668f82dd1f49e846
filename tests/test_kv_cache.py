"""KV cache: incremental decoding through the sliding-window ring buffers equals one full forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tests.helpers.tiny_text_decoder import (WINDOW, build_hf, hf_logits, load_decoder, max_logit_error,
                                             positions_from_mask, save_language_model)

from theworld_jax import decode_attention
from theworld_jax.attention import make_attention_mask, make_decode_mask
from theworld_jax.modeling.kv_cache import KVCache, LayerCache

PROMPT, TOTAL, PAD = 13, 22, 3  # prompt > window; TOTAL - PROMPT > window: the rings wrap while decoding
F32_TOL = 1e-5


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    hf, config = build_hf()
    decoder = load_decoder(config, save_language_model(hf, str(tmp_path_factory.mktemp("kv_cache"))))
    rng = np.random.default_rng(5)
    ids = rng.integers(10, 280, (2, TOTAL))
    mask = np.ones((2, TOTAL), np.int64)
    mask[0, :PAD] = 0
    ids[0, :PAD] = 0
    return dict(hf=hf, config=config, decoder=decoder, ids=ids, mask=mask, ref=hf_logits(hf, ids, mask))


@nnx.jit
def _prefill(model, ids, attention_mask, positions, cache):
    hidden, cache = model(model.embed(ids), positions=positions, mask=make_attention_mask(attention_mask), cache=cache)
    return model.logits(hidden), cache


@nnx.jit(static_argnames="aligned")
def _step(model, ids, index, positions, cache, aligned=False):
    mask = make_decode_mask(index[0], batch=index.shape[0]) if aligned else make_decode_mask(index)
    hidden, cache = model(model.embed(ids), positions=positions, mask=mask, cache=cache)
    return model.logits(hidden), cache


def _run(setup, chunks: list[int], aligned: bool = False, rows: slice = slice(None)) -> np.ndarray:
    """Prefill PROMPT tokens of `rows`, then feed the rest in chunks of the given sizes (aligned: the decode
    masks say every row shares its indices); logits (rows, TOTAL, V)."""
    ids, mask = setup["ids"][rows], setup["mask"][rows]
    positions = positions_from_mask(mask)
    cache = KVCache.init(setup["config"], batch=len(ids), max_length=TOTAL, dtype=jnp.float32)
    logits, cache = _prefill(setup["decoder"], jnp.asarray(ids[:, :PROMPT]), jnp.asarray(mask[:, :PROMPT]),
                             jnp.asarray(positions[:, :PROMPT]), cache)
    out = [np.asarray(logits)]
    start = PROMPT
    for size in chunks:
        index = np.broadcast_to(np.arange(start, start + size, dtype=np.int32), (len(ids), size))
        logits, cache = _step(setup["decoder"], jnp.asarray(ids[:, start:start + size]), jnp.asarray(index),
                              jnp.asarray(positions[:, start:start + size]), cache, aligned=aligned)
        out.append(np.asarray(logits))
        start += size
    assert start == TOTAL
    return np.concatenate(out, axis=1)


def test_one_token_steps_match_full_forward(setup):
    logits = _run(setup, [1] * (TOTAL - PROMPT))
    assert max_logit_error(logits, setup["ref"], setup["mask"]) <= F32_TOL


def test_aligned_one_token_steps_match_full_forward(setup):
    """Rows sharing their indices: each new token is written at one offset (no scatter)."""
    logits = _run(setup, [1] * (TOTAL - PROMPT), aligned=True)
    assert max_logit_error(logits, setup["ref"], setup["mask"]) <= F32_TOL


def test_batch_one_steps_match_full_forward(setup):
    """One token at batch 1 goes through the layers as two copies of itself (Gemma3TextDecoder)."""
    logits = _run(setup, [1] * (TOTAL - PROMPT), rows=slice(1, 2))
    assert max_logit_error(logits, setup["ref"][1:], setup["mask"][1:]) <= F32_TOL


@pytest.mark.parametrize("rows", [slice(None), slice(1, 2)], ids=["batch2", "batch1"])
def test_one_token_steps_through_the_decode_kernel_match_full_forward(setup, monkeypatch, rows):
    """The fused decode kernel (as on a GPU; here in Pallas's interpreter, 2-slot blocks for the tiny cache)
    takes every decode step's attention, batch 1's twin included."""
    calls = []
    kernel = decode_attention.decode_attention
    monkeypatch.setattr(decode_attention, "INTERPRET", True)
    monkeypatch.setattr(decode_attention, "BLOCK_SLOTS", 2)
    monkeypatch.setattr(decode_attention, "decode_attention", lambda *a, **kw: calls.append(1) or kernel(*a, **kw))
    jax.clear_caches()
    try:
        logits = _run(setup, [1] * (TOTAL - PROMPT), aligned=True, rows=rows)
    finally:
        jax.clear_caches()
    # once per layer kind of the one compiled step: layers of a kind share one traced program
    assert len(calls) == len(set(setup["config"].layer_types))
    assert max_logit_error(logits, setup["ref"][rows], setup["mask"][rows]) <= F32_TOL


def test_aligned_write_equals_per_row_write():
    """One token per row at the same index, written at one offset or per row, fills the same slots."""
    rng = np.random.default_rng(0)
    layer = LayerCache(k=jnp.asarray(rng.normal(size=(3, 2, 8, 4)), jnp.float32),
                       v=jnp.asarray(rng.normal(size=(3, 2, 8, 4)), jnp.float32),
                       index=jnp.asarray(rng.integers(-1, 9, (3, 8)), jnp.int32))
    k, v = (jnp.asarray(rng.normal(size=(3, 1, 2, 4)), jnp.float32) for _ in range(2))
    index, valid = jnp.full((3, 1), 13, jnp.int32), jnp.asarray([[True], [False], [True]])
    per_row, aligned = layer.write(k, v, index, valid), layer.write(k, v, index, valid, aligned=True)
    for a, b in zip(jax.tree.leaves(per_row), jax.tree.leaves(aligned)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(aligned.index[:, 13 % 8]), [13, -1, 13])


def test_chunked_steps_match_full_forward(setup):
    logits = _run(setup, [3, 1, 1, 1, 3])
    assert max_logit_error(logits, setup["ref"], setup["mask"]) <= F32_TOL


def test_cache_sizes_follow_layer_types(setup):
    config = setup["config"]
    cache = KVCache.init(config, batch=2, max_length=TOTAL)
    expected = tuple(TOTAL if config.window(i) is None else WINDOW for i in range(config.num_hidden_layers))
    assert cache.slot_counts() == expected and not cache.prefilled
    assert [i.shape for i in cache.index] == [(2, n) for n in dict.fromkeys(expected)]  # one per slot count
    assert KVCache.init(config, batch=1, max_length=5).slot_counts() == (5,) * config.num_hidden_layers


def test_prefill_keeps_the_last_window_in_ring_slots():
    """13 tokens, the first 3 padding, into 8 slots: indices 5..12 at slot index % 8."""
    slots, length = 8, 13
    layer = LayerCache(k=jnp.zeros((1, 1, slots, 2)), v=jnp.zeros((1, 1, slots, 2)),
                       index=jnp.full((1, slots), -1, jnp.int32))
    index = jnp.arange(length, dtype=jnp.int32)[None]
    values = jnp.broadcast_to(index[..., None, None].astype(jnp.float32), (1, length, 1, 2))
    valid = index >= 3
    written = layer.write(values, -values, index, valid)
    expected = np.array([8, 9, 10, 11, 12, 5, 6, 7])
    np.testing.assert_array_equal(np.asarray(written.index[0]), expected)
    np.testing.assert_array_equal(np.asarray(written.k[0, 0, :, 0]), expected)
    padded = layer.write(values[:, :4], values[:, :4], index[:, :4], valid[:, :4])
    np.testing.assert_array_equal(np.asarray(padded.index[0]), [-1, -1, -1, 3, -1, -1, -1, -1])


def test_bad_cache_use_is_rejected(setup):
    config, decoder = setup["config"], setup["decoder"]
    with pytest.raises(ValueError, match="batch >= 1"):
        KVCache.init(config, batch=0, max_length=4)
    cache = KVCache.init(config, batch=1, max_length=8)
    embeds = jnp.zeros((2, 1, config.hidden_size))
    with pytest.raises(ValueError, match="the KV cache is for batch 1"):
        decoder(embeds, positions=jnp.zeros((2, 1), jnp.int32), mask=make_decode_mask(jnp.zeros((2, 1))), cache=cache)
    long = jnp.zeros((1, 9, config.hidden_size))
    with pytest.raises(ValueError, match="9 new tokens do not fit a KV cache of max_length 8"):
        decoder(long, positions=jnp.zeros((1, 9), jnp.int32), mask=make_attention_mask(jnp.ones((1, 9))), cache=cache)
