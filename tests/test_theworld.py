"""TheWorld (theworld_jax) against the PyTorch reference composition, on tiny random models.

The reference (tests/helpers/theworld_reference.py) is transformers' Gemma 3 + diffusers' Wan VAE + a torch
projector composed from docs/design.md. Both sides load the same weights: the JAX model through the public
`TheWorld.from_pretrained`, the projector through an upstream-format checkpoint or an export.
"""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import theworld_reference as ref
from tests.helpers.checkpoints import orbax_params
from tests.helpers.tiny_gemma import build_processor, build_tiny_gemma3, save_tiny_gemma3
from tests.helpers.tiny_vae import make_tiny_vae
from theworld_jax import TheWorld
from theworld_jax.weights.loader import abstract_params
from theworld_jax.weights.world_projector_keys import export_world_projector

VAE_SIZE = (32, 32)  # tiny VAE has spatial factor 8: 4x4 latents, 16 world tokens in spatial mode
TOL = 1e-5


def rand_image(seed, shape=(40, 50, 3)):
    return np.random.RandomState(seed).randint(0, 256, shape, dtype=np.uint8)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("theworld")
    processor = build_processor()
    gemma = build_tiny_gemma3()
    save_tiny_gemma3(gemma, processor, str(root / "gemma"), layout="hub")
    vae = make_tiny_vae(str(root / "vae"), "cosmos_like").float().eval()
    return dict(root=root, gemma_dir=str(root / "gemma"), vae_dir=str(root / "vae"), gemma=gemma, vae=vae,
                processor=processor)


def load_jax(dirs, **settings):
    return TheWorld.from_pretrained(dirs["gemma_dir"], enable_world=True, cosmos_model_name=dirs["vae_dir"],
                                    dtype=jnp.float32, vae_image_size=VAE_SIZE, **settings)


def reference_for(dirs, model: TheWorld, world_attention="causal"):
    """The torch composition with the JAX model's projector weights copied over."""
    c = model.config
    proj = model.model.world_projector
    exported = export_world_projector(proj, prefix="")
    in_features = exported["projection.0.weight"].shape[1]
    hidden = exported["projection.0.weight"].shape[0]
    torch_proj = ref.TorchWorldProjector(in_features, hidden, c.projection_architecture)
    torch_proj.load_state_dict({k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in exported.items()})
    return ref.TheWorldReference(dirs["gemma"], dirs["vae"], torch_proj.eval(), c.sow_token_id, c.eow_token_id,
                                 mode=c.world_projection_mode, world_attention=world_attention,
                                 vae_input_range=c.vae_input_range, vae_size=VAE_SIZE)


def batch_inputs(processor, with_images=True, labels=False):
    """A left-padded batch of two rows with different prompts (and a Gemma image each)."""
    if with_images:
        texts = ["<bos>Hello <start_of_image> what is this?",
                 "<bos>A cat <start_of_image> is sitting on a red chair next to the window"]
        images = [[Image.fromarray(rand_image(10))], [Image.fromarray(rand_image(11))]]
        enc = dict(processor(text=texts, images=images, padding=True, return_tensors="np"))
    else:
        enc = dict(processor.tokenizer(["<bos>Hello there", "<bos>A much longer prompt about the world"],
                                       padding=True, return_tensors="np"))
    if labels:
        lab = np.where(enc["attention_mask"] == 1, enc["input_ids"], -100)
        lab[:, :3] = -100
        enc["labels"] = lab
    return enc


def torch_inputs(enc):
    return {k: torch.from_numpy(np.asarray(v)).long() if k != "pixel_values" else torch.from_numpy(v).float()
            for k, v in enc.items()}


def assert_valid_close(ours, theirs, mask):
    ours, theirs = np.asarray(ours), theirs.detach().numpy()
    assert ours.shape == theirs.shape
    valid = np.asarray(mask).astype(bool)
    diff = np.abs(ours - theirs)[valid].max()
    scale = max(1.0, np.abs(theirs[valid]).max())
    assert diff <= TOL * scale, f"max |logit diff| {diff:.3g} > {TOL * scale:.3g}"


