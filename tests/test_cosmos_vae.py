"""CosmosVAE (Wan2.1 VAE) against diffusers' AutoencoderKLWan on tiny random models, float32."""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from theworld_jax.config import ConfigError
from theworld_jax.config.wan_vae import WanVAEConfig
from theworld_jax.cosmos_vae import CosmosVAE
from theworld_jax.weights.safetensors_io import CheckpointError
from tests.helpers.tiny_vae import make_tiny_vae

# (config name, H, W): H != W, multiples of the config's spatial factor (8 and 4).
CASES = {"cosmos_like": (16, 24), "three_stage": (12, 8)}


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request, tmp_path_factory):
    """(diffusers reference, CosmosVAE loaded from its save_pretrained dir, (H, W), dir)."""
    name = request.param
    path = str(tmp_path_factory.mktemp(name))
    ref = make_tiny_vae(path, name)
    return ref, CosmosVAE.from_pretrained(path), CASES[name], path


def assert_close(ours, ref, tol=1e-5):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape
    bound = tol * max(1.0, np.abs(ref).max())
    assert np.abs(ours - ref).max() <= bound, f"max |diff| {np.abs(ours - ref).max():.3g} > {bound:.3g}"


def ref_mean(ref, video: np.ndarray) -> np.ndarray:
    """diffusers' posterior mode of a channels-last video, back in channels-last."""
    with torch.no_grad():
        mode = ref.encode(torch.from_numpy(video.transpose(0, 4, 1, 2, 3))).latent_dist.mode()
    return mode.numpy().transpose(0, 2, 3, 4, 1)


def random_video(b, t, h, w, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, (b, t, h, w, 3)).astype(np.float32)


