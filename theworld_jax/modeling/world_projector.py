"""World projector: VAE latents -> world tokens -> Gemma embeddings.

`latents_to_tokens` turns the posterior mean (B, T', H', W', z) into tokens; `WorldProjector` maps each
token to the LM's hidden size with upstream's `projection` Sequential: "mlp" is
Linear -> GELU -> Linear -> GELU (exact erf GELU, like torch.nn.GELU()), "mlp_no_final_gelu" drops the
last GELU, "linear" is one Linear.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from flax import nnx

from theworld_jax.config import ConfigError, ProjectionArchitecture, ProjectionMode
from theworld_jax.modeling.partitioning import axes

if TYPE_CHECKING:
    from theworld_jax.config.wan_vae import WanVAEConfig


def latent_grid(vae_image_size: tuple[int, int], spatial_factor: int) -> tuple[int, int]:
    """(H', W') of the VAE latents of an image resized to vae_image_size (height, width)."""
    h, w = vae_image_size
    if h % spatial_factor or w % spatial_factor:
        raise ConfigError(f"vae_image_size {tuple(vae_image_size)} is not a multiple of the VAE's spatial factor "
                          f"{spatial_factor}")
    return h // spatial_factor, w // spatial_factor


def projector_in_features(mode: str, z_dim: int, vae_image_size: tuple[int, int], spatial_factor: int) -> int:
    """Features per world token: z_dim (spatial mode) or H'*W' (channel mode)."""
    mode = ProjectionMode.parse(mode, "world_projection_mode")
    h, w = latent_grid(vae_image_size, spatial_factor)
    return z_dim if mode == ProjectionMode.SPATIAL else h * w


def num_world_tokens(mode: str, vae_config: WanVAEConfig, vae_image_size: tuple[int, int], frames: int = 1) -> int:
    """World tokens per sample for a clip of `frames` frames: T'*H'*W' (spatial) or T'*z_dim (channel)."""
    mode = ProjectionMode.parse(mode, "world_projection_mode")
    h, w = latent_grid(vae_image_size, vae_config.spatial_factor)
    per_frame = h * w if mode == ProjectionMode.SPATIAL else vae_config.z_dim
    return vae_config.latent_frames(frames) * per_frame


def latents_to_tokens(mean: jax.Array, mode: str) -> jax.Array:
    """(B, T', H', W', z) latents -> (B, N, F) tokens, frames concatenated in time order.

    spatial: H'*W' tokens of z per frame, row-major (h, w) -> N = T'*H'*W', F = z.
    channel: z tokens of H'*W' row-major features per frame -> N = T'*z, F = H'*W'.
    """
    if mean.ndim != 5:
        raise ValueError(f"latents must be (B, T', H', W', z), got shape {tuple(mean.shape)}")
    mode = ProjectionMode.parse(mode, "world_projection_mode")
    b, t, h, w, z = mean.shape
    if mode == ProjectionMode.SPATIAL:
        return mean.reshape(b, t * h * w, z)
    return jnp.einsum("BTHWZ->BTZHW", mean).reshape(b, t * z, h * w)


def _torch_linear_init(fan_in: int):
    """torch.nn.Linear's default: weight and bias ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = fan_in ** -0.5

    def init(key, shape, dtype):
        return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)

    return init


def _linear(in_features: int, out_features: int, in_axis: str, *, dtype, param_dtype, rngs: nnx.Rngs) -> nnx.Linear:
    """y = x @ kernel + bias, kernel (in, out) (torch's weight transposed), torch's default init;
    `in_axis` is the kernel's input logical axis."""
    init = _torch_linear_init(in_features)
    return nnx.Linear(in_features, out_features, kernel_init=init, bias_init=init, dtype=dtype,
                      param_dtype=param_dtype, rngs=rngs, kernel_metadata=axes(in_axis, "embed"),
                      bias_metadata=axes("embed"))


def _gelu(x: jax.Array) -> jax.Array:
    """Exact (erf) GELU computed in float32, as torch does for bf16 inputs."""
    return jax.nn.gelu(x.astype(jnp.float32), approximate=False).astype(x.dtype)


class WorldProjector(nnx.Module):
    """(B, N, in_features) world tokens -> (B, N, out_features) embeddings.

    Parameters: layers.0.{kernel (in, out), bias}, and for the mlp architectures layers.1 (out, out),
    which are upstream's projection.0 and projection.2.
    """

    def __init__(self, in_features: int, out_features: int, architecture: str = ProjectionArchitecture.MLP, *,
                 dtype=jnp.float32, param_dtype=None, rngs: nnx.Rngs):
        architecture = ProjectionArchitecture.parse(architecture, "projection_architecture")
        param_dtype = dtype if param_dtype is None else param_dtype
        self.in_features = in_features
        self.out_features = out_features
        self.architecture = architecture
        dims = [(in_features, out_features, "world_in")]
        if architecture != ProjectionArchitecture.LINEAR:
            dims.append((out_features, out_features, "embed"))
        self.layers = nnx.List([_linear(i, o, axis, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                                for i, o, axis in dims])

    def __call__(self, tokens: jax.Array) -> jax.Array:
        if tokens.shape[-1] != self.in_features:
            raise ValueError(f"world tokens have {tokens.shape[-1]} features, the projector expects "
                             f"{self.in_features} (shape {tuple(tokens.shape)})")
        x = self.layers[0](tokens)
        if self.architecture == ProjectionArchitecture.LINEAR:
            return x
        x = self.layers[1](_gelu(x))
        return _gelu(x) if self.architecture == ProjectionArchitecture.MLP else x
