"""World projector: forward against torch.nn.Sequential, token order against torch reshapes, init,
and the upstream key map (load from a torch state dict, export back, mismatch errors)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import save_file

from theworld_jax.config import ConfigError
from theworld_jax.config.theworld import TheWorldConfig
from theworld_jax.config.wan_vae import WanVAEConfig
from theworld_jax.modeling.world_projector import (WorldProjector, latents_to_tokens, num_world_tokens,
                                                   projector_in_features)
from theworld_jax.weights.safetensors_io import CheckpointError, SafetensorsReader
from theworld_jax.weights.world_projector_keys import (EXPORT_PREFIX, export_world_projector,
                                                       find_projector_prefix, load_upstream_projector)

ARCHS = ("mlp", "mlp_no_final_gelu", "linear")
IN, OUT = 16, 24


def torch_sequential(arch, in_features, out_features, seed=0):
    """Upstream's `projection` module, float32, with torch's default Linear init."""
    torch.manual_seed(seed)
    layers = [torch.nn.Linear(in_features, out_features)]
    if arch != "linear":
        layers += [torch.nn.GELU(), torch.nn.Linear(out_features, out_features)]
    if arch == "mlp":
        layers.append(torch.nn.GELU())
    return torch.nn.Sequential(*layers).eval()


def copy_into_torch(projector, seq):
    linears = [m for m in seq if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        for layer, linear in zip(projector.layers, linears):
            linear.weight.copy_(torch.from_numpy(np.asarray(layer.kernel[...], np.float32).T.copy()))
            linear.bias.copy_(torch.from_numpy(np.array(layer.bias[...], np.float32)))


def tokens(shape=(2, 5, IN), seed=3):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32) * 2


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_matches_torch_sequential(arch):
    projector = WorldProjector(IN, OUT, arch, rngs=nnx.Rngs(1))
    seq = torch_sequential(arch, IN, OUT)
    copy_into_torch(projector, seq)
    x = tokens()
    with torch.no_grad():
        ref = seq(torch.from_numpy(x)).numpy()
    got = np.asarray(projector(jnp.asarray(x)))
    assert got.shape == (2, 5, OUT)
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)


def test_bf16_forward_close_to_float32_torch():
    projector = WorldProjector(IN, OUT, "mlp", dtype=jnp.bfloat16, rngs=nnx.Rngs(1))
    assert projector.layers[0].kernel[...].dtype == jnp.bfloat16
    seq = torch_sequential("mlp", IN, OUT)
    copy_into_torch(projector, seq)
    x = tokens()
    with torch.no_grad():
        ref = seq(torch.from_numpy(x)).numpy()
    got = np.asarray(projector(jnp.asarray(x)), np.float32)
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) <= 2e-2


def test_gelu_is_exact_erf():
    projector = WorldProjector(1, 1, "linear", rngs=nnx.Rngs(0))
    projector.layers[0].kernel.set_value(jnp.ones((1, 1)))
    projector.layers[0].bias.set_value(jnp.zeros((1,)))
    mlp = WorldProjector(1, 1, "mlp", rngs=nnx.Rngs(0))
    for layer in mlp.layers:
        layer.kernel.set_value(jnp.ones((1, 1)))
        layer.bias.set_value(jnp.zeros((1,)))
    x = torch.tensor([[[-1.5], [0.7]]])
    gelu = torch.nn.GELU()
    np.testing.assert_allclose(np.asarray(mlp(jnp.asarray(x.numpy()))), gelu(gelu(x)).numpy(), atol=1e-7)


@pytest.mark.parametrize("frames", [1, 2])
def test_latents_to_tokens_matches_torch_reshapes(frames):
    b, z, h, w = 2, 4, 3, 5
    torch_latents = torch.randn(b, z, frames, h, w, generator=torch.Generator().manual_seed(0))
    ours = jnp.asarray(torch_latents.permute(0, 2, 3, 4, 1).numpy())  # (B, T', H', W', z)
    spatial = torch_latents.permute(0, 2, 3, 4, 1).reshape(b, frames * h * w, z)
    channel = torch_latents.permute(0, 2, 1, 3, 4).reshape(b, frames * z, h * w)
    if frames == 1:  # upstream's own code, on (B, z, H, W)
        four_d = torch_latents[:, :, 0]
        np.testing.assert_array_equal(spatial.numpy(), four_d.permute(0, 2, 3, 1).reshape(b, h * w, z).numpy())
        np.testing.assert_array_equal(channel.numpy(), four_d.reshape(b, z, h * w).numpy())
    np.testing.assert_array_equal(np.asarray(latents_to_tokens(ours, "spatial")), spatial.numpy())
    np.testing.assert_array_equal(np.asarray(latents_to_tokens(ours, "channel")), channel.numpy())


def test_latents_to_tokens_rejects_bad_input():
    with pytest.raises(ValueError, match="world_projection_mode='pixel'"):
        latents_to_tokens(jnp.zeros((1, 1, 2, 2, 4)), "pixel")
    with pytest.raises(ValueError, match=r"\(B, T', H', W', z\)"):
        latents_to_tokens(jnp.zeros((1, 2, 2, 4)), "spatial")


def test_init_is_torch_linear_default():
    projector = WorldProjector(256, 512, "mlp", rngs=nnx.Rngs(0))
    for layer, fan_in in zip(projector.layers, (256, 512)):
        bound = fan_in ** -0.5
        kernel = np.asarray(layer.kernel[...])
        bias = np.asarray(layer.bias[...])
        assert np.abs(kernel).max() <= bound and np.abs(bias).max() <= bound
        assert np.abs(kernel).max() > 0.99 * bound
        assert abs(kernel.mean()) < 0.01 * bound
        np.testing.assert_allclose(kernel.std(), bound / np.sqrt(3), rtol=0.01)
        np.testing.assert_allclose(bias.std(), bound / np.sqrt(3), rtol=0.15)


def test_init_depends_on_seed_only():
    a, b, c = (WorldProjector(8, 8, "mlp", rngs=nnx.Rngs(s)) for s in (0, 0, 1))
    np.testing.assert_array_equal(np.asarray(a.layers[1].kernel[...]), np.asarray(b.layers[1].kernel[...]))
    assert not np.array_equal(np.asarray(a.layers[1].kernel[...]), np.asarray(c.layers[1].kernel[...]))
    assert not np.array_equal(np.asarray(a.layers[0].kernel[...]), np.asarray(a.layers[1].kernel[...]))


def test_unknown_architecture_and_feature_count():
    with pytest.raises(ValueError, match="projection_architecture='conv'"):
        WorldProjector(4, 4, "conv", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="projector expects 4"):
        WorldProjector(4, 4, "linear", rngs=nnx.Rngs(0))(jnp.zeros((1, 2, 5)))


# ---------------------------------------------------------------- key map

Z_DIM, FACTOR, HIDDEN = IN, 8, OUT  # spatial mode: in_features = z_dim


def upstream_checkpoint(tmp_path, arch, in_features=IN, prefix=EXPORT_PREFIX, name="ckpt"):
    """A safetensors file like upstream's: trainable params, the projector among them."""
    seq = torch_sequential(arch, in_features, HIDDEN, seed=5)
    tensors = {f"{prefix}projection.{k}": v.numpy() for k, v in seq.state_dict().items()}
    tensors["gemma.model.language_model.norm.weight"] = np.ones(3, np.float32)  # unfrozen LM params
    path = tmp_path / name
    path.mkdir()
    save_file(tensors, str(path / "model.safetensors"))
    return seq, str(path), tensors


