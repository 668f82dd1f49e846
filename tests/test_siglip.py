"""SigLIP tower and multimodal projector against transformers on the same (tiny, random) weights."""

import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import save_file

from theworld_jax.config.gemma3 import Gemma3Config
from theworld_jax.modeling.mm_projector import Gemma3MultiModalProjector
from theworld_jax.modeling.siglip import SiglipVisionTower
from theworld_jax.weights.loader import load_params
from theworld_jax.weights.safetensors_io import CheckpointError, SafetensorsReader
from theworld_jax.weights.vision_keys import mm_projector_key_map, siglip_key_map
from tests.helpers.tiny_gemma import build_tiny_gemma3, tiny_gemma3_config


def _load(module_fn, key_map, state_dict, path):
    save_file({k: v.detach().numpy().copy() for k, v in state_dict.items()}, path)
    with SafetensorsReader([path]) as reader:
        return load_params(nnx.eval_shape(module_fn), key_map, reader)


def _close(ours, ref):
    ours, ref = np.asarray(ours, np.float64), ref.detach().double().numpy()
    assert ours.shape == ref.shape
    err = np.abs(ours - ref).max()
    assert err <= 1e-5 * max(1.0, np.abs(ref).max()), f"max |diff| {err:.3g}"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    # two layers and a 4x4 patch grid pooled 2x2: a transposed pool would show
    hf_config = tiny_gemma3_config(vision_config={"num_hidden_layers": 2})
    hf = build_tiny_gemma3(hf_config, seed=3)
    config = Gemma3Config.from_dict(hf_config.to_dict())
    d = tmp_path_factory.mktemp("siglip")
    tower = _load(lambda: SiglipVisionTower(config.vision, rngs=nnx.Rngs(0)), siglip_key_map(config.vision),
                  hf.model.vision_tower.state_dict(), os.path.join(d, "tower.safetensors"))
    projector = _load(lambda: Gemma3MultiModalProjector(config, rngs=nnx.Rngs(0)), mm_projector_key_map(),
                      hf.model.multi_modal_projector.state_dict(), os.path.join(d, "proj.safetensors"))
    pixels = np.random.default_rng(0).uniform(-1, 1, (2, 3, 56, 56)).astype(np.float32)
    return hf, config, tower, projector, pixels, d


def test_tower_matches_transformers(setup):
    hf, _, tower, _, pixels, _ = setup
    with torch.no_grad():
        ref = hf.model.vision_tower(pixel_values=torch.from_numpy(pixels)).last_hidden_state
    _close(tower(jnp.asarray(pixels)), ref)


def test_projector_matches_transformers(setup):
    hf, _, tower, projector, pixels, _ = setup
    with torch.no_grad():
        ref = hf.model.get_image_features(torch.from_numpy(pixels)).pooler_output
    assert ref.shape == (2, 4, 64)
    _close(projector(tower(jnp.asarray(pixels))), ref)


def test_pooling_is_row_major_over_patches(setup):
    _, _, _, projector, _, _ = setup
    grid = np.arange(16, dtype=np.float32).reshape(1, 16, 1)  # patch p holds p: row p // 4, column p % 4
    pooled = np.asarray(projector.pool(jnp.asarray(grid)))[0, :, 0]
    np.testing.assert_allclose(pooled, [2.5, 4.5, 10.5, 12.5])


@pytest.mark.parametrize("shape", [(2, 3, 64, 64), (2, 56, 56, 3), (3, 56, 56), (0, 3, 56, 56)])
def test_wrong_pixel_shape_is_rejected(setup, shape):
    _, _, tower, _, _, _ = setup
    with pytest.raises(ValueError, match=r"pixel_values must have shape \(num_images, 3, 56, 56\)"):
        tower(jnp.zeros(shape))


def test_misshaped_vision_tensor_names_the_key(setup):
    hf, config, _, _, _, d = setup
    state = dict(hf.model.vision_tower.state_dict())
    state["encoder.layers.1.self_attn.k_proj.weight"] = torch.zeros(32, 16)
    with pytest.raises(CheckpointError, match=r"encoder\.layers\.1\.self_attn\.k_proj\.weight.*\(32, 16\)"):
        _load(lambda: SiglipVisionTower(config.vision, rngs=nnx.Rngs(0)), siglip_key_map(config.vision),
              state, os.path.join(d, "bad.safetensors"))
