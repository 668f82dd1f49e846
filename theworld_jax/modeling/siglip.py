"""The SigLIP vision tower of Gemma 3 (transformers `SiglipVisionModel`, no pooling head).

pixel_values (B, C, S, S) -> patch embedding (a 'valid' conv with stride = kernel = patch, as an einsum
over non-overlapping patches) + learned position embedding -> pre-LN encoder blocks (MHA with biases,
no mask; tanh-GELU MLP) -> post_layernorm -> (B, P, D), P = (S / patch)**2 in row-major patch order.
LayerNorms and the attention softmax run in float32; everything else in the parameter dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from theworld_jax.attention import dot_product_attention
from theworld_jax.config.gemma3 import SiglipVisionConfig
from theworld_jax.jit import shared_call
from theworld_jax.modeling.partitioning import axes, param

_init = nnx.initializers.normal(0.02)


def _layer_norm(dim: int, eps: float, dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
    """torch.nn.LayerNorm over the last axis: statistics and normalisation in float32, the result in
    the input's dtype. scale, bias: (D,)."""
    return nnx.LayerNorm(dim, epsilon=eps, use_fast_variance=False, param_dtype=dtype, rngs=rngs,
                         scale_metadata=axes("norm"), bias_metadata=axes("norm"))


class SiglipAttention(nnx.Module):
    """Bidirectional multi-head attention with biases. q/k/v kernels (D, N, H), out kernel (N, H, D)."""

    def __init__(self, config: SiglipVisionConfig, *, dtype, rngs: nnx.Rngs):
        d, n, h = config.hidden_size, config.num_attention_heads, config.head_dim
        self.scale = h ** -0.5
        in_axes, bias_axes = ("vit_embed", "vit_heads", "head_dim"), ("vit_heads", "head_dim")
        self.q_kernel = param(_init(rngs.params(), (d, n, h), dtype), in_axes)
        self.k_kernel = param(_init(rngs.params(), (d, n, h), dtype), in_axes)
        self.v_kernel = param(_init(rngs.params(), (d, n, h), dtype), in_axes)
        self.q_bias = param(jnp.zeros((n, h), dtype), bias_axes)
        self.k_bias = param(jnp.zeros((n, h), dtype), bias_axes)
        self.v_bias = param(jnp.zeros((n, h), dtype), bias_axes)
        self.out_kernel = param(_init(rngs.params(), (n, h, d), dtype), ("vit_heads", "head_dim", "vit_embed"))
        self.out_bias = param(jnp.zeros((d,), dtype), ("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:
        """x (B, P, D) -> (B, P, D)."""
        q, k, v = (_project(x, w[...], b[...]) for w, b in ((self.q_kernel, self.q_bias), (self.k_kernel, self.k_bias),
                                                             (self.v_kernel, self.v_bias)))
        ctx = dot_product_attention(q, k, v, None, window=None, scale=self.scale)
        return jnp.einsum("BTNH,NHD->BTD", ctx, self.out_kernel[...]) + self.out_bias[...]


def _project(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    """x (B, T, D) @ kernel (D, N, H) + bias (N, H) -> (B, T, N, H), as a product with N * H columns and a
    vector bias: XLA:GPU adds a vector bias in the cuBLAS GEMM's epilogue, where an (N, H) bias was first
    broadcast to a whole (B, T, N, H) array (81 kernels and 0.75 GB per 896-pixel image)."""
    d, n, h = kernel.shape
    y = jnp.einsum("BTD,DF->BTF", x, kernel.reshape(d, n * h)) + bias.reshape(n * h)
    return y.reshape(*y.shape[:2], n, h)


class SiglipMLP(nnx.Module):
    """fc2(gelu_tanh(fc1 x)). fc1_kernel (D, F), fc2_kernel (F, D)."""

    def __init__(self, config: SiglipVisionConfig, *, dtype, rngs: nnx.Rngs):
        d, f = config.hidden_size, config.intermediate_size
        self.fc1_kernel = param(_init(rngs.params(), (d, f), dtype), ("vit_embed", "vit_mlp"))
        self.fc1_bias = param(jnp.zeros((f,), dtype), ("vit_mlp",))
        self.fc2_kernel = param(_init(rngs.params(), (f, d), dtype), ("vit_mlp", "vit_embed"))
        self.fc2_bias = param(jnp.zeros((d,), dtype), ("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:
        h = jnp.einsum("BTD,DF->BTF", x, self.fc1_kernel[...]) + self.fc1_bias[...]
        h = jax.nn.gelu(h, approximate=True)
        return jnp.einsum("BTF,FD->BTD", h, self.fc2_kernel[...]) + self.fc2_bias[...]


class SiglipEncoderLayer(nnx.Module):
    """x += attn(ln1 x); x += mlp(ln2 x)."""

    def __init__(self, config: SiglipVisionConfig, *, dtype, rngs: nnx.Rngs):
        eps = config.layer_norm_eps
        self.layer_norm1 = _layer_norm(config.hidden_size, eps, dtype, rngs)
        self.self_attn = SiglipAttention(config, dtype=dtype, rngs=rngs)
        self.layer_norm2 = _layer_norm(config.hidden_size, eps, dtype, rngs)
        self.mlp = SiglipMLP(config, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class SiglipVisionTower(nnx.Module):
    """pixel_values (B, C, S, S) -> last hidden state (B, P, D) after post_layernorm.

    patch_kernel (p, p, C, D): the conv kernel channels-last; position_embedding (P, D).
    """

    def __init__(self, config: SiglipVisionConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.dtype = dtype
        p, c, d = config.patch_size, config.num_channels, config.hidden_size
        self.patch_kernel = param(_init(rngs.params(), (p, p, c, d), dtype), ("patch", "patch", "patch", "vit_embed"))
        self.patch_bias = param(jnp.zeros((d,), dtype), ("norm",))
        self.position_embedding = param(_init(rngs.params(), (config.patches_per_side ** 2, d), dtype),
                                        ("positions", "vit_embed"))
        self.layers = nnx.List([SiglipEncoderLayer(config, dtype=dtype, rngs=rngs)
                                for _ in range(config.num_hidden_layers)])
        self.post_layernorm = _layer_norm(d, config.layer_norm_eps, dtype, rngs)

    def check_pixels(self, pixel_values) -> None:
        """Raise a ValueError unless pixel_values is (B, C, S, S) with this tower's C and S."""
        cfg = self.config
        expected = (cfg.num_channels, cfg.image_size, cfg.image_size)
        shape = tuple(getattr(pixel_values, "shape", ()))
        if len(shape) != 4 or shape[1:] != expected or shape[0] == 0:
            raise ValueError(
                f"pixel_values must have shape (num_images, {', '.join(map(str, expected))}) "
                f"(channels first, as the Gemma3Processor returns them), got {shape}")

    def embed_patches(self, pixel_values: jax.Array) -> jax.Array:
        """(B, C, S, S) -> (B, P, D): non-overlapping patch conv plus position embedding."""
        b, c, s, _ = pixel_values.shape
        p = self.config.patch_size
        n = s // p
        x = pixel_values.astype(self.dtype).reshape(b, c, n, p, n, p)
        patches = jnp.einsum("BCHiWj,ijCD->BHWD", x, self.patch_kernel[...]) + self.patch_bias[...]
        return patches.reshape(b, n * n, -1) + self.position_embedding[...]

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        self.check_pixels(pixel_values)
        x = self.embed_patches(pixel_values)
        for layer in self.layers:
            x = shared_call(layer, x)  # one traced program for the identical layers
        return self.post_layernorm(x)
