"""Key map between `Gemma3TextDecoder` parameters and transformers' Gemma 3 language-model tensors.

HF keys are relative to the language model (`embed_tokens.weight`, `layers.{i}.self_attn.q_proj.weight`,
`norm.weight`, ...); the caller adds the checkpoint layout's prefix. torch Linear weights are (out, in):
they are transposed and reshaped into the decoder's einsum shapes, and back for export.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from theworld_jax.config.gemma3 import Gemma3TextConfig
from theworld_jax.weights.loader import Source


def _copy(x: np.ndarray) -> np.ndarray:
    return x


def _t(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.T)


def _entries(config: Gemma3TextConfig) -> list[tuple[str, str, Callable, Callable]]:
    """(param path, HF key, HF -> param, param -> HF) for every parameter."""
    d, n, kv, h = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim

    def in_heads(heads):  # torch (heads*H, D) <-> (D, heads, H)
        return (lambda w: np.ascontiguousarray(w.T.reshape(d, heads, h)),
                lambda k: np.ascontiguousarray(k.reshape(d, heads * h).T))

    out_heads = (lambda w: np.ascontiguousarray(w.T.reshape(n, h, d)),  # torch (D, N*H) <-> (N, H, D)
                 lambda k: np.ascontiguousarray(k.reshape(n * h, d).T))

    entries = [("embed_tokens.embedding", "embed_tokens.weight", _copy, _copy),
               ("norm.weight", "norm.weight", _copy, _copy)]
    for i in range(config.num_hidden_layers):
        p, k = f"layers.{i}.", f"layers.{i}."
        entries += [
            (p + "self_attn.q_proj.kernel", k + "self_attn.q_proj.weight", *in_heads(n)),
            (p + "self_attn.k_proj.kernel", k + "self_attn.k_proj.weight", *in_heads(kv)),
            (p + "self_attn.v_proj.kernel", k + "self_attn.v_proj.weight", *in_heads(kv)),
            (p + "self_attn.o_proj.kernel", k + "self_attn.o_proj.weight", *out_heads),
            (p + "self_attn.q_norm.weight", k + "self_attn.q_norm.weight", _copy, _copy),
            (p + "self_attn.k_norm.weight", k + "self_attn.k_norm.weight", _copy, _copy),
            (p + "mlp.gate_proj.kernel", k + "mlp.gate_proj.weight", _t, _t),
            (p + "mlp.up_proj.kernel", k + "mlp.up_proj.weight", _t, _t),
            (p + "mlp.down_proj.kernel", k + "mlp.down_proj.weight", _t, _t),
        ]
        entries += [(p + f"{norm}.weight", k + f"{norm}.weight", _copy, _copy)
                    for norm in ("input_layernorm", "post_attention_layernorm",
                                 "pre_feedforward_layernorm", "post_feedforward_layernorm")]
    return entries


def text_key_map(config: Gemma3TextConfig) -> dict[str, Source]:
    """{decoder param path: Source(HF key relative to the language model, transform to our shape)}."""
    return {path: Source.of(key, to_ours) for path, key, to_ours, _ in _entries(config)}


def text_export_map(config: Gemma3TextConfig) -> dict[str, tuple[str, Callable[[np.ndarray], np.ndarray]]]:
    """{HF key relative to the language model: (decoder param path, transform back to the HF shape)}."""
    return {key: (path, to_hf) for path, key, _, to_hf in _entries(config)}
