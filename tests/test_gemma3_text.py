"""Gemma3TextDecoder against transformers' Gemma 3 on the same (tiny, random) weights."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from tests.helpers.tiny_text_decoder import (WINDOW, build_hf, hf_logits, load_decoder, max_logit_error,
                                             our_logits, positions_from_mask, save_language_model)
from transformers.models.gemma3.modeling_gemma3 import Gemma3TextScaledWordEmbedding

from theworld_jax.attention import make_attention_mask
from theworld_jax.modeling.gemma3_text import Gemma3TextDecoder
from theworld_jax.modeling.layers import Embedding
from theworld_jax.weights.gemma3_text_keys import text_key_map
from theworld_jax.weights.loader import abstract_params

B, L, PAD = 2, 24, 5  # L > 2 * WINDOW: the sliding layers drop keys
F32_TOL = 1e-5
BF16_TOL = 2e-2


@pytest.fixture(scope="module")
def hf_and_config():
    return build_hf()


@pytest.fixture(scope="module")
def checkpoint_dir(hf_and_config, tmp_path_factory):
    return save_language_model(hf_and_config[0], str(tmp_path_factory.mktemp("gemma3_text")))


@pytest.fixture(scope="module")
def decoder(hf_and_config, checkpoint_dir):
    return load_decoder(hf_and_config[1], checkpoint_dir)


@pytest.fixture(scope="module")
def inputs():
    """ids (B, L); a left-padded copy whose row 0 is the first L - PAD tokens of row 0 after PAD pads;
    token_type_ids with a block longer than the window in row 0 and two short blocks in row 1."""
    rng = np.random.default_rng(0)
    ids = rng.integers(10, 280, (B, L))
    padded = ids.copy()
    padded[0, PAD:] = ids[0, :L - PAD]
    padded[0, :PAD] = 0
    mask = np.ones((B, L), np.int64)
    padded_mask = mask.copy()
    padded_mask[0, :PAD] = 0
    tti = np.zeros((B, L), np.int64)
    tti[0, PAD + 3:PAD + 3 + WINDOW + 3] = 1
    tti[1, 2:5] = 1
    tti[1, 9:12] = 1
    return dict(ids=ids, mask=mask, padded=padded, padded_mask=padded_mask, tti=tti)


def test_long_prompt_matches_transformers(hf_and_config, decoder, inputs):
    ref = hf_logits(hf_and_config[0], inputs["ids"], inputs["mask"])
    ours = our_logits(decoder, inputs["ids"], inputs["mask"])
    assert max_logit_error(ours, ref, inputs["mask"]) <= F32_TOL


def test_left_padded_batch_matches_transformers(hf_and_config, decoder, inputs):
    ref = hf_logits(hf_and_config[0], inputs["padded"], inputs["padded_mask"])
    ours = our_logits(decoder, inputs["padded"], inputs["padded_mask"])
    assert max_logit_error(ours, ref, inputs["padded_mask"]) <= F32_TOL


def test_padded_row_equals_unpadded_row(decoder, inputs):
    padded = our_logits(decoder, inputs["padded"], inputs["padded_mask"])[0, PAD:]
    unpadded = our_logits(decoder, inputs["ids"], inputs["mask"])[0, :L - PAD]
    assert np.abs(padded - unpadded).max() <= F32_TOL * max(1.0, np.abs(unpadded).max())


def test_bidirectional_blocks_match_transformers(hf_and_config, decoder, inputs):
    hf = hf_and_config[0]
    ref = hf_logits(hf, inputs["padded"], inputs["padded_mask"], inputs["tti"])
    causal_ref = hf_logits(hf, inputs["padded"], inputs["padded_mask"])
    valid = inputs["padded_mask"].astype(bool)
    assert np.abs(ref - causal_ref)[valid].max() > 1e-2, "the blocks should change the reference logits"
    ours = our_logits(decoder, inputs["padded"], inputs["padded_mask"], inputs["tti"])
    assert max_logit_error(ours, ref, inputs["padded_mask"]) <= F32_TOL


def test_kept_positions_match_transformers(hf_and_config, decoder, inputs):
    """keep: the last layer's queries only at chosen positions (one inside row 0's long block, padding
    and -1 = none among them) give transformers' logits there, and zero logits for -1."""
    ids, mask, tti = inputs["padded"], inputs["padded_mask"], inputs["tti"]
    ref = hf_logits(hf_and_config[0], ids, mask, tti)
    keep = np.array([[PAD + 4, L - 1, -1], [0, 10, L - 1]], np.int32)
    attention = make_attention_mask(jnp.asarray(mask, jnp.int32), jnp.asarray(tti, jnp.int32))
    embeds = decoder.embed(jnp.asarray(ids, jnp.int32))
    hidden, _ = decoder(embeds, positions=jnp.asarray(positions_from_mask(mask)), mask=attention,
                        keep=jnp.asarray(keep))
    ours = np.asarray(decoder.logits(hidden))
    for row, cols in enumerate(keep):
        for k, col in enumerate(cols):
            if col < 0:
                assert not ours[row, k].any()
            else:
                assert np.abs(ours[row, k] - ref[row, col]).max() <= F32_TOL * max(1.0, np.abs(ref[row, col]).max())