WORLD_IMAGES = [rand_image(0, (48, 40, 3)), Image.fromarray(rand_image(1))]


@pytest.mark.parametrize("mode,architecture,world_attention", [
    ("spatial", "mlp", "causal"),
    ("spatial", "mlp_no_final_gelu", "bidirectional"),
    ("channel", "linear", "causal"),
    ("channel", "mlp", "bidirectional"),
])
def test_fused_logits_match_reference(dirs, mode, architecture, world_attention):
    model = load_jax(dirs, world_projection_mode=mode, projection_architecture=architecture,
                     world_attention=world_attention)
    enc = batch_inputs(dirs["processor"], labels=True)
    out = model(**enc, images=WORLD_IMAGES)
    with torch.no_grad():
        logits, loss = reference_for(dirs, model, world_attention)(**torch_inputs(enc), images=WORLD_IMAGES)
    assert_valid_close(out.logits, logits, out.attention_mask)
    assert abs(float(out.loss) - float(loss)) <= TOL * max(1.0, abs(float(loss)))


def test_clip_world_input_matches_reference(dirs):
    model = load_jax(dirs)
    clips = [np.stack([rand_image(20 + t) for t in range(5)]), np.stack([rand_image(30 + t) for t in range(5)])]
    enc = batch_inputs(dirs["processor"])
    out = model(**enc, images=clips)
    assert out.logits.shape[1] == enc["input_ids"].shape[1] + 2 + 2 * 16  # 2 latent frames of 16 tokens
    with torch.no_grad():
        logits, _ = reference_for(dirs, model)(**torch_inputs(enc), images=clips)
    assert_valid_close(out.logits, logits, out.attention_mask)


def test_prompt_with_world_tokens_at_different_positions(dirs):
    model = load_jax(dirs)
    tok = model.processor.tokenizer
    enc = dict(tok(["<bos>short <start_of_world><end_of_world> question",
                    "<bos>a longer prefix before the <start_of_world><end_of_world> world"],
                   padding=True, return_tensors="np"))
    out = model(**enc, images=WORLD_IMAGES)
    assert out.logits.shape[1] == enc["input_ids"].shape[1] + 16
    with torch.no_grad():
        logits, _ = reference_for(dirs, model)(**torch_inputs(enc), images=WORLD_IMAGES)
    assert_valid_close(out.logits, logits, out.attention_mask)


def test_without_world_is_exactly_gemma(dirs):
    enc = batch_inputs(dirs["processor"])
    with torch.no_grad():
        expected = ref.gemma_logits(dirs["gemma"], **torch_inputs(enc))
    for model in (TheWorld.from_pretrained(dirs["gemma_dir"], enable_world=False, dtype=jnp.float32),
                  load_jax(dirs)):
        out = model(**enc)  # no images: the Gemma 3 path
        assert_valid_close(out.logits, expected, enc["attention_mask"])


def test_processor_gets_world_tokens_after_the_tokenizer(dirs):
    model = load_jax(dirs)
    n = len(dirs["processor"].tokenizer)
    assert (model.config.sow_token_id, model.config.eow_token_id) == (n, n + 1)
    tok = model.processor.tokenizer
    assert tok.convert_tokens_to_ids(["<start_of_world>", "<end_of_world>"]) == [n, n + 1]


def test_save_pretrained_round_trip(dirs):
    model = load_jax(dirs, world_projection_mode="channel", projection_architecture="linear",
                     freeze_gemma_language=False)
    target = str(dirs["root"] / "saved")
    model.save_pretrained(target)
    again = TheWorld.from_pretrained(target, dtype=jnp.float32)
    assert again.config == model.config
    assert not again.config.freeze_gemma_language
    enc = batch_inputs(dirs["processor"])
    np.testing.assert_array_equal(np.asarray(again(**enc, images=WORLD_IMAGES).logits),
                                  np.asarray(model(**enc, images=WORLD_IMAGES).logits))


