"""Sanity tests of the PyTorch TheWorld reference composition (tests/helpers/theworld_reference.py) itself."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import theworld_reference as ref
from tests.helpers.tiny_gemma import build_processor, build_tiny_gemma3
from tests.helpers.tiny_vae import TINY_CONFIGS, randomize

VAE_SIZE = (32, 32)  # -> 4x4 latents: 16 world tokens in spatial mode
Z_DIM = 4


def build_vae(seed=0):
    """The tiny Cosmos-like AutoencoderKLWan (spatial factor 8, z_dim 4), randomised, float32."""
    from diffusers import AutoencoderKLWan

    return randomize(AutoencoderKLWan(**TINY_CONFIGS["cosmos_like"]), seed).float().eval()


def rand_image(seed, shape=(40, 50, 3)):
    return np.random.RandomState(seed).randint(0, 256, shape, dtype=np.uint8)


@pytest.fixture(scope="module")
def parts():
    processor = build_processor()
    gemma = build_tiny_gemma3()
    vae = build_vae()
    torch.manual_seed(1)
    hidden = gemma.config.text_config.hidden_size
    projector = ref.TorchWorldProjector(Z_DIM, hidden, "mlp").eval()
    sow = len(processor.tokenizer)
    return processor, gemma, vae, projector, sow, sow + 1


@pytest.fixture(scope="module")
def batch(parts):
    """A left-padded batch of two rows with an image each (row 0 padded), no world tokens yet."""
    processor = parts[0]
    texts = ["<bos>Hello <start_of_image> what is this?",
             "<bos>A cat <start_of_image> is sitting on a red chair next to the window"]
    images = [[Image.fromarray(rand_image(0))], [Image.fromarray(rand_image(1))]]
    enc = processor(text=texts, images=images, padding=True, return_tensors="pt")
    assert int(enc["attention_mask"][0, 0]) == 0 and int(enc["attention_mask"][1, 0]) == 1
    return dict(enc)


def make_model(parts, **kw):
    _, gemma, vae, projector, sow, eow = parts
    return ref.TheWorldReference(gemma, vae, projector, sow, eow, vae_size=VAE_SIZE, **kw)


def test_projector_keys_follow_upstream():
    keys = {arch: sorted(ref.TorchWorldProjector(4, 8, arch).state_dict()) for arch in ref.PROJECTION_ARCHITECTURES}
    assert keys["mlp"] == keys["mlp_no_final_gelu"] == [
        "projection.0.bias", "projection.0.weight", "projection.2.bias", "projection.2.weight"]
    assert keys["linear"] == ["projection.0.bias", "projection.0.weight"]
    with pytest.raises(ValueError, match="projection architecture"):
        ref.TorchWorldProjector(4, 8, "conv")


def test_projector_mlp_uses_exact_gelu_after_both_layers():
    torch.manual_seed(0)
    proj = ref.TorchWorldProjector(4, 8, "mlp")
    x = torch.randn(2, 3, 4)
    w0, b0, w2, b2 = (proj.state_dict()[k] for k in
                      ("projection.0.weight", "projection.0.bias", "projection.2.weight", "projection.2.bias"))
    erf_gelu = lambda v: 0.5 * v * (1 + torch.erf(v / 2 ** 0.5))
    torch.testing.assert_close(proj(x), erf_gelu(erf_gelu(x @ w0.T + b0) @ w2.T + b2), rtol=0, atol=1e-6)


def test_latents_to_tokens_orders_frames_then_rows_then_columns():
    mean = torch.randn(2, 3, 2, 4, 5)  # (B, z, T', H', W')
    spatial = ref.latents_to_tokens(mean, "spatial")
    channel = ref.latents_to_tokens(mean, "channel")
    assert spatial.shape == (2, 2 * 4 * 5, 3) and channel.shape == (2, 2 * 3, 4 * 5)
    b, t, h, w, c = 1, 1, 2, 3, 2
    assert torch.equal(spatial[b, t * 20 + h * 5 + w], mean[b, :, t, h, w])
    assert spatial[b, t * 20 + h * 5 + w, c] == mean[b, c, t, h, w] == channel[b, t * 3 + c, h * 5 + w]
    first = mean[:, :, 0]
    assert torch.equal(ref.latents_to_tokens(first[:, :, None], "spatial"),
                       first.permute(0, 2, 3, 1).reshape(2, 20, 3))  # upstream's expression


def test_vae_input_resizes_bilinear_and_scales():
    img, clip = rand_image(3), np.stack([rand_image(4), rand_image(5)])
    x = ref.vae_input([img, Image.fromarray(img)], size=(16, 24))
    assert x.shape == (2, 3, 1, 16, 24) and x.dtype == torch.float32
    manual = np.asarray(Image.fromarray(img).resize((24, 16), Image.BILINEAR), np.float32)
    torch.testing.assert_close(x[0, :, 0], torch.from_numpy(manual).permute(2, 0, 1) / 127.5 - 1)
    assert torch.equal(x[0], x[1])
    raw = ref.vae_input([clip], size=(16, 24), value_range="zero_255")
    assert raw.shape == (1, 3, 2, 16, 24) and raw.max() > 1
    torch.testing.assert_close(raw / 127.5 - 1, ref.vae_input([clip], size=(16, 24)))


@pytest.mark.parametrize("bad, match", [(np.zeros((8, 8, 3), np.float32), "uint8"),
                                        (np.zeros((8, 8), np.uint8), "shape")])
def test_vae_input_rejects_bad_images(bad, match):
    with pytest.raises(ValueError, match=match):
        ref.vae_input([bad])


def test_injection_after_each_rows_bos(parts, batch):
    _, gemma, _, _, sow, eow = parts
    ids, mask, tt = batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]
    labels = ids.clone()
    bos = gemma.config.text_config.bos_token_id
    ids2, mask2, tt2, labels2 = ref.inject_world_tokens(ids, mask, tt, labels, bos, sow, eow)
    assert ids2.shape == (2, ids.shape[1] + 2)
    for b in range(2):
        p = int(mask[b].nonzero()[0])
        assert ids[b, p] == bos
        assert ids2[b, p + 1:p + 3].tolist() == [sow, eow]
        assert labels2[b, p + 1:p + 3].tolist() == [-100, -100]
        assert mask2[b, p + 1:p + 3].tolist() == [1, 1] and tt2[b, p + 1:p + 3].tolist() == [0, 0]
        keep = [i for i in range(ids2.shape[1]) if i not in (p + 1, p + 2)]
        assert torch.equal(ids2[b, keep], ids[b]) and torch.equal(labels2[b, keep], labels[b])
        assert torch.equal(mask2[b, keep], mask[b]) and torch.equal(tt2[b, keep], tt[b])
    again = ref.inject_world_tokens(ids2, mask2, tt2, labels2, bos, sow, eow)
    assert again[0] is ids2  # already present: left as is
    mixed = torch.cat([ids2[:1], ids2[1:].masked_fill(ids2[1:] == sow, 3)])
    with pytest.raises(ValueError, match="start_of_world"):
        ref.inject_world_tokens(mixed, mask2, tt2, labels2, bos, sow, eow)


def with_world_pair(batch, sow, eow, where):
    """Insert [sow, eow] at explicit per-row positions (rows differ), labels = input_ids elsewhere."""
    rows = {k: [] for k in ("input_ids", "attention_mask", "token_type_ids", "labels")}
    for b, at in enumerate(where):
        ids = batch["input_ids"][b]
        rows["input_ids"].append(torch.cat([ids[:at], torch.tensor([sow, eow]), ids[at:]]))
        rows["attention_mask"].append(torch.cat([batch["attention_mask"][b][:at], torch.ones(2, dtype=torch.long),
                                                 batch["attention_mask"][b][at:]]))
        rows["token_type_ids"].append(torch.cat([batch["token_type_ids"][b][:at], torch.zeros(2, dtype=torch.long),
                                                 batch["token_type_ids"][b][at:]]))
        rows["labels"].append(rows["input_ids"][-1].clone())
    return {k: torch.stack(v) for k, v in rows.items()}


def test_splice_per_row_positions_masks_labels(parts, batch):
    _, _, _, _, sow, eow = parts
    model = make_model(parts, world_attention="bidirectional")
    where = [40, 20]  # row 0 is left-padded, row 1 is not: sow at different positions
    inp = with_world_pair(batch, sow, eow, where)
    L, n, d = inp["input_ids"].shape[1], 16, 64
    embeds = torch.randn(2, L, d)
    world = torch.randn(2, n, d)
    e, m, tt, lab = model.splice(embeds, world, inp["input_ids"], inp["attention_mask"], None, inp["labels"])
    assert e.shape == (2, L + n, d) and m.shape == tt.shape == lab.shape == (2, L + n)
    for b, s in enumerate(where):
        assert torch.equal(e[b, :s + 1], embeds[b, :s + 1]) and torch.equal(e[b, s + 1:s + 1 + n], world[b])
        assert torch.equal(e[b, s + 1 + n:], embeds[b, s + 1:])
        assert m[b, s + 1:s + 1 + n].eq(1).all() and torch.equal(m[b, s + 1 + n:], inp["attention_mask"][b, s + 1:])
        assert tt[b].tolist() == [0] * (s + 1) + [1] * n + [0] * (L - s - 1)
        expect = inp["labels"][b].tolist()
        expect[s] = expect[s + 1] = -100
        assert lab[b].tolist() == expect[:s + 1] + [-100] * n + expect[s + 1:]


def test_prepare_positions_count_attended_tokens(parts, batch):
    model = make_model(parts)
    with torch.no_grad():
        inp = model.prepare(batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                            batch["token_type_ids"], images=[rand_image(10), rand_image(11)])
    mask, pos = inp["attention_mask"], inp["position_ids"]
    assert mask.shape == pos.shape == inp["inputs_embeds"].shape[:2] == inp["token_type_ids"].shape
    for b in range(2):
        pads = int((mask[b] == 0).sum())
        assert mask[b, pads:].eq(1).all() and pos[b, :pads].eq(0).all()
        assert pos[b, pads:].tolist() == list(range(mask.shape[1] - pads))


@pytest.fixture(scope="module")
def fused(parts, batch):
    model = make_model(parts)
    worlds = [rand_image(10), rand_image(11)]
    with torch.no_grad():
        logits, loss = model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                             batch["token_type_ids"], labels=batch["input_ids"].clone(), images=worlds)
    return model, worlds, logits, loss


def test_fused_left_padded_row_equals_unpadded(parts, batch, fused):
    model, worlds, logits, _ = fused
    assert logits.shape == (2, batch["input_ids"].shape[1] + 2 + 16, parts[1].config.text_config.vocab_size)
    keep = batch["attention_mask"][0].bool()
    with torch.no_grad():
        alone, _ = model(batch["input_ids"][:1, keep], batch["attention_mask"][:1, keep], batch["pixel_values"][:1],
                         batch["token_type_ids"][:1, keep], images=worlds[:1])
    pad = int((~keep).sum())
    torch.testing.assert_close(logits[0, pad:], alone[0], rtol=0, atol=1e-5)


def test_fused_world_tokens_only_affect_later_positions(parts, batch, fused):
    model, _, logits, _ = fused
    with torch.no_grad():
        other, _ = model(batch["input_ids"][1:], batch["attention_mask"][1:], batch["pixel_values"][1:],
                         batch["token_type_ids"][1:], images=[rand_image(99)])
    # row 1: BOS at 0, sow at 1, world at 2..17 (causal world block)
    torch.testing.assert_close(other[0, :2], logits[1, :2], rtol=0, atol=1e-5)
    assert (other[0, 2:] - logits[1, 2:]).abs().amax(-1).min() > 1e-4


def test_world_free_helper_equals_gemma_and_embeddings_match(parts, batch):
    _, gemma, *_ = parts
    model = make_model(parts)
    row = {k: v[1:] for k, v in batch.items()}
    with torch.no_grad():
        direct = gemma(**row).logits
        helper = ref.gemma_logits(gemma, row["input_ids"], row["attention_mask"], row["pixel_values"],
                                  row["token_type_ids"])
        embeds = model.text_and_image_embeddings(row["input_ids"], row["pixel_values"])
        via_embeds = gemma(inputs_embeds=embeds, attention_mask=row["attention_mask"],
                           token_type_ids=row["token_type_ids"]).logits
    torch.testing.assert_close(helper, direct, rtol=0, atol=1e-5)
    torch.testing.assert_close(via_embeds, direct, rtol=0, atol=1e-5)


def test_loss_is_shifted_mean_cross_entropy(parts, batch, fused):
    _, gemma, *_ = parts
    loss = fused[3]
    labels = torch.randint(0, 50, (2, 7))
    labels[0, 3] = -100
    lg = torch.randn(2, 7, gemma.config.text_config.vocab_size)
    want = gemma.loss_function(logits=lg, labels=labels, vocab_size=lg.shape[-1])
    torch.testing.assert_close(ref.causal_lm_loss(lg, labels), want)
    assert torch.isfinite(loss) and loss > 0


def test_bidirectional_world_changes_world_logits(parts, batch, fused):
    _, worlds, logits, _ = fused
    bidir = make_model(parts, world_attention="bidirectional")
    with torch.no_grad():
        out, _ = bidir(batch["input_ids"][1:], batch["attention_mask"][1:], batch["pixel_values"][1:],
                       None, images=worlds[1:])
    torch.testing.assert_close(out[0, :2], logits[1, :2], rtol=0, atol=1e-5)
    assert (out[0, 2:17] - logits[1, 2:17]).abs().max() > 1e-3  # world tokens see later world tokens


def test_channel_mode_gives_z_tokens(parts, batch):
    _, gemma, vae, _, sow, eow = parts
    proj = ref.TorchWorldProjector(VAE_SIZE[0] // 8 * VAE_SIZE[1] // 8, gemma.config.text_config.hidden_size)
    model = ref.TheWorldReference(gemma, vae, proj, sow, eow, mode="channel", vae_size=VAE_SIZE)
    with torch.no_grad():
        logits, _ = model(batch["input_ids"], batch["attention_mask"], images=[rand_image(1), rand_image(2)])
    assert logits.shape[1] == batch["input_ids"].shape[1] + 2 + Z_DIM


def test_save_upstream_checkpoint(tmp_path, parts):
    projector = parts[3]
    ref.save_upstream_checkpoint(tmp_path, projector, "/g", "/c", "spatial", "mlp", Z_DIM)
    from safetensors.torch import load_file

    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "the_world" and config["world_projection_mode"] == "spatial"
    assert config["gemma_model_name"] == "/g" and config["cosmos_model_name"] == "/c"
    tensors = load_file(os.path.join(tmp_path, "model.safetensors"))
    assert sorted(tensors) == [f"cosmos_encoder.world_projector.projection.{i}.{p}"
                               for i in (0, 2) for p in ("bias", "weight")]
    assert torch.equal(tensors["cosmos_encoder.world_projector.projection.2.weight"],
                       projector.state_dict()["projection.2.weight"])
