"""Logical axes declared on every parameter, the rules table, and sharded TheWorld equal to unsharded
on 8 simulated CPU devices."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from jax.sharding import AbstractMesh, PartitionSpec

from theworld_jax.config.gemma3 import Gemma3Config
from theworld_jax.config.theworld import TheWorldConfig
from theworld_jax.config.wan_vae import WanVAEConfig
from theworld_jax.modeling.theworld import TheWorldModel
from theworld_jax.sharding import HIDDEN, MESH_AXES, make_mesh, param_specs, spec_for
from tests.helpers.tiny_gemma import tiny_gemma3_config

P = PartitionSpec


@pytest.fixture(scope="module")
def abstract_model():
    gemma = Gemma3Config.from_dict(tiny_gemma3_config(text_config={"num_key_value_heads": 2}).to_dict())
    vae = WanVAEConfig(base_dim=8, z_dim=4, dim_mult=(1, 2, 2, 2), num_res_blocks=1)
    config = TheWorldConfig(vae_image_size=(32, 32))
    return nnx.eval_shape(lambda: TheWorldModel.create(config, gemma, vae, dtype=jnp.float32, rngs=nnx.Rngs(0)))


# One parameter per logical axis, and its PartitionSpec on a (data 1, fsdp 4, tensor 2) mesh.
EXPECTED = {
    "gemma.language_model.embed_tokens.embedding": P("tensor", "fsdp"),  # vocab, embed
    "gemma.language_model.layers.0.self_attn.q_proj.kernel": P("fsdp", "tensor", None),  # heads, head_dim
    "gemma.language_model.layers.0.self_attn.k_proj.kernel": P("fsdp", "tensor", None),  # kv_heads
    "gemma.language_model.layers.0.mlp.gate_proj.kernel": P("fsdp", "tensor"),  # mlp
    "gemma.language_model.layers.0.mlp.down_proj.kernel": P("tensor", "fsdp"),
    "gemma.language_model.layers.0.input_layernorm.weight": P(None),  # norm
    "gemma.vision_tower.layers.0.self_attn.q_kernel": P("fsdp", "tensor", None),  # vit_embed, vit_heads
    "gemma.vision_tower.layers.0.mlp.fc1_kernel": P("fsdp", "tensor"),  # vit_mlp
    "gemma.vision_tower.patch_kernel": P(None, None, None, "fsdp"),  # patch
    "gemma.vision_tower.position_embedding": P(None, "fsdp"),  # positions
    "gemma.multi_modal_projector.projection": P("fsdp", None),  # vit_embed, embed (fsdp taken)
    "world_projector.layers.0.kernel": P(None, "fsdp"),  # world_in
    "vae.encoder.conv_in.kernel": P(None, None, None, None, None),  # vae
}


def test_one_parameter_per_logical_axis_has_its_spec(abstract_model):
    specs = param_specs(abstract_model, AbstractMesh((1, 4, 2), MESH_AXES))
    assert {path: specs[path] for path in EXPECTED} == EXPECTED


def test_activations_shard_batch_over_data_and_fsdp():
    mesh = AbstractMesh((2, 2, 2), MESH_AXES)
    assert spec_for((8, 5, 64), HIDDEN, mesh) == P(("data", "fsdp"), None, None)
    assert spec_for((3, 5, 64), HIDDEN, mesh) == P(None, None, None)  # undivisible: replicated


def test_undeclared_or_unknown_axes_are_errors():
    mesh = AbstractMesh((1, 4, 2), MESH_AXES)
    with pytest.raises(ValueError, match="'widgets' has no rule"):
        spec_for((4,), ("widgets",), mesh)
    with pytest.raises(ValueError, match="declares no logical axes"):
        param_specs(nnx.Linear(2, 3, rngs=nnx.Rngs(0)), mesh)


def test_mesh_sizes_are_checked():
    with pytest.raises(ValueError, match="at most one"):
        make_mesh(data=-1, fsdp=-1)
    with pytest.raises(ValueError, match="needs 4 devices"):
        make_mesh(data=2, fsdp=2, devices=jax.devices()[:1])


@pytest.mark.slow
def test_sharded_model_equals_unsharded_on_eight_devices():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    run = subprocess.run([sys.executable, "-m", "tests.scripts.sharded_equals_unsharded"], cwd=root, env=env,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0 and "OK" in run.stdout, run.stdout[-2000:] + run.stderr[-4000:]
