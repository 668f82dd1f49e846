"""Key map of `Gemma3TextDecoder` against transformers' Gemma 3 language model, both directions.

Keys are relative to the language model (`embed_tokens.weight`, `layers.{i}.self_attn.q_proj.weight`,
`norm.weight`, ...); the caller prefixes the checkpoint layout's. torch Linear weights are (out, in):
they are transposed and reshaped into the decoder's einsum shapes, and back for export.
"""

from __future__ import annotations

from theworld_jax.config.gemma3 import Gemma3TextConfig
from theworld_jax.weights.loader import KeyMap, Row, reshaped, transposed

_NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")


def text_key_map(config: Gemma3TextConfig) -> KeyMap:
    """(decoder param path, HF key relative to the language model, load, export) for every parameter."""
    d, n, kv, h = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
    q = reshaped((d, n, h), (n * h, d), t=True)  # torch (N*H, D) <-> (D, N, H)
    k = reshaped((d, kv, h), (kv * h, d), t=True)
    o = reshaped((n, h, d), (d, n * h), t=True)  # torch (D, N*H) <-> (N, H, D)
    t = transposed(1, 0)
    rows = [Row("embed_tokens.embedding", "embed_tokens.weight"), Row("norm.weight", "norm.weight")]
    for i in range(config.num_hidden_layers):
        p = f"layers.{i}."
        rows += [
            Row(p + "self_attn.q_proj.kernel", p + "self_attn.q_proj.weight", *q),
            Row(p + "self_attn.k_proj.kernel", p + "self_attn.k_proj.weight", *k),
            Row(p + "self_attn.v_proj.kernel", p + "self_attn.v_proj.weight", *k),
            Row(p + "self_attn.o_proj.kernel", p + "self_attn.o_proj.weight", *o),
            Row(p + "self_attn.q_norm.weight", p + "self_attn.q_norm.weight"),
            Row(p + "self_attn.k_norm.weight", p + "self_attn.k_norm.weight"),
            Row(p + "mlp.gate_proj.kernel", p + "mlp.gate_proj.weight", *t),
            Row(p + "mlp.up_proj.kernel", p + "mlp.up_proj.weight", *t),
            Row(p + "mlp.down_proj.kernel", p + "mlp.down_proj.weight", *t),
        ]
        rows += [Row(p + f"{norm}.weight", p + f"{norm}.weight") for norm in _NORMS]
    return tuple(rows)