def test_bfloat16_close_to_float32_transformers(hf_and_config, checkpoint_dir, inputs):
    hf, config = hf_and_config
    model = load_decoder(config, checkpoint_dir, dtype=jnp.bfloat16)
    assert model.embed_tokens.embedding[...].dtype == jnp.bfloat16
    ref = hf_logits(hf, inputs["padded"], inputs["padded_mask"], inputs["tti"])
    ours = our_logits(model, inputs["padded"], inputs["padded_mask"], inputs["tti"])
    valid = inputs["padded_mask"].astype(bool)
    rel = np.linalg.norm(ours[valid] - ref[valid]) / np.linalg.norm(ref[valid])
    assert rel <= BF16_TOL


def test_bfloat16_embedding_scale_matches_transformers():
    """sqrt(2560) rounds to 50.5 in bfloat16, as transformers' scaled embedding does."""
    vocab, dim = 5, 2560
    ref_module = Gemma3TextScaledWordEmbedding(vocab, dim, padding_idx=0, embed_scale=dim ** 0.5)
    ref_module = ref_module.to(torch.bfloat16)
    ids = np.array([[1, 4, 0, 2]])
    with torch.no_grad():
        ref = ref_module(torch.tensor(ids)).float().numpy()
    ours = Embedding(vocab, dim, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    ours.embedding[...] = jnp.asarray(ref_module.weight.detach().float().numpy(), jnp.bfloat16)
    out = np.asarray(ours(jnp.asarray(ids), dim ** 0.5).astype(jnp.float32))
    np.testing.assert_array_equal(out, ref)
    assert float(jnp.asarray(np.float32(dim ** 0.5), jnp.bfloat16)) == 50.5


def test_key_map_covers_checkpoint_and_model(hf_and_config):
    hf, config = hf_and_config
    state = hf.model.language_model.state_dict()
    key_map = text_key_map(config)
    abstract = nnx.eval_shape(lambda: Gemma3TextDecoder(config, rngs=nnx.Rngs(0)))
    targets = abstract_params(abstract)
    assert sorted(r.path for r in key_map) == sorted(targets)
    assert sorted(r.key for r in key_map) == sorted(state)
    for row in key_map:
        assert row.load(state[row.key].numpy()).shape == targets[row.path].shape, row.path


def test_export_inverts_load(hf_and_config):
    hf, config = hf_and_config
    state = {k: v.numpy() for k, v in hf.model.language_model.state_dict().items()}
    for row in text_key_map(config):
        np.testing.assert_array_equal(row.export(row.load(state[row.key])), state[row.key], err_msg=row.key)


def test_bad_inputs_are_rejected(hf_and_config, decoder):
    config = hf_and_config[1]
    mask = make_attention_mask(jnp.ones((1, 4), jnp.int32))
    positions = jnp.zeros((1, 4), jnp.int32)
    with pytest.raises(ValueError, match="embeds must be"):
        decoder(jnp.zeros((1, 4, config.hidden_size + 1)), positions=positions, mask=mask)
    with pytest.raises(ValueError, match="positions has shape"):
        decoder(jnp.zeros((1, 4, config.hidden_size)), positions=jnp.zeros((1, 3), jnp.int32), mask=mask)
    with pytest.raises(ValueError, match="queries have shape"):
        decoder(jnp.zeros((1, 5, config.hidden_size)), positions=jnp.zeros((1, 5), jnp.int32), mask=mask)


def test_tied_logits_backward_keeps_the_table_in_its_dtype():
    """Gradients as the plain float32-output einsum's; in bf16 the backward never converts the (V, D) table."""
    import jax

    from theworld_jax.modeling.layers import tied_logits

    rng = np.random.default_rng(0)
    x, table = jnp.asarray(rng.normal(size=(2, 3, 8)), jnp.float32), jnp.asarray(rng.normal(size=(11, 8)), jnp.float32)
    plain = lambda x, t: jnp.sum(jnp.sin(jnp.einsum("BLD,VD->BLV", x, t, preferred_element_type=jnp.float32)))  # noqa: E731
    tied = lambda x, t: jnp.sum(jnp.sin(tied_logits(x, t)))  # noqa: E731
    for ours, ref in zip(jax.grad(tied, argnums=(0, 1))(x, table), jax.grad(plain, argnums=(0, 1))(x, table)):
        np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), rtol=1e-6, atol=1e-6)
    lowered = jax.jit(jax.grad(tied)).lower(x.astype(jnp.bfloat16), table.astype(jnp.bfloat16)).as_text()
    assert "11x8xf32" not in lowered and "11x8xbf16" in lowered


