"""A tiny random Gemma 3 (transformers) and our text decoder loaded from its saved language model.

Three layers (sliding, full, sliding), window 8, 2 query heads on 1 KV head, linear RoPE factor 8 on
the full layer. The language model's state_dict goes through safetensors, `text_key_map` and
`load_params`, as a user's checkpoint would.
"""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx
from safetensors.torch import save_file
from tests.helpers.tiny_gemma import build_tiny_gemma3, tiny_gemma3_config

from theworld_jax.attention import make_attention_mask
from theworld_jax.config.gemma3 import Gemma3TextConfig
from theworld_jax.modeling.gemma3_text import Gemma3TextDecoder
from theworld_jax.weights.gemma3_text_keys import text_key_map
from theworld_jax.weights.loader import load_params
from theworld_jax.weights.safetensors_io import SafetensorsReader, find_safetensors

LAYER_TYPES = ["sliding_attention", "full_attention", "sliding_attention"]
WINDOW = 8


def build_hf():
    """(transformers Gemma3ForConditionalGeneration in float32 eval mode, our Gemma3TextConfig)."""
    hf_config = tiny_gemma3_config(text_config=dict(num_hidden_layers=len(LAYER_TYPES), layer_types=LAYER_TYPES,
                                                    sliding_window=WINDOW))
    hf = build_tiny_gemma3(hf_config)
    return hf, Gemma3TextConfig.from_dict(hf_config.text_config.to_dict())


def save_language_model(hf, directory: str) -> str:
    """Write the HF language model's tensors (keys relative to it) to directory/model.safetensors."""
    state = {k: v.detach().contiguous() for k, v in hf.model.language_model.state_dict().items()}
    save_file(state, os.path.join(directory, "model.safetensors"))
    return directory


def load_decoder(config: Gemma3TextConfig, directory: str, dtype=jnp.float32) -> Gemma3TextDecoder:
    abstract = nnx.eval_shape(lambda: Gemma3TextDecoder(config, dtype=dtype, rngs=nnx.Rngs(0)))
    with SafetensorsReader(find_safetensors(directory)) as reader:
        return load_params(abstract, text_key_map(config), reader)


def positions_from_mask(attention_mask: np.ndarray) -> np.ndarray:
    """cumsum(mask) - 1 clipped at 0, as transformers' generate computes position_ids."""
    return np.clip(np.cumsum(attention_mask, axis=1) - 1, 0, None).astype(np.int32)


@nnx.jit
def forward_logits(model, input_ids, attention_mask, positions, token_type_ids):
    """Logits (B, L, V) float32 of a whole padded sequence, no cache."""
    mask = make_attention_mask(attention_mask, token_type_ids)
    hidden, _ = model(model.embed(input_ids), positions=positions, mask=mask)
    return model.logits(hidden)


def our_logits(model, ids, attention_mask, token_type_ids=None) -> np.ndarray:
    tti = np.zeros_like(ids) if token_type_ids is None else token_type_ids
    out = forward_logits(model, jnp.asarray(ids, jnp.int32), jnp.asarray(attention_mask, jnp.int32),
                         jnp.asarray(positions_from_mask(attention_mask)), jnp.asarray(tti, jnp.int32))
    return np.asarray(out)


def hf_logits(hf, ids, attention_mask, token_type_ids=None) -> np.ndarray:
    """transformers' float32 logits with generate-style position_ids; token_type_ids switch on blocks."""
    with torch.no_grad():
        out = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(attention_mask),
                 position_ids=torch.tensor(positions_from_mask(attention_mask), dtype=torch.long),
                 token_type_ids=None if token_type_ids is None else torch.tensor(token_type_ids))
    return out.logits.float().numpy()


def max_logit_error(ours: np.ndarray, ref: np.ndarray, valid: np.ndarray) -> float:
    """max |ours - ref| over valid positions, relative to max(1, max |ref|) (docs/design.md, section 4)."""
    valid = valid.astype(bool)
    return float(np.abs(ours - ref)[valid].max() / max(1.0, np.abs(ref[valid]).max()))