def test_save_pretrained_writes_configs_processor_and_params_in_the_model_dtype(dirs):
    model = TheWorld.from_pretrained(dirs["gemma_dir"], enable_world=True, cosmos_model_name=dirs["vae_dir"],
                                     dtype=jnp.bfloat16, vae_image_size=VAE_SIZE)
    target = dirs["root"] / "saved_bf16"
    model.save_pretrained(str(target))
    names = set(os.listdir(target))
    assert {"config.json", "gemma_config.json", "vae_config.json", "params", "tokenizer_config.json"} <= names
    assert json.loads((target / "config.json").read_text())["model_type"] == "theworld_jax"
    assert json.loads((target / "gemma_config.json").read_text()) == json.loads(
        open(os.path.join(dirs["gemma_dir"], "config.json")).read())
    written = orbax_params(str(target))
    expected = {path: (tuple(p.shape), np.dtype(p.dtype)) for path, p in abstract_params(model.model).items()}
    assert written == expected
    assert {d for _, d in written.values()} == {np.dtype(jnp.bfloat16)}


def test_upstream_checkpoint_loads_with_zero_255_range(dirs):
    torch.manual_seed(3)
    hidden = dirs["gemma"].config.text_config.hidden_size
    projector = ref.TorchWorldProjector(4, hidden, "mlp").eval()
    ckpt = str(dirs["root"] / "upstream")
    ref.save_upstream_checkpoint(ckpt, projector, dirs["gemma_dir"], dirs["vae_dir"], "spatial", "mlp", 4)
    model = TheWorld.from_pretrained(ckpt, dtype=jnp.float32, vae_image_size=VAE_SIZE)
    assert model.config.vae_input_range == "zero_255"
    enc = batch_inputs(dirs["processor"])
    reference = ref.TheWorldReference(dirs["gemma"], dirs["vae"], projector, model.config.sow_token_id,
                                      model.config.eow_token_id, vae_input_range="zero_255", vae_size=VAE_SIZE)
    out = model(**enc, images=WORLD_IMAGES)
    with torch.no_grad():
        logits, _ = reference(**torch_inputs(enc), images=WORLD_IMAGES)
    assert_valid_close(out.logits, logits, out.attention_mask)


def test_upstream_checkpoint_that_mismatches_its_config_is_an_error(dirs):
    hidden = dirs["gemma"].config.text_config.hidden_size
    ckpt = str(dirs["root"] / "upstream_bad")
    ref.save_upstream_checkpoint(ckpt, ref.TorchWorldProjector(4, hidden, "linear"), dirs["gemma_dir"],
                                 dirs["vae_dir"], "spatial", "linear", 4)
    with open(os.path.join(ckpt, "config.json")) as f:
        config = json.load(f)
    config["projection_architecture"] = "mlp"
    with open(os.path.join(ckpt, "config.json"), "w") as f:
        json.dump(config, f)
    with pytest.raises(Exception, match="projection.2"):
        TheWorld.from_pretrained(ckpt, dtype=jnp.float32, vae_image_size=VAE_SIZE)


def test_bad_input_is_a_clear_error(dirs):
    model = load_jax(dirs)
    enc = batch_inputs(dirs["processor"], with_images=False)
    with pytest.raises(ValueError, match="one per row"):
        model(**enc, images=WORLD_IMAGES[:1])
    with pytest.raises((ValueError, TypeError), match="image"):
        model(**enc, images=["not an image", "nor this"])
    tok = model.processor.tokenizer
    bad = dict(tok(["<bos>a <start_of_world> b", "<bos>c <start_of_world> d"], padding=True, return_tensors="np"))
    with pytest.raises(ValueError, match="end_of_world|eow|<sow>|sow"):
        model(**bad, images=WORLD_IMAGES)
    long = {"input_ids": np.full((2, 500), 20), "attention_mask": np.ones((2, 500), int)}
    long["input_ids"][:, 0] = dirs["gemma"].config.text_config.bos_token_id
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(**long, images=WORLD_IMAGES)