def test_gelu_gated_gradients_match_autodiff_and_keep_only_the_inputs():
    import jax

    from theworld_jax.modeling.layers import gelu_gated

    rng = np.random.default_rng(1)
    gate, up = (jnp.asarray(rng.normal(size=(2, 5, 7)) * 3, jnp.float32) for _ in range(2))
    plain = lambda g, u: jnp.sum(jnp.sin(jax.nn.gelu(g, approximate=True) * u))  # noqa: E731
    ours = lambda g, u: jnp.sum(jnp.sin(gelu_gated(g, u)))  # noqa: E731
    for a, b in zip(jax.grad(ours, argnums=(0, 1))(gate, up), jax.grad(plain, argnums=(0, 1))(gate, up)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    _, backward = jax.vjp(gelu_gated, gate, up)
    assert [x.shape for x in jax.tree.leaves(backward)] == [gate.shape, up.shape]  # no saved tanh(...)
    differentiated = jax.make_jaxpr(lambda g, u: jax.vjp(gelu_gated, g, u)[0])(gate, up)
    assert "optimization_barrier" in str(differentiated)  # no gelu epilogue writing gate twice
    assert "optimization_barrier" not in str(jax.make_jaxpr(gelu_gated)(gate, up))  # inference keeps it


def test_rms_norm_gradients_match_autodiff_and_keep_only_the_input():
    import jax

    from theworld_jax.modeling.layers import rms_norm

    def plain(x, w, eps=1e-6):
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
        return (normed * (1.0 + w.astype(jnp.float32))).astype(x.dtype)

    rng = np.random.default_rng(2)
    x, w = jnp.asarray(rng.normal(size=(2, 5, 3, 16)) * 3, jnp.float32), jnp.asarray(rng.normal(size=(16,)), jnp.float32)
    np.testing.assert_array_equal(np.asarray(rms_norm(x, w, 1e-6)), np.asarray(plain(x, w)))
    loss = lambda f: lambda x, w: jnp.sum(jnp.sin(3 * f(x, w, 1e-6)))  # noqa: E731
    for a, b in zip(jax.grad(loss(rms_norm), argnums=(0, 1))(x, w), jax.grad(loss(plain), argnums=(0, 1))(x, w)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    grads = jax.grad(loss(rms_norm), argnums=(0, 1))(xb, wb)
    assert [g.dtype for g in grads] == [jnp.bfloat16, jnp.bfloat16]
    for a, b in zip(grads, jax.grad(loss(plain), argnums=(0, 1))(xb.astype(jnp.float32), wb.astype(jnp.float32))):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b), rtol=0.05, atol=0.05 * float(jnp.max(jnp.abs(b))))
    _, backward = jax.vjp(lambda x, w: rms_norm(x, w, 1e-6), x, w)
    assert [a.shape for a in jax.tree.leaves(backward)] == [x.shape, w.shape]  # no saved per-row 1 / rms


