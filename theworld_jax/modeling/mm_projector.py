"""Gemma 3's multimodal projector: SigLIP patches -> image soft tokens in the text embedding space.

(B, P*P, Dv) patches in row-major order -> k x k average pooling on the P x P grid -> (B, T*T, Dv)
row-major -> Gemma RMSNorm (x * rsqrt(mean x^2 + eps) * (1 + w), float32, vision eps) -> x @ W with
W (Dv, Dt) -> (B, T*T, Dt), T*T = mm_tokens_per_image.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from theworld_jax.config.gemma3 import Gemma3Config


class Gemma3MultiModalProjector(nnx.Module):
    """norm_scale (Dv,) raw (applied as 1 + w); projection (Dv, Dt)."""

    def __init__(self, config: Gemma3Config, *, dtype=jnp.float32, rngs: nnx.Rngs):
        vision, text = config.vision, config.text
        self.patches_per_side = vision.patches_per_side
        self.kernel = config.pool_kernel
        self.eps = vision.layer_norm_eps
        self.norm_scale = nnx.Param(jnp.zeros((vision.hidden_size,), dtype))
        self.projection = nnx.Param(
            nnx.initializers.normal(0.02)(rngs.params(), (vision.hidden_size, text.hidden_size), dtype))

    def pool(self, x: jax.Array) -> jax.Array:
        """(B, P*P, Dv) -> (B, T*T, Dv): mean over each k x k block of the row-major P x P grid."""
        b, _, d = x.shape
        p, k = self.patches_per_side, self.kernel
        t = p // k
        grid = x.astype(jnp.float32).reshape(b, t, k, t, k, d)
        return grid.mean(axis=(2, 4)).reshape(b, t * t, d)

    def __call__(self, vision_outputs: jax.Array) -> jax.Array:
        """(B, P*P, Dv) -> (B, mm_tokens_per_image, Dt) in the vision dtype."""
        h = self.pool(vision_outputs)
        h = h * jax.lax.rsqrt(jnp.mean(jnp.square(h), axis=-1, keepdims=True) + self.eps)
        h = (h * (1.0 + self.norm_scale[...].astype(jnp.float32))).astype(vision_outputs.dtype)
        return jnp.einsum("BTV,VD->BTD", h, self.projection[...]).astype(vision_outputs.dtype)
