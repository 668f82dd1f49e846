"""Export to the HuggingFace / diffusers layouts: what JAX writes, transformers and diffusers load.

A JAX model with perturbed parameters (so the export cannot pass by copying its source) is written with
`export_gemma3` / `CosmosVAE.save_pretrained`; the files are checked (keys, dtypes, layout), loaded with
transformers / diffusers, and their outputs compared with ours at the float32 parity tolerance.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import torch
import pytest
import transformers
from diffusers import AutoencoderKLWan
from flax import nnx
from safetensors import safe_open

from theworld_jax.cosmos_vae import CosmosVAE
from theworld_jax.weights.gemma3_keys import export_gemma3, load_gemma3
from tests.helpers.tiny_gemma import build_tiny_gemma3, layout_state_dict, save_tiny_gemma3
from tests.helpers.tiny_vae import make_tiny_vae

TOL = 1e-5


def _perturb(model: nnx.Module, seed: int = 0) -> nnx.Module:
    """`model` with 0.01 N(0, 1) added to every parameter in place (on the host: one compile per shape
    would be slow)."""
    rng = np.random.default_rng(seed)
    for _, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        value = np.asarray(var.get_value(), np.float32)
        var.set_value(jnp.asarray(value + 0.01 * rng.standard_normal(value.shape), var.get_value().dtype))
    return model


def _written(directory: str) -> dict[str, tuple[tuple[int, ...], str]]:
    out = {}
    for name in os.listdir(directory):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(directory, name), framework="numpy") as f:
                out.update({k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()})
    return out


def _close(ours, ref):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape
    err, bound = np.abs(ours - ref).max(), TOL * max(1.0, np.abs(ref).max())
    assert err <= bound, f"max |diff| {err:.3g} > {bound:.3g}"


@pytest.mark.slow
def test_gemma3_export_loads_in_transformers(tmp_path):
    hf = build_tiny_gemma3(seed=5)
    src = save_tiny_gemma3(hf, None, str(tmp_path / "src"), layout="in_memory")
    _, model = load_gemma3(src)
    model = _perturb(model)
    out = tmp_path / "exported"
    out.mkdir()
    export_gemma3(model, str(out), max_shard_bytes=200_000)  # small shards: the index is written and read

    with safe_open(os.path.join(src, "model.safetensors"), framework="numpy") as f:
        source_embedding = f.get_tensor("model.language_model.embed_tokens.weight")
    assert not np.array_equal(np.asarray(model.language_model.embed_tokens.embedding[...]), source_embedding)
    written = _written(str(out))
    expected = {k: (tuple(v.shape), "F32") for k, v in layout_state_dict(hf, "hub").items()}
    assert written == expected
    assert os.path.exists(out / "model.safetensors.index.json")

    loaded = transformers.Gemma3ForConditionalGeneration.from_pretrained(str(out)).float().eval()
    config = hf.config
    n = config.mm_tokens_per_image
    ids = np.array([[2, 17, 40, config.boi_token_index] + [config.image_token_index] * n
                    + [config.eoi_token_index, 55, 61, 9]], np.int64)
    types = (ids == config.image_token_index).astype(np.int64)
    pixels = np.random.default_rng(0).uniform(-1, 1, (1, 3, 56, 56)).astype(np.float32)
    with torch.no_grad():
        ref = loaded(input_ids=torch.from_numpy(ids), pixel_values=torch.from_numpy(pixels),
                     token_type_ids=torch.from_numpy(types)).logits.numpy()
    ours = nnx.jit(lambda m, i, p, t: m(i, pixel_values=p, token_type_ids=t))(
        model, jnp.asarray(ids, jnp.int32), jnp.asarray(pixels), jnp.asarray(types, jnp.int32))
    _close(ours, ref)

    _, again = load_gemma3(str(out))  # and back into JAX, bit for bit
    for a, b in zip(jax.tree.leaves(nnx.state(model, nnx.Param)), jax.tree.leaves(nnx.state(again, nnx.Param))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_gemma3_export_keeps_bfloat16(tmp_path):
    src = save_tiny_gemma3(build_tiny_gemma3(seed=1), None, str(tmp_path / "src"), layout="hub")
    _, model = load_gemma3(src, dtype=jnp.bfloat16)
    out = tmp_path / "exported"
    out.mkdir()
    export_gemma3(model, str(out))
    assert {dtype for _, dtype in _written(str(out)).values()} == {"BF16"}
    assert json.loads((out / "config.json").read_text())["architectures"] == ["Gemma3ForConditionalGeneration"]


@pytest.mark.slow
def test_cosmos_vae_export_loads_in_diffusers(tmp_path):
    make_tiny_vae(str(tmp_path / "src"), "cosmos_like")
    vae = _perturb(CosmosVAE.from_pretrained(str(tmp_path / "src")))
    vae.save_pretrained(str(tmp_path / "exported"))
    reference = dict(AutoencoderKLWan.from_pretrained(str(tmp_path / "src")).state_dict())
    written = _written(str(tmp_path / "exported"))
    assert written == {k: (tuple(v.shape), "F32") for k, v in reference.items()}

    loaded = AutoencoderKLWan.from_pretrained(str(tmp_path / "exported")).eval()
    video = np.random.default_rng(0).uniform(-1, 1, (1, 5, 16, 24, 3)).astype(np.float32)
    with torch.no_grad():
        ref = loaded.encode(torch.from_numpy(video.transpose(0, 4, 1, 2, 3))).latent_dist.mode()
    _close(vae.encode(video), ref.numpy().transpose(0, 2, 3, 4, 1))
    again = CosmosVAE.from_pretrained(str(tmp_path / "exported"))
    for a, b in zip(jax.tree.leaves(nnx.state(vae, nnx.Param)), jax.tree.leaves(nnx.state(again, nnx.Param))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