@pytest.mark.parametrize("frames", [1, 5, 6, 9])
def test_encode_matches_diffusers(pair, frames):
    ref, vae, (h, w), _ = pair
    video = random_video(2, frames, h, w, seed=frames)
    mean = vae.encode(video)
    f = vae.config.spatial_factor
    assert mean.shape == (2, vae.config.latent_frames(frames), h // f, w // f, vae.config.z_dim)
    assert_close(mean, ref_mean(ref, video))


def test_encode_is_causal_and_drops_trailing_frames(pair):
    _, vae, (h, w), _ = pair
    video = random_video(2, 9, h, w, seed=3)  # the shapes of the parity test: no new compilations
    alone = np.asarray(vae.encode(video[:, :1]))
    clip = np.asarray(vae.encode(video[:, :5]))
    np.testing.assert_allclose(clip[:, :1], alone, rtol=0, atol=1e-5)
    nine = np.asarray(vae.encode(video))
    np.testing.assert_allclose(nine[:, :clip.shape[1]], clip, rtol=0, atol=1e-5)
    for frames in (2, 3, 4):  # not a full chunk: dropped, as in diffusers
        np.testing.assert_array_equal(np.asarray(vae.encode(video[:, :frames])), alone)
    np.testing.assert_array_equal(np.asarray(vae.encode(video[:, :8])), clip)


@pytest.mark.parametrize("latent_frames", [1, 3])
def test_decode_matches_diffusers(pair, latent_frames):
    ref, vae, (h, w), _ = pair
    f, z = vae.config.spatial_factor, vae.config.z_dim
    latents = np.random.default_rng(latent_frames).standard_normal((2, latent_frames, h // f, w // f, z))
    latents = latents.astype(np.float32)
    with torch.no_grad():
        expected = ref.decode(torch.from_numpy(latents.transpose(0, 4, 1, 2, 3))).sample.numpy()
    expected = expected.transpose(0, 2, 3, 4, 1)
    assert (np.abs(expected) < 1).mean() > 0.3, "reference output is mostly clamped: the test proves little"
    assert_close(vae.decode(latents), expected)


def test_encode_traces_inside_jit_and_chunk_loop_is_a_scan(pair):
    _, vae, (h, w), _ = pair
    out = jax.eval_shape(lambda x: vae.encode(x), jax.ShapeDtypeStruct((1, 9, h, w, 3), jnp.float32))
    assert out.shape[:2] == (1, vae.config.latent_frames(9))

    def program(frames):
        return jax.make_jaxpr(vae.encode_mean)(jnp.zeros((1, frames, h, w, 3))).jaxpr

    long, longer = program(9), program(21)
    assert any(e.primitive.name == "scan" for e in long.eqns)
    assert len(long.eqns) == len(longer.eqns), "the traced program grows with the clip length"


def test_single_frame_is_a_2d_network(pair):
    _, vae, (h, w), _ = pair
    jaxpr = jax.make_jaxpr(vae.encode_mean)(jnp.zeros((1, 1, h, w, 3))).jaxpr
    convs = [e for e in jaxpr.eqns if e.primitive.name == "conv_general_dilated"]
    assert convs and all(e.invars[0].aval.ndim == 4 for e in convs)


def test_bfloat16_encode_is_close_to_float32_reference(tmp_path):
    ref = make_tiny_vae(str(tmp_path), "cosmos_like")
    vae = CosmosVAE.from_pretrained(str(tmp_path), dtype=jnp.bfloat16)
    assert vae.encoder.conv_in.kernel.get_value().dtype == jnp.bfloat16
    video = random_video(1, 5, 16, 24, seed=7)
    ours = np.asarray(vae.encode(video).astype(jnp.float32))
    expected = ref_mean(ref, video)
    assert np.linalg.norm(ours - expected) / np.linalg.norm(expected) <= 2e-2


@pytest.fixture(scope="module")
def small_vae(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("small"))
    make_tiny_vae(path, "cosmos_like")
    return CosmosVAE.from_pretrained(path)


@pytest.mark.parametrize("shape, message", [
    ((2, 16, 24, 3), "rank 5"),
    ((1, 1, 12, 24, 3), "H=12"),
    ((1, 1, 16, 20, 3), "W=20"),
    ((1, 0, 16, 24, 3), "empty"),
    ((1, 3, 1, 16, 24), "channels-first"),
    ((1, 1, 16, 24, 4), "4 channels"),
])
def test_bad_video_is_rejected(small_vae, shape, message):
    with pytest.raises(ValueError, match=message):
        small_vae.encode(np.zeros(shape, np.float32))


def test_bad_dtype_and_latents_are_rejected(small_vae):
    vae = small_vae
    with pytest.raises(ValueError, match="uint8.*prepare_video"):
        vae.encode(np.zeros((1, 1, 16, 16, 3), np.uint8))
    with pytest.raises(ValueError, match=r"\(B, T', h, w, 4\)"):
        vae.decode(np.zeros((1, 1, 2, 2, 16), np.float32))


def test_from_pretrained_finds_vae_subfolder(tmp_path):
    ref = make_tiny_vae(str(tmp_path / "pipeline" / "vae"), "cosmos_like")
    vae = CosmosVAE.from_pretrained(str(tmp_path / "pipeline"))
    video = random_video(2, 1, *CASES["cosmos_like"])  # a shape the parity test compiled
    assert_close(vae.encode(video), ref_mean(ref, video))


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        CosmosVAE.from_pretrained(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="vae/ subfolder"):
        CosmosVAE.from_pretrained(str(tmp_path))
    with pytest.raises(OSError, match="some-org/some-vae"):
        CosmosVAE.from_pretrained("some-org/some-vae")


def _corrupt(src: str, dst: str, edit) -> None:
    shutil.copytree(src, dst)
    weights = os.path.join(dst, "diffusion_pytorch_model.safetensors")
    tensors = load_file(weights)
    edit(tensors)
    save_file(tensors, weights)


def test_checkpoint_that_does_not_fit_is_named(tmp_path):
    src = str(tmp_path / "ok")
    make_tiny_vae(src, "cosmos_like")
    _corrupt(src, str(tmp_path / "missing"), lambda t: t.pop("encoder.conv_out.bias"))
    with pytest.raises(CheckpointError, match="encoder.conv_out.bias"):
        CosmosVAE.from_pretrained(str(tmp_path / "missing"))
    _corrupt(src, str(tmp_path / "extra"), lambda t: t.update({"encoder.extra.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match="encoder.extra.weight"):
        CosmosVAE.from_pretrained(str(tmp_path / "extra"))
    _corrupt(src, str(tmp_path / "shape"),
             lambda t: t.update({"quant_conv.weight": torch.zeros(8, 4, 1, 1, 1)}))
    with pytest.raises(CheckpointError, match="quant_conv.weight"):
        CosmosVAE.from_pretrained(str(tmp_path / "shape"))


def test_config_from_diffusers_json(tmp_path):
    make_tiny_vae(str(tmp_path), "three_stage")
    raw = json.load(open(tmp_path / "config.json"))
    cfg = WanVAEConfig.from_json_file(str(tmp_path))
    assert (cfg.base_dim, cfg.decoder_dim, cfg.z_dim, cfg.dim_mult) == (12, 8, 6, (1, 2, 3))
    assert cfg.latents_mean == tuple(raw["latents_mean"]) and len(cfg.latents_std) == 16
    assert (cfg.spatial_factor, cfg.latent_frames(9)) == (4, 5)
    assert WanVAEConfig() == WanVAEConfig.from_dict(WanVAEConfig().to_dict())
    assert WanVAEConfig().latent_frames(9) == 3 and WanVAEConfig().spatial_factor == 8


@pytest.mark.parametrize("field, value, message", [
    ("mystery_field", 1, "mystery_field"),
    ("attn_scales", [0.5], "attn_scales"),
    ("is_residual", True, "is_residual"),
    ("patch_size", 2, "patch_size"),
    ("_class_name", "AutoencoderKL", "AutoencoderKL"),
    ("temperal_downsample", [True, True, True], "at most 2"),
])
def test_config_rejects_what_it_cannot_represent(field, value, message):
    with pytest.raises(ConfigError, match=message):
        WanVAEConfig.from_dict({**WanVAEConfig().to_dict(), field: value})
