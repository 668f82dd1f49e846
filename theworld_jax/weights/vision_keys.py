"""Key maps of Gemma 3's vision side: HF SiglipVisionModel -> SiglipVisionTower, and the projector.

HF linear weights are (out, in); ours are in the model's axis order: q/k/v (D, N, H), out (N, H, D),
fc1 (D, F), fc2 (F, D), patch conv (p, p, C, D). Keys are relative to the vision model
("encoder.layers.0.self_attn.q_proj.weight"); `key_prefix` prepends a checkpoint prefix.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from theworld_jax.config.gemma3 import SiglipVisionConfig
from theworld_jax.weights.loader import Source


def _when_shaped(shape: tuple[int, ...], fn: Callable[[np.ndarray], np.ndarray]) -> Callable:
    """Apply `fn` only to a tensor of `shape`; pass anything else through for the loader's shape error."""
    def transform(x: np.ndarray) -> np.ndarray:
        return fn(x) if tuple(x.shape) == shape else x
    return transform


def siglip_key_map(config: SiglipVisionConfig, prefix: str = "", key_prefix: str = "") -> dict[str, Source]:
    """{SiglipVisionTower param path: Source} with HF keys relative to the vision model."""
    d, n, h = config.hidden_size, config.num_attention_heads, config.head_dim
    p, c, f = config.patch_size, config.num_channels, config.intermediate_size
    to_dnh = _when_shaped((n * h, d), lambda w: w.T.reshape(d, n, h))
    to_nh = _when_shaped((n * h,), lambda b: b.reshape(n, h))
    to_nhd = _when_shaped((d, n * h), lambda w: w.T.reshape(n, h, d))
    km = {
        "patch_kernel": Source.of("embeddings.patch_embedding.weight",
                                  _when_shaped((d, c, p, p), lambda w: w.transpose(2, 3, 1, 0))),
        "patch_bias": Source.of("embeddings.patch_embedding.bias"),
        "position_embedding": Source.of("embeddings.position_embedding.weight"),
        "post_layernorm.scale": Source.of("post_layernorm.weight"),
        "post_layernorm.bias": Source.of("post_layernorm.bias"),
    }
    for i in range(config.num_hidden_layers):
        src, dst = f"encoder.layers.{i}.", f"layers.{i}."
        for ln in ("layer_norm1", "layer_norm2"):
            km[f"{dst}{ln}.scale"] = Source.of(f"{src}{ln}.weight")
            km[f"{dst}{ln}.bias"] = Source.of(f"{src}{ln}.bias")
        for name in ("q", "k", "v"):
            km[f"{dst}self_attn.{name}_kernel"] = Source.of(f"{src}self_attn.{name}_proj.weight", to_dnh)
            km[f"{dst}self_attn.{name}_bias"] = Source.of(f"{src}self_attn.{name}_proj.bias", to_nh)
        km[f"{dst}self_attn.out_kernel"] = Source.of(f"{src}self_attn.out_proj.weight", to_nhd)
        km[f"{dst}self_attn.out_bias"] = Source.of(f"{src}self_attn.out_proj.bias")
        km[f"{dst}mlp.fc1_kernel"] = Source.of(f"{src}mlp.fc1.weight", _when_shaped((f, d), np.transpose))
        km[f"{dst}mlp.fc1_bias"] = Source.of(f"{src}mlp.fc1.bias")
        km[f"{dst}mlp.fc2_kernel"] = Source.of(f"{src}mlp.fc2.weight", _when_shaped((d, f), np.transpose))
        km[f"{dst}mlp.fc2_bias"] = Source.of(f"{src}mlp.fc2.bias")
    return {prefix + path: Source(tuple(key_prefix + k for k in s.keys), s.transform) for path, s in km.items()}


def projector_key_map(prefix: str = "", key_prefix: str = "") -> dict[str, Source]:
    """{Gemma3MultiModalProjector param path: Source}; the projection is stored (in, out) in both."""
    km = {"norm_scale": Source.of("mm_soft_emb_norm.weight"),
          "projection": Source.of("mm_input_projection_weight")}
    return {prefix + path: Source(tuple(key_prefix + k for k in s.keys), s.transform) for path, s in km.items()}
