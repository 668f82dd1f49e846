"""The attention entry point: mask rule against transformers and brute force, the XLA oracle against numpy."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.models.gemma3.modeling_gemma3 import create_masks_for_vision_model, get_block_sequence_ids_for_mask

from theworld_jax.attention import AttentionMask, block_ids, dot_product_attention, make_attention_mask, make_decode_mask

WINDOW = 4


def _inputs():
    """Left-padded batch of 2 (L=14) with a block longer than the window and blocks touching padding."""
    mask = np.ones((2, 14), np.int64)
    mask[0, :3] = 0
    tti = np.zeros((2, 14), np.int64)
    tti[0, 4:10] = 1
    tti[0, 11:13] = 1
    tti[1, 0:2] = 1
    tti[1, 5:6] = 1
    return mask, tti


def _hf_allowed(mask: np.ndarray, tti: np.ndarray | None) -> dict[str, np.ndarray]:
    """transformers' boolean masks (B, T, S) per layer type, from the eager additive masks."""
    config = transformers.Gemma3TextConfig(sliding_window=WINDOW, num_hidden_layers=2, hidden_size=8,
                                           layer_types=["sliding_attention", "full_attention"])
    config._attn_implementation = "eager"
    b, length = mask.shape
    kwargs = dict(config=config, inputs_embeds=torch.zeros(b, length, 8), attention_mask=torch.tensor(mask),
                  cache=None, position_ids=torch.arange(length)[None].expand(b, -1))
    if tti is None:
        masks = {"full_attention": create_causal_mask(**kwargs),
                 "sliding_attention": create_sliding_window_causal_mask(**kwargs)}
    else:
        masks = create_masks_for_vision_model(block_sequence_ids=get_block_sequence_ids_for_mask(torch.tensor(tti)),
                                              **kwargs)
    return {name: (m[:, 0] == 0).numpy() for name, m in masks.items()}


def _brute_force_allowed(mask: np.ndarray, tti: np.ndarray, window: int | None) -> np.ndarray:
    """The rule of notes section 3, token by token, with blocks as maximal runs of token_type_ids == 1."""
    b, length = mask.shape
    out = np.zeros((b, length, length), bool)
    for r in range(b):
        starts = np.cumsum([tti[r, i] == 1 and (i == 0 or tti[r, i - 1] == 0) for i in range(length)])
        block = np.where(tti[r] == 1, starts, 0)
        for q in range(length):
            for k in range(length):
                same = block[q] > 0 and block[q] == block[k]
                in_window = window is None or q - window < k
                out[r, q, k] = bool(mask[r, k]) and (k <= q or same) and in_window
    return out


@pytest.mark.parametrize("with_blocks", [False, True])
def test_mask_rule_matches_transformers(with_blocks):
    mask, tti = _inputs()
    ours = make_attention_mask(jnp.asarray(mask), jnp.asarray(tti) if with_blocks else None)
    ref = _hf_allowed(mask, tti if with_blocks else None)
    valid_rows = mask.astype(bool)  # transformers' rows of padding queries are not part of the contract
    for layer_type, window in (("full_attention", None), ("sliding_attention", WINDOW)):
        allowed = np.asarray(ours.allowed(window))
        np.testing.assert_array_equal(allowed[valid_rows], ref[layer_type][valid_rows], err_msg=layer_type)


@pytest.mark.parametrize("window", [None, WINDOW])
def test_mask_rule_matches_brute_force(window):
    mask, tti = _inputs()
    ours = np.asarray(make_attention_mask(jnp.asarray(mask), jnp.asarray(tti)).allowed(window))
    np.testing.assert_array_equal(ours, _brute_force_allowed(mask, tti, window))


def test_block_ids_number_each_run():
    tti = jnp.asarray([[1, 1, 0, 1, 0, 0, 1, 1, 1, 0], [0, 0, 0, 0, 0, 0, 0, 0, 0, 1]])
    expected = [[1, 1, 0, 2, 0, 0, 3, 3, 3, 0], [0, 0, 0, 0, 0, 0, 0, 0, 0, 1]]
    np.testing.assert_array_equal(np.asarray(block_ids(tti)), expected)


