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

_init = nnx.initializers.normal(0.02)


class LayerNorm(nnx.Module):
    """torch.nn.LayerNorm over the last axis, computed in float32. scale, bias: (D,)."""

    def __init__(self, dim: int, eps: float, *, dtype, rngs: nnx.Rngs):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), dtype))
        self.bias = nnx.Param(jnp.zeros((dim,), dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        h = x.astype(jnp.float32)
        mean = h.mean(-1, keepdims=True)
        var = jnp.square(h - mean).mean(-1, keepdims=True)
        h = (h - mean) * jax.lax.rsqrt(var + self.eps)
        h = h * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return h.astype(x.dtype)


class SiglipAttention(nnx.Module):
    """Bidirectional multi-head attention with biases. q/k/v kernels (D, N, H), out kernel (N, H, D)."""

    def __init__(self, config: SiglipVisionConfig, *, dtype, rngs: nnx.Rngs):
        d, n, h = config.hidden_size, config.num_attention_heads, config.head_dim
        self.scale = h ** -0.5
        self.q_kernel = nnx.Param(_init(rngs.params(), (d, n, h), dtype))
        self.k_kernel = nnx.Param(_init(rngs.params(), (d, n, h), dtype))
        self.v_kernel = nnx.Param(_init(rngs.params(), (d, n, h), dtype))
        self.q_bias = nnx.Param(jnp.zeros((n, h), dtype))
        self.k_bias = nnx.Param(jnp.zeros((n, h), dtype))
        self.v_bias = nnx.Param(jnp.zeros((n, h), dtype))
        self.out_kernel = nnx.Param(_init(rngs.params(), (n, h, d), dtype))
        self.out_bias = nnx.Param(jnp.zeros((d,), dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        """x (B, P, D) -> (B, P, D)."""
        q = jnp.einsum("BTD,DNH->BTNH", x, self.q_kernel[...]) + self.q_bias[...]
        k = jnp.einsum("BSD,DNH->BSNH", x, self.k_kernel[...]) + self.k_bias[...]
        v = jnp.einsum("BSD,DNH->BSNH", x, self.v_kernel[...]) + self.v_bias[...]
        ctx = dot_product_attention(q, k, v, None, window=None, scale=self.scale)
        return jnp.einsum("BTNH,NHD->BTD", ctx, self.out_kernel[...]) + self.out_bias[...]


class SiglipMLP(nnx.Module):
    """fc2(gelu_tanh(fc1 x)). fc1_kernel (D, F), fc2_kernel (F, D)."""

    def __init__(self, config: SiglipVisionConfig, *, dtype, rngs: nnx.Rngs):
        d, f = config.hidden_size, config.intermediate_size
        self.fc1_kernel = nnx.Param(_init(rngs.params(), (d, f), dtype))
        self.fc1_bias = nnx.Param(jnp.zeros((f,), dtype))
        self.fc2_kernel = nnx.Param(_init(rngs.params(), (f, d), dtype))
        self.fc2_bias = nnx.Param(jnp.zeros((d,), dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        h = jnp.einsum("BTD,DF->BTF", x, self.fc1_kernel[...]) + self.fc1_bias[...]
        h = jax.nn.gelu(h, approximate=True)
        return jnp.einsum("BTF,FD->BTD", h, self.fc2_kernel[...]) + self.fc2_bias[...]


class SiglipEncoderLayer(nnx.Module):
    """x += attn(ln1 x); x += mlp(ln2 x)."""

    def __init__(self, config: SiglipVisionConfig, *, dtype, rngs: nnx.Rngs):
        eps = config.layer_norm_eps
        self.layer_norm1 = LayerNorm(config.hidden_size, eps, dtype=dtype, rngs=rngs)
        self.self_attn = SiglipAttention(config, dtype=dtype, rngs=rngs)
        self.layer_norm2 = LayerNorm(config.hidden_size, eps, dtype=dtype, rngs=rngs)
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
        self.patch_kernel = nnx.Param(_init(rngs.params(), (p, p, c, d), dtype))
        self.patch_bias = nnx.Param(jnp.zeros((d,), dtype))
        self.position_embedding = nnx.Param(_init(rngs.params(), (config.patches_per_side ** 2, d), dtype))
        self.layers = nnx.List([SiglipEncoderLayer(config, dtype=dtype, rngs=rngs)
                                for _ in range(config.num_hidden_layers)])
        self.post_layernorm = LayerNorm(d, config.layer_norm_eps, dtype=dtype, rngs=rngs)

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
            x = layer(x)
        return self.post_layernorm(x)
