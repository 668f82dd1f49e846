"""Gemma 3's multimodal projector: SigLIP patches -> image soft tokens in the text embedding space.

(B, P*P, Dv) patches in row-major order -> k x k average pooling on the P x P grid -> (B, T*T, Dv)
row-major -> Gemma RMSNorm (layers.rms_norm, float32, vision eps) -> x @ W with
W (Dv, Dt) -> (B, T*T, Dt), T*T = mm_tokens_per_image.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from theworld_jax.config.gemma3 import Gemma3Config
from theworld_jax.modeling.layers import rms_norm
from theworld_jax.modeling.partitioning import param


class Gemma3MultiModalProjector(nnx.Module):
    """norm_scale (Dv,) the raw Gemma RMSNorm weight; projection (Dv, Dt)."""

    def __init__(self, config: Gemma3Config, *, dtype=jnp.float32, rngs: nnx.Rngs):
        vision, text = config.vision, config.text
        self.patches_per_side = vision.patches_per_side
        self.kernel = config.pool_kernel
        self.eps = vision.layer_norm_eps
        self.norm_scale = param(jnp.zeros((vision.hidden_size,), dtype), ("norm",))
        self.projection = param(
            nnx.initializers.normal(0.02)(rngs.params(), (vision.hidden_size, text.hidden_size), dtype),
            ("vit_embed", "embed"))

    def pool(self, x: jax.Array) -> jax.Array:
        """(B, P*P, Dv) -> (B, T*T, Dv): mean over each k x k block of the row-major P x P grid."""
        b, _, d = x.shape
        p, k = self.patches_per_side, self.kernel
        t = p // k
        grid = x.astype(jnp.float32).reshape(b, t, k, t, k, d)
        return grid.mean(axis=(2, 4)).reshape(b, t * t, d)

    def __call__(self, vision_outputs: jax.Array) -> jax.Array:
        """(B, P*P, Dv) -> (B, mm_tokens_per_image, Dt) in the vision dtype."""
        h = rms_norm(self.pool(vision_outputs), self.norm_scale[...], self.eps).astype(vision_outputs.dtype)
        return jnp.einsum("BTV,VD->BTD", h, self.projection[...]).astype(vision_outputs.dtype)