def test_flat_product_gradients_match_autodiff_and_save_the_kernel_itself():
    """Einsum.matmul's product: autodiff's gradients for both operands; differentiated in rows only, its
    VJP keeps the kernel as given (not a reshaped copy) and nothing else."""
    import jax

    from theworld_jax.modeling.layers import flat_product

    rng = np.random.default_rng(3)
    rows, kernel = jnp.asarray(rng.normal(size=(5, 6)), jnp.float32), jnp.asarray(rng.normal(size=(2, 3, 4)), jnp.float32)
    plain = lambda r, k: jnp.einsum("MK,KN->MN", r, k.reshape(6, -1))  # noqa: E731
    np.testing.assert_array_equal(np.asarray(flat_product(rows, kernel)), np.asarray(plain(rows, kernel)))
    loss = lambda f: lambda r, k: jnp.sum(jnp.sin(f(r, k)))  # noqa: E731
    for a, b in zip(jax.grad(loss(flat_product), argnums=(0, 1))(rows, kernel),
                    jax.grad(loss(plain), argnums=(0, 1))(rows, kernel)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    _, backward = jax.vjp(lambda r: flat_product(r, kernel), rows)
    assert [leaf is kernel for leaf in jax.tree.leaves(backward)] == [True]


def test_layers_of_one_kind_are_traced_once(monkeypatch):
    """34 layers of two kinds (Gemma 3 4B's pattern): the forward and its gradient trace one layer of
    each kind, plus the last layer once more when it computes only the kept positions."""
    import jax

    from tests.helpers.tiny_gemma import tiny_gemma3_config
    from theworld_jax.config.gemma3 import Gemma3TextConfig
    from theworld_jax import jit
    from theworld_jax.modeling import gemma3_text

    jit._shared_program.cache_clear()  # programs another test traced with these shapes would hide the count
    layer_types = ["sliding_attention"] * 5 + ["full_attention"]
    layer_types = (layer_types * 6)[:34]
    hf_config = tiny_gemma3_config(text_config=dict(num_hidden_layers=34, layer_types=layer_types))
    config = Gemma3TextConfig.from_dict(hf_config.text_config.to_dict())
    decoder = Gemma3TextDecoder(config, rngs=nnx.Rngs(0))
    traced = []
    layer_call = gemma3_text.Gemma3DecoderLayer.__call__
    monkeypatch.setattr(gemma3_text.Gemma3DecoderLayer, "__call__",
                        lambda self, *a, **kw: traced.append(self.self_attn.window) or layer_call(self, *a, **kw))
    graphdef, state = nnx.split(decoder)
    mask = make_attention_mask(jnp.ones((1, 6), jnp.int32))
    positions = jnp.arange(6)[None]

    def loss(state, embeds, keep=None):
        hidden, _ = nnx.merge(graphdef, state)(embeds, positions=positions, mask=mask, remat="full", keep=keep)
        return jnp.sum(hidden)

    embeds = jnp.ones((1, 6, config.hidden_size))
    jax.jit(jax.grad(loss, argnums=1)).trace(state, embeds)
    assert sorted(traced, key=str) == sorted([None, config.sliding_window], key=str)
    traced.clear()
    jax.jit(loss).trace(state, embeds + 1, jnp.asarray([[5]]))
    assert len(traced) == 1  # only the shortened last layer is new: the others' programs are reused
