"""The released configs at full size, abstractly (jax.eval_shape: no weights, seconds): gemma-3-4b-it
and the Cosmos VAE have transformers' / diffusers' parameter counts and shapes, their key maps name the
hub's tensor shapes, and every parameter places on a mesh."""

import math

import jax.numpy as jnp
import pytest
import transformers
from flax import nnx
from jax._src.interpreters import partial_eval
from jax.sharding import AbstractMesh, PartitionSpec

from tests.helpers.full_size import COSMOS_VAE_PARAMS, GEMMA3_4B_CONFIG, GEMMA3_4B_PARAMS
from theworld_jax.config.gemma3 import Gemma3Config
from theworld_jax.config.theworld import TheWorldConfig
from theworld_jax.config.wan_vae import WanVAEConfig
from theworld_jax.modeling.theworld import TheWorldModel
from theworld_jax.sharding import MESH_AXES, param_specs
from theworld_jax.weights.gemma3_keys import gemma3_key_map, hf_config_dict
from theworld_jax.weights.loader import abstract_params, checkpoint_shape
from theworld_jax.weights.wan_vae_keys import wan_vae_key_map


@pytest.fixture(scope="module")
def full():  # about 3 s on one core
    gemma = Gemma3Config.from_dict(transformers.Gemma3Config(**GEMMA3_4B_CONFIG).to_dict())
    config = TheWorldConfig(vae_image_size=(512, 512))
    with pytest.MonkeyPatch.context() as patch:
        # Every key an nnx.Rngs draws under tracing makes flax ask a tracer for its sharding; JAX answers with
        # an AttributeError whose message walks the whole trace so far: quadratic (20 s for this model, 136 s
        # on a loaded CI machine). Only that message text is dropped here; shapes and dtypes are untouched.
        patch.setattr(partial_eval.DynamicJaxprTracer, "_origin_msg", lambda self: "", raising=False)
        model = nnx.eval_shape(lambda: TheWorldModel.create(config, gemma, WanVAEConfig(), dtype=jnp.bfloat16,
                                                            rngs=nnx.Rngs(0)))
    return gemma, model, abstract_params(model)


def _count(params, prefix: str) -> int:
    return sum(math.prod(p.shape) for path, p in params.items() if path.startswith(prefix))


def test_parameter_counts(full):
    _, _, params = full
    for part, n in GEMMA3_4B_PARAMS.items():
        assert _count(params, f"gemma.{part}.") == n, part
    for part, n in COSMOS_VAE_PARAMS.items():
        assert _count(params, f"vae.{part}.") == n, part
    assert _count(params, "world_projector.") == 16 * 2560 + 2560 + 2560 * 2560 + 2560  # spatial mode, mlp
    assert {p.dtype for p in params.values()} == {jnp.dtype(jnp.bfloat16)}


def test_shapes(full):
    _, _, params = full
    expected = {
        "gemma.language_model.embed_tokens.embedding": (262208, 2560),
        "gemma.language_model.layers.33.self_attn.q_proj.kernel": (2560, 8, 256),
        "gemma.language_model.layers.33.self_attn.k_proj.kernel": (2560, 4, 256),
        "gemma.language_model.layers.33.self_attn.o_proj.kernel": (8, 256, 2560),
        "gemma.language_model.layers.33.mlp.down_proj.kernel": (10240, 2560),
        "gemma.vision_tower.patch_kernel": (14, 14, 3, 1152),
        "gemma.vision_tower.position_embedding": (4096, 1152),
        "gemma.vision_tower.layers.26.self_attn.q_kernel": (1152, 16, 72),
        "gemma.multi_modal_projector.projection": (1152, 2560),
        "vae.encoder.conv_in.kernel": (3, 3, 3, 3, 96),
        "vae.encoder.mid_block.attentions.0.to_qkv.kernel": (384, 1152),
        "vae.quant_conv.kernel": (1, 1, 1, 32, 32),
        "world_projector.layers.0.kernel": (16, 2560),
    }
    assert {k: tuple(params[k].shape) for k in expected} == expected


def test_key_maps_name_the_hub_shapes(full):
    gemma, model, _ = full
    rows = gemma3_key_map(gemma)
    assert len(rows) == 883  # transformers' state_dict without the tied lm_head
    gemma_params = abstract_params(model.gemma)
    by_key = {r.key: checkpoint_shape(r, gemma_params[r.path]) for r in rows}
    assert by_key["language_model.model.layers.0.self_attn.q_proj.weight"] == (2048, 2560)
    assert by_key["language_model.model.layers.0.self_attn.o_proj.weight"] == (2560, 2048)
    assert by_key["vision_tower.vision_model.embeddings.patch_embedding.weight"] == (1152, 3, 14, 14)
    vae_params = abstract_params(model.vae)
    vae = {r.key: checkpoint_shape(r, vae_params[r.path]) for r in wan_vae_key_map(model.vae)}
    assert len([k for k in vae if k.startswith(("encoder.", "quant_conv."))]) == 86
    assert vae["encoder.mid_block.attentions.0.norm.gamma"] == (384, 1, 1)
    assert vae["encoder.norm_out.gamma"] == (384, 1, 1, 1)
    assert vae["encoder.mid_block.attentions.0.to_qkv.weight"] == (1152, 384, 1, 1)
    assert vae["encoder.down_blocks.5.time_conv.weight"] == (192, 192, 3, 1, 1)
    assert Gemma3Config.from_dict(hf_config_dict(gemma)) == gemma  # the exported config.json reads back


def test_every_parameter_places_on_a_mesh(full):
    _, model, _ = full
    specs = param_specs(model, AbstractMesh((2, 8, 4), MESH_AXES))
    assert specs["gemma.language_model.embed_tokens.embedding"] == PartitionSpec("tensor", "fsdp")
    assert specs["gemma.language_model.layers.0.self_attn.k_proj.kernel"] == PartitionSpec("fsdp", "tensor", None)
