"""logits_to_keep (logits and loss at chosen positions) and the decoder's remat policies, on tiny models."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image
from tests.helpers.tiny_gemma import build_processor, build_tiny_gemma3, save_tiny_gemma3
from tests.helpers.tiny_text_decoder import build_hf, load_decoder, save_language_model
from tests.helpers.tiny_vae import make_tiny_vae

from theworld_jax import TheWorld
from theworld_jax.attention import make_attention_mask
from theworld_jax.modeling.fusion import labelled_positions
from theworld_jax.modeling.gemma3_text import REMAT_POLICIES


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("keep")
    processor = build_processor()
    save_tiny_gemma3(build_tiny_gemma3(), processor, str(root / "gemma"), layout="hub")
    make_tiny_vae(str(root / "vae"), "cosmos_like")
    return TheWorld.from_pretrained(str(root / "gemma"), enable_world=True, cosmos_model_name=str(root / "vae"),
                                    dtype=jnp.float32, vae_image_size=(32, 32), world_attention="bidirectional")


def test_loss_from_labelled_positions_equals_full_loss(world):
    """Left-padded rows with a Gemma image each and a bidirectional world block: the loss from the logits
    at the labelled positions alone equals the full-logits loss; logits_to_keep=1 gives the last logits."""
    texts = ["<bos>Hello <start_of_image> what is this?", "<bos>A cat <start_of_image> sits on a red chair"]
    images = [[Image.fromarray(np.full((40, 50, 3), 60 * i, np.uint8))] for i in (1, 2)]
    enc = dict(world.processor(text=texts, images=images, padding=True, return_tensors="np"))
    labels = np.where(enc["attention_mask"] == 1, enc["input_ids"], -100)
    labels[:, :-4] = -100  # the last four tokens are predicted from positions L-5 .. L-2
    clips = [np.random.RandomState(i).randint(0, 256, (48, 40, 3), np.uint8) for i in range(2)]
    full = world(**enc, labels=labels, images=clips)
    keep = labelled_positions(labels)
    assert keep.shape == (2, 4)
    kept = world(**enc, labels=labels, images=clips, logits_to_keep=keep)
    assert kept.logits.shape == (2, 4, full.logits.shape[2])
    np.testing.assert_allclose(float(kept.loss), float(full.loss), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(kept.logits), np.asarray(full.logits[:, -5:-1]), atol=1e-5)
    last = world(**enc, images=clips, logits_to_keep=1)
    np.testing.assert_allclose(np.asarray(last.logits), np.asarray(full.logits[:, -1:]), atol=1e-5)


def test_remat_policies_give_the_same_gradients(tmp_path):
    hf, config = build_hf()
    decoder = load_decoder(config, save_language_model(hf, str(tmp_path)))
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(10, 280, (2, 20)), jnp.int32)
    attention_mask = np.ones((2, 20), np.int32)
    attention_mask[0, :4] = 0
    types = np.zeros((2, 20), np.int32)
    types[1, 5:11] = 1
    mask = make_attention_mask(attention_mask, types)
    positions = jnp.asarray(np.clip(np.cumsum(attention_mask, 1) - 1, 0, None), jnp.int32)
    weights = jnp.asarray(rng.standard_normal((2, 20, config.vocab_size)), jnp.float32)

    graphdef, state = nnx.split(decoder)

    @partial(jax.jit, static_argnums=1)  # plain JAX transforms over a merged module, as a training step has them
    def grads(state, remat):
        def loss(state):
            model = nnx.merge(graphdef, state)
            hidden, _ = model(model.embed(ids), positions=positions, mask=mask, remat=remat)
            return jnp.sum(model.logits(hidden) * weights)
        return jax.grad(loss)(state)

    ref = jax.tree.leaves(grads(state, "none"))
    for remat in REMAT_POLICIES:  # recomputation reorders float32 sums: compare relative norms (measured ~1e-6)
        for ours, theirs in zip(jax.tree.leaves(grads(state, remat)), ref):
            assert float(jnp.linalg.norm(ours - theirs) / jnp.linalg.norm(theirs)) < 1e-5, remat
    with pytest.raises(ValueError, match="unknown remat policy"):
        decoder(decoder.embed(ids), positions=positions, mask=mask, remat="most")


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_rows_through_the_fast_path_equal_the_oracle(world, monkeypatch, side):
    """Left-padded rows (rolled to their first token) and right-padded rows (as the training launcher pads
    them: TheWorld learns from the host mask that no row is left padded, so they are attended in place):
    the decoder's fast attention path (its logic run through jax.nn's XLA backend, in place of cuDNN)
    gives the XLA oracle's logits."""
    from theworld_jax import attention, interval_attention

    texts = ["<bos>Hello <start_of_image> what is this?", "<bos>A cat <start_of_image> sits on a red chair"]
    images = [[Image.fromarray(np.full((40, 50, 3), 60 * i, np.uint8))] for i in (1, 2)]
    enc = dict(world.processor(text=texts, images=images, padding=True, return_tensors="np"))
    pads = (enc["attention_mask"] == 0).sum(axis=1)
    assert pads.max() > 0
    if side == "right":  # the processor's left padding moved to the right
        for name in ("input_ids", "attention_mask", "token_type_ids"):
            enc[name] = np.stack([np.roll(row, -int(p)) for row, p in zip(enc[name], pads)])
    clips = [np.random.RandomState(i).randint(0, 256, (48, 40, 3), np.uint8) for i in range(2)]
    oracle = world(**enc, images=clips)

    layouts = []
    interval = interval_attention.interval_attention

    def on_xla(q, k, v, mask, *, backend, **kw):
        layouts.append(mask.layout)
        return interval(q, k, v, mask, backend="xla", **kw)

    text = world.gemma_config.text
    decoder_queries = (text.num_attention_heads, text.head_dim)  # not SigLIP's or the VAE's
    monkeypatch.setattr(attention, "cudnn_supports", lambda q: tuple(q.shape[2:]) == decoder_queries)
    monkeypatch.setattr(interval_attention, "interval_attention", on_xla)
    jax.clear_caches()
    fast = world(**enc, images=clips)
    jax.clear_caches()
    assert layouts and all(layout.left_padding == (side == "left") for layout in layouts)
    real = np.asarray(oracle.attention_mask).astype(bool)
    ref = np.asarray(oracle.logits)[real]
    np.testing.assert_allclose(np.asarray(fast.logits)[real], ref, rtol=0, atol=1e-4 * max(1.0, np.abs(ref).max()))