def abstract_projector(config, dtype=jnp.float32):
    in_features = projector_in_features(config.world_projection_mode, Z_DIM, config.vae_image_size, FACTOR)
    return nnx.eval_shape(lambda: WorldProjector(in_features, HIDDEN, config.projection_architecture,
                                                 dtype=dtype, rngs=nnx.Rngs(0)))


def load(directory, config):
    return load_upstream_projector(abstract_projector(config), directory, config)


@pytest.mark.parametrize("arch", ARCHS)
def test_load_export_load_round_trip(tmp_path, arch):
    seq, path, tensors = upstream_checkpoint(tmp_path, arch)
    projector = load(path, TheWorldConfig(projection_architecture=arch))
    x = tokens()
    with torch.no_grad():
        np.testing.assert_allclose(np.asarray(projector(jnp.asarray(x))), seq(torch.from_numpy(x)).numpy(),
                                   atol=1e-5, rtol=0)
    exported = export_world_projector(projector)
    assert set(exported) == {k for k in tensors if "world_projector" in k}
    for key, value in exported.items():
        np.testing.assert_array_equal(value, tensors[key])
    (tmp_path / "exported").mkdir()
    save_file(exported, str(tmp_path / "exported" / "model.safetensors"))
    again = load(str(tmp_path / "exported"), TheWorldConfig(projection_architecture=arch))
    for a, b in zip(jax.tree.leaves(nnx.state(projector)), jax.tree.leaves(nnx.state(again))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_load_accepts_any_prefix_and_bf16(tmp_path):
    _, path, _ = upstream_checkpoint(tmp_path, "mlp", prefix="model.world_projector.")
    with SafetensorsReader([f"{path}/model.safetensors"]) as reader:
        projector = load_upstream_projector(abstract_projector(TheWorldConfig(), jnp.bfloat16), reader)
    assert projector.layers[1].kernel[...].dtype == jnp.bfloat16
    assert export_world_projector(projector)[EXPORT_PREFIX + "projection.2.weight"].shape == (HIDDEN, HIDDEN)


def test_several_prefixes_are_an_error():
    keys = ["a.world_projector.projection.0.weight", "b.world_projector.projection.0.weight"]
    with pytest.raises(CheckpointError, match="several prefixes"):
        find_projector_prefix(keys)
    with pytest.raises(CheckpointError, match="no world projector tensors"):
        find_projector_prefix(["model.norm.weight"])


def test_mlp_config_on_linear_checkpoint(tmp_path):
    _, path, _ = upstream_checkpoint(tmp_path, "linear")
    with pytest.raises(CheckpointError, match=r"projection\.2\.weight' is missing: projection_architecture='mlp'"):
        load(path, TheWorldConfig(projection_architecture="mlp"))


def test_linear_config_on_mlp_checkpoint(tmp_path):
    _, path, _ = upstream_checkpoint(tmp_path, "mlp")
    with pytest.raises(CheckpointError, match=r"projection\.2\.\* does not fit projection_architecture='linear'"):
        load(path, TheWorldConfig(projection_architecture="linear"))


def test_wrong_mode_names_the_expected_in_features(tmp_path):
    _, path, _ = upstream_checkpoint(tmp_path, "mlp")  # trained in spatial mode: in_features = z_dim
    config = TheWorldConfig(world_projection_mode="channel", vae_image_size=(32, 40))
    with pytest.raises(CheckpointError, match=r"projection\.0\.weight' has shape \(24, 16\), the config expects "
                                              r"\(24, 20\).*world_projection_mode='channel'.*\(32, 40\)"):
        load(path, config)


def test_channel_mode_loads_with_matching_grid(tmp_path):
    _, path, _ = upstream_checkpoint(tmp_path, "linear", in_features=4 * 5)
    config = TheWorldConfig(world_projection_mode="channel", projection_architecture="linear",
                            vae_image_size=(32, 40))
    assert load(path, config).in_features == 20


def test_world_token_counts():
    vae = WanVAEConfig()
    assert projector_in_features("spatial", 16, (512, 512), 8) == 16
    assert projector_in_features("channel", 16, (256, 512), 8) == 32 * 64
    assert num_world_tokens("spatial", vae, (512, 512)) == 64 * 64
    assert num_world_tokens("spatial", vae, (512, 512), frames=5) == 2 * 64 * 64
    assert num_world_tokens("channel", vae, (256, 512), frames=5) == 2 * 16
    with pytest.raises(ConfigError, match=r"vae_image_size \(100, 512\) is not a multiple of the VAE's spatial"):
        projector_in_features("spatial", 16, (100, 512), 8)
    with pytest.raises(ValueError, match="world_projection_mode='pixel'"):
        num_world_tokens("pixel", vae, (512, 512))