def _random_case(seed: int):
    """GQA q (2,5,4,8), k/v (2,9,2,8) and a mask with arbitrary indices, validity and blocks; query 0 of
    row 0 comes before every key and is in no block, so it sees nothing."""
    rng = np.random.default_rng(seed)
    q_index, q_block = rng.integers(1, 13, (2, 5)), rng.integers(0, 3, (2, 5))
    q_index[0, 0], q_block[0, 0] = 0, 0
    q = rng.standard_normal((2, 5, 4, 8)).astype(np.float32)
    k = rng.standard_normal((2, 9, 2, 8)).astype(np.float32)
    v = rng.standard_normal((2, 9, 2, 8)).astype(np.float32)
    mask = AttentionMask(
        q_index=jnp.asarray(q_index, jnp.int32),
        k_index=jnp.asarray(1 + rng.permutation(12)[:9][None].repeat(2, 0), jnp.int32),
        k_valid=jnp.asarray(rng.random((2, 9)) < 0.8),
        q_block=jnp.asarray(q_block, jnp.int32),
        k_block=jnp.asarray(rng.integers(0, 3, (2, 9)), jnp.int32))
    return q, k, v, mask


def _numpy_attention(q, k, v, allowed, scale):
    b, t, n, h = q.shape
    group = n // k.shape[2]
    out = np.zeros_like(q, dtype=np.float64)
    for r in range(b):
        for head in range(n):
            for i in range(t):
                keys = np.nonzero(allowed[r, i])[0]
                if keys.size == 0:
                    continue
                logits = k[r, keys, head // group].astype(np.float64) @ q[r, i, head] * scale
                p = np.exp(logits - logits.max())
                out[r, i, head] = (p / p.sum()) @ v[r, keys, head // group]
    return out


@pytest.mark.parametrize("window", [None, 3])
def test_xla_oracle_matches_numpy_softmax(window):
    q, k, v, mask = _random_case(1)
    out = np.asarray(dot_product_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), mask,
                                           window=window, scale=0.3))
    allowed = np.asarray(mask.allowed(window))
    assert (~allowed.any(-1)).any() and allowed.any(-1).any(), "want both empty and non-empty rows"
    np.testing.assert_allclose(out, _numpy_attention(q, k, v, allowed, 0.3), atol=1e-5, rtol=1e-5)


def test_padding_queries_give_finite_zero_output():
    rng = np.random.default_rng(2)
    q, k, v = (jnp.asarray(rng.standard_normal((1, 6, 2, 4)), jnp.bfloat16) for _ in range(3))
    mask = make_attention_mask(jnp.asarray([[0, 0, 1, 1, 1, 1]]))
    out = dot_product_attention(q, k, v, mask, window=None, scale=0.5)
    assert out.dtype == jnp.bfloat16
    out = np.asarray(out.astype(jnp.float32))
    assert np.isfinite(out).all()
    np.testing.assert_array_equal(out[0, :2], 0.0)
    assert np.abs(out[0, 2:]).min() > 0


def test_decode_mask_describes_new_tokens():
    mask = make_decode_mask(jnp.asarray([[7], [9]]))
    np.testing.assert_array_equal(np.asarray(mask.q_index), [[7], [9]])
    np.testing.assert_array_equal(np.asarray(mask.k_index), [[7], [9]])
    assert bool(mask.k_valid.all()) and not bool(mask.q_block.any())


def test_bad_inputs_are_rejected():
    q, k, v, mask = _random_case(3)
    with pytest.raises(ValueError, match="unknown attention implementation"):
        dot_product_attention(q, k, v, mask, window=None, scale=1.0, implementation="flash")
    with pytest.raises(ValueError, match="implementation='cudnn' needs"):
        dot_product_attention(q, k, v, mask, window=None, scale=1.0, implementation="cudnn")
    with pytest.raises(ValueError, match="attention shapes do not fit"):
        dot_product_attention(q[..., :3, :], k, v, mask, window=None, scale=1.0)
    with pytest.raises(ValueError, match="token_type_ids has shape"):
        make_attention_mask(jnp.ones((2, 5)), jnp.zeros((2, 4), jnp.int32))
    with pytest.raises(ValueError, match="attention_mask must be"):
        make_attention_mask(jnp.ones((5,)))
