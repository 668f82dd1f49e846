"""Loading HuggingFace Gemma 3 directories: key layouts, shards, and checkpoints that don't fit."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import save_file

from theworld_jax.config import ConfigError
from theworld_jax.weights.gemma3_keys import Prefixes, checkpoint_prefixes, load_gemma3
from theworld_jax.weights.safetensors_io import CheckpointError
from tests.helpers.tiny_gemma import build_tiny_gemma3, layout_state_dict, save_tiny_gemma3, tiny_gemma3_config


def _params(model) -> dict[str, np.ndarray]:
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    return {".".join(map(str, path)): np.asarray(var.get_value()) for path, var in flat}


def _write(directory, tensors: dict[str, np.ndarray], config: transformers.PretrainedConfig) -> str:
    os.makedirs(directory, exist_ok=True)
    config.save_pretrained(directory)
    save_file(tensors, os.path.join(directory, "model.safetensors"))
    return str(directory)


@pytest.fixture(scope="module")
def hf():
    return build_tiny_gemma3(seed=2)


@pytest.fixture(scope="module")
def reference_params(hf, tmp_path_factory):
    directory = save_tiny_gemma3(hf, None, str(tmp_path_factory.mktemp("in_memory")), layout="in_memory")
    return _params(load_gemma3(directory)[1])


def test_in_memory_layout_holds_the_transformers_tensors(hf, reference_params):
    state = hf.state_dict()
    np.testing.assert_array_equal(reference_params["multi_modal_projector.projection"],
                                  state["model.multi_modal_projector.mm_input_projection_weight"].numpy())
    np.testing.assert_array_equal(reference_params["vision_tower.layers.0.self_attn.q_kernel"].reshape(32, 32).T,
                                  state["model.vision_tower.encoder.layers.0.self_attn.q_proj.weight"].numpy())
    np.testing.assert_array_equal(reference_params["language_model.embed_tokens.embedding"],
                                  state["model.language_model.embed_tokens.weight"].numpy())


@pytest.mark.parametrize("layout,shards", [("hub", 1), ("transformers5", 1), ("hub", 3), ("in_memory", 2)])
def test_layouts_load_identical_params(hf, reference_params, tmp_path, layout, shards):
    directory = save_tiny_gemma3(hf, None, str(tmp_path), layout=layout, shards=shards)
    if shards > 1:
        assert os.path.exists(os.path.join(directory, "model.safetensors.index.json"))
    params = _params(load_gemma3(directory)[1])
    assert params.keys() == reference_params.keys()
    for key, value in params.items():
        np.testing.assert_array_equal(value, reference_params[key], err_msg=key)


def test_save_pretrained_output_loads(hf, reference_params, tmp_path):
    hf.save_pretrained(tmp_path)  # whatever layout this transformers version writes
    params = _params(load_gemma3(str(tmp_path))[1])
    for key, value in params.items():
        np.testing.assert_array_equal(value, reference_params[key], err_msg=key)


@pytest.mark.parametrize("layout,expected", [
    ("hub", Prefixes("language_model.model.", "vision_tower.vision_model.", "multi_modal_projector.")),
    ("transformers5", Prefixes("language_model.model.", "vision_tower.", "multi_modal_projector.")),
    ("in_memory", Prefixes("model.language_model.", "model.vision_tower.", "model.multi_modal_projector.")),
])
def test_layout_is_read_off_the_keys(hf, layout, expected):
    assert checkpoint_prefixes(layout_state_dict(hf, layout)) == expected


@pytest.fixture(scope="module")
def text_only(tmp_path_factory):
    text_config = tiny_gemma3_config().text_config
    torch.manual_seed(0)
    hf = transformers.Gemma3ForCausalLM(text_config).float().eval()
    with torch.no_grad():
        for name, param in hf.named_parameters():
            if "norm" in name:
                param.normal_(0, 0.1)
        hf.model.embed_tokens.weight.normal_(0, 0.05)
    directory = tmp_path_factory.mktemp("text_only")
    hf.save_pretrained(directory)
    return hf, *load_gemma3(str(directory))


def test_text_only_causal_lm_checkpoint(text_only):
    hf, config, model = text_only
    assert config.vision is None and model.vision_tower is None
    ids = np.random.default_rng(0).integers(9, 280, (1, 20))
    with torch.no_grad():
        ref = hf(torch.from_numpy(ids)).logits.numpy()
    ours = np.asarray(nnx.jit(lambda m, x: m(x))(model, jnp.asarray(ids)))
    assert np.abs(ours - ref).max() <= 1e-5 * max(1.0, np.abs(ref).max())


def test_text_only_model_rejects_pixel_values(text_only):
    _, _, model = text_only
    with pytest.raises(ValueError, match="text-only Gemma 3"):
        model(jnp.asarray([[2, 9, 10]]), pixel_values=jnp.zeros((1, 3, 56, 56)))


def test_missing_tensor_is_named(hf, tmp_path):
    tensors = layout_state_dict(hf, "hub")
    del tensors["language_model.model.layers.1.mlp.down_proj.weight"]
    directory = _write(tmp_path, tensors, hf.config)
    with pytest.raises(CheckpointError, match=r"'language_model\.model\.layers\.1\.mlp\.down_proj\.weight'.*missing"):
        load_gemma3(directory)


def test_unexpected_tensor_is_named(hf, tmp_path):
    tensors = layout_state_dict(hf, "hub")
    tensors["vision_tower.vision_model.head.probe"] = np.zeros((1, 1, 32), np.float32)
    directory = _write(tmp_path, tensors, hf.config)
    with pytest.raises(CheckpointError, match=r"unexpected.*vision_tower\.vision_model\.head\.probe"):
        load_gemma3(directory)


@pytest.mark.parametrize("key,shape", [
    ("language_model.model.layers.0.self_attn.q_proj.weight", (48, 64)),
    ("multi_modal_projector.mm_input_projection_weight", (64, 32)),
    ("vision_tower.vision_model.embeddings.patch_embedding.weight", (32, 3, 16, 16)),
])
def test_misshaped_tensor_is_named(hf, tmp_path, key, shape):
    tensors = layout_state_dict(hf, "hub")
    tensors[key] = np.zeros(shape, np.float32)
    directory = _write(tmp_path, tensors, hf.config)
    with pytest.raises(CheckpointError, match=rf"{key.replace('.', '[.]')}.*{tuple(shape)}".replace("(", r"\(")
                       .replace(")", r"\)")):
        load_gemma3(directory)


@pytest.mark.parametrize("section", [None, "text_config", "vision_config"])
def test_unknown_config_field_is_named(hf, tmp_path, section):
    save_tiny_gemma3(hf, None, str(tmp_path))
    path = os.path.join(tmp_path, "config.json")
    with open(path) as f:
        raw = json.load(f)
    (raw if section is None else raw[section])["sliding_window_size_typo"] = 4
    with open(path, "w") as f:
        json.dump(raw, f)
    with pytest.raises(ConfigError, match="sliding_window_size_typo"):
        load_gemma3(str(tmp_path))


def test_directory_without_config_is_rejected(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_gemma3(str(tmp_path))
