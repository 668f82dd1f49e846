"""Key maps of Gemma 3's vision side against transformers: SiglipVisionModel and the projector.

HF linear weights are (out, in); ours are in the model's axis order: q/k/v (D, N, H), out (N, H, D),
fc1 (D, F), fc2 (F, D), patch conv (p, p, C, D). Keys are relative to the vision model
("encoder.layers.0.self_attn.q_proj.weight") or to the projector; the caller prefixes the layout's.
"""

from __future__ import annotations

from theworld_jax.config.gemma3 import SiglipVisionConfig
from theworld_jax.weights.loader import KeyMap, Row, reshaped, transposed


def siglip_key_map(config: SiglipVisionConfig) -> KeyMap:
    """(SiglipVisionTower param path, HF key relative to the vision model, load, export) rows."""
    d, n, h = config.hidden_size, config.num_attention_heads, config.head_dim
    qkv = reshaped((d, n, h), (n * h, d), t=True)
    qkv_bias = reshaped((n, h), (n * h,))
    out = reshaped((n, h, d), (d, n * h), t=True)
    t = transposed(1, 0)
    rows = [
        Row("patch_kernel", "embeddings.patch_embedding.weight", *transposed(2, 3, 1, 0)),
        Row("patch_bias", "embeddings.patch_embedding.bias"),
        Row("position_embedding", "embeddings.position_embedding.weight"),
        Row("post_layernorm.scale", "post_layernorm.weight"),
        Row("post_layernorm.bias", "post_layernorm.bias"),
    ]
    for i in range(config.num_hidden_layers):
        ours, theirs = f"layers.{i}.", f"encoder.layers.{i}."
        for ln in ("layer_norm1", "layer_norm2"):
            rows += [Row(f"{ours}{ln}.scale", f"{theirs}{ln}.weight"), Row(f"{ours}{ln}.bias", f"{theirs}{ln}.bias")]
        for name in ("q", "k", "v"):
            rows += [Row(f"{ours}self_attn.{name}_kernel", f"{theirs}self_attn.{name}_proj.weight", *qkv),
                     Row(f"{ours}self_attn.{name}_bias", f"{theirs}self_attn.{name}_proj.bias", *qkv_bias)]
        rows += [
            Row(f"{ours}self_attn.out_kernel", f"{theirs}self_attn.out_proj.weight", *out),
            Row(f"{ours}self_attn.out_bias", f"{theirs}self_attn.out_proj.bias"),
            Row(f"{ours}mlp.fc1_kernel", f"{theirs}mlp.fc1.weight", *t),
            Row(f"{ours}mlp.fc1_bias", f"{theirs}mlp.fc1.bias"),
            Row(f"{ours}mlp.fc2_kernel", f"{theirs}mlp.fc2.weight", *t),
            Row(f"{ours}mlp.fc2_bias", f"{theirs}mlp.fc2.bias"),
        ]
    return tuple(rows)


def mm_projector_key_map() -> KeyMap:
    """Gemma3MultiModalProjector rows; the projection is stored (in, out) in both layouts."""
    return (Row("norm_scale", "mm_soft_emb_norm.weight"), Row("projection", "mm_input_projection_weight"))
