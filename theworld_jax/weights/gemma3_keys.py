"""A HuggingFace Gemma 3 checkpoint (config.json + safetensors) <-> a `Gemma3Model`, both directions.

Checkpoints come in three key layouts (docs/design.md, section 5), plus the text-only one:

    layout            language model          vision tower                 projector
    hub               language_model.model.*  vision_tower.vision_model.*  multi_modal_projector.*
    transformers 5    language_model.model.*  vision_tower.*               multi_modal_projector.*
    in memory         model.language_model.*  model.vision_tower.*         model.multi_modal_projector.*
    Gemma3ForCausalLM model.*                 -                            -

`checkpoint_prefixes` reads each component's prefix off the checkpoint's keys, and the key map is
built on those exact keys, so every error names a tensor as the file spells it. The tied lm_head is
ignored. `export_gemma3` writes the hub layout (or Gemma3ForCausalLM's for a text-only model).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable
from typing import Any

import jax.numpy as jnp
from flax import nnx

from theworld_jax.config.gemma3 import Gemma3Config
from theworld_jax.modeling.gemma3 import Gemma3Model
from theworld_jax.weights.gemma3_text_keys import text_key_map
from theworld_jax.weights.loader import KeyMap, export_params, load_params, prefixed
from theworld_jax.weights.safetensors_io import SafetensorsReader, find_safetensors
from theworld_jax.weights.vision_keys import mm_projector_key_map, siglip_key_map

# Candidate prefixes per component, and the sub-keys that identify them; the first is the default.
_TEXT = (("language_model.model.", "model.language_model."), ("embed_tokens.", "layers.", "norm."))
_TEXT_ONLY = (("model.", "language_model.model.", "model.language_model."), _TEXT[1])
_VISION = (("vision_tower.vision_model.", "vision_tower.", "model.vision_tower.vision_model.",
            "model.vision_tower."), ("embeddings.", "encoder.", "post_layernorm."))
_PROJECTOR = (("multi_modal_projector.", "model.multi_modal_projector."),
              ("mm_input_projection_weight", "mm_soft_emb_norm."))
_TIED_HEADS = ("lm_head.weight", "language_model.lm_head.weight", "model.lm_head.weight")


@dataclasses.dataclass(frozen=True)
class Prefixes:
    """The checkpoint key prefix of each component (the layout of one checkpoint); default: the hub's."""

    text: str = "language_model.model."
    vision: str = "vision_tower.vision_model."
    projector: str = "multi_modal_projector."


TEXT_ONLY = Prefixes(text="model.")


def _detect(keys: list[str], candidates: tuple[str, ...], members: tuple[str, ...]) -> str:
    """The longest candidate prefix followed by a member sub-key in `keys`; the first candidate if none."""
    found = [p for p in candidates if any(k.startswith(p + m) for k in keys for m in members)]
    return max(found, key=len) if found else candidates[0]


def checkpoint_prefixes(keys: Iterable[str], *, text_only: bool = False) -> Prefixes:
    """The layout of a checkpoint, read off its keys (see the module docstring)."""
    keys = list(keys)
    return Prefixes(text=_detect(keys, *(_TEXT_ONLY if text_only else _TEXT)),
                    vision=_detect(keys, *_VISION), projector=_detect(keys, *_PROJECTOR))


def is_tied_head(key: str) -> bool:
    return key in _TIED_HEADS


def gemma3_key_map(config: Gemma3Config, prefixes: Prefixes = Prefixes()) -> KeyMap:
    """Rows of every Gemma3Model parameter against the checkpoint keys of the layout `prefixes`."""
    rows = prefixed(text_key_map(config.text), "language_model.", prefixes.text)
    if config.vision is not None:
        rows += prefixed(siglip_key_map(config.vision), "vision_tower.", prefixes.vision)
        rows += prefixed(mm_projector_key_map(), "multi_modal_projector.", prefixes.projector)
    return rows


def read_gemma3_config(path: str) -> Gemma3Config:
    """The Gemma3Config of a checkpoint directory (or of a config.json path)."""
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{path!r} holds no config.json: not a HuggingFace Gemma 3 directory")
    return Gemma3Config.from_json_file(path)


def load_gemma3(path: str, dtype=jnp.float32, *, config: Gemma3Config | None = None,
                shardings=None) -> tuple[Gemma3Config, Gemma3Model]:
    """(config, Gemma3Model with `dtype` params) from a local HuggingFace Gemma 3 directory, tensor by tensor.

    `shardings` ({param path: Sharding}) places each parameter as it is read.
    """
    config = config or read_gemma3_config(path)
    abstract = nnx.eval_shape(lambda: Gemma3Model(config, dtype=dtype, rngs=nnx.Rngs(0)))
    with SafetensorsReader(find_safetensors(path)) as reader:
        prefixes = checkpoint_prefixes(reader.keys(), text_only=config.vision is None)
        model = load_params(abstract, gemma3_key_map(config, prefixes), reader, ignore=is_tied_head,
                            desc=f"loading Gemma 3 from {os.path.basename(os.path.normpath(path))}",
                            shardings=shardings)
    return config, model


def _integral(x: float) -> float | int:
    return int(x) if float(x).is_integer() else x


def hf_config_dict(config: Gemma3Config) -> dict[str, Any]:
    """The transformers config.json of `config`: Gemma3ForConditionalGeneration, or Gemma3ForCausalLM
    when it has no vision tower."""
    t = config.text
    rope = {kind: {"rope_type": "default", "rope_theta": r.theta} if r.factor == 1.0 else
            {"rope_type": "linear", "factor": r.factor, "rope_theta": r.theta} for kind, r in t.rope}
    text = dict(
        model_type="gemma3_text", vocab_size=t.vocab_size, hidden_size=t.hidden_size,
        intermediate_size=t.intermediate_size, num_hidden_layers=t.num_hidden_layers,
        num_attention_heads=t.num_attention_heads, num_key_value_heads=t.num_key_value_heads, head_dim=t.head_dim,
        query_pre_attn_scalar=_integral(t.query_pre_attn_scalar), sliding_window=t.sliding_window,
        rms_norm_eps=t.rms_norm_eps, layer_types=list(t.layer_types), rope_parameters=rope,
        max_position_embeddings=t.max_position_embeddings, hidden_activation=t.hidden_activation,
        attention_bias=False, attn_logit_softcapping=None, final_logit_softcapping=None,
        tie_word_embeddings=True, pad_token_id=t.pad_token_id, bos_token_id=t.bos_token_id,
        eos_token_id=list(t.eos_token_id))
    if config.vision is None:
        return {"architectures": ["Gemma3ForCausalLM"], **text}
    v = config.vision
    vision = dict(
        model_type="siglip_vision_model", hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
        num_hidden_layers=v.num_hidden_layers, num_attention_heads=v.num_attention_heads,
        image_size=v.image_size, patch_size=v.patch_size, layer_norm_eps=v.layer_norm_eps,
        num_channels=v.num_channels, hidden_act=v.hidden_act, vision_use_head=False)
    return dict(model_type="gemma3", architectures=["Gemma3ForConditionalGeneration"], text_config=text,
                vision_config=vision, mm_tokens_per_image=config.mm_tokens_per_image,
                boi_token_index=config.boi_token_id, eoi_token_index=config.eoi_token_id,
                image_token_index=config.image_token_id, eos_token_id=list(config.eos_token_id),
                tie_word_embeddings=True)


def export_gemma3(model: Gemma3Model, directory: str, *, max_shard_bytes: int = 4 << 30) -> None:
    """Write `model` into `directory` (which must exist) as a HuggingFace checkpoint that transformers
    loads: config.json and model*.safetensors in the hub layout, in the parameters' dtype."""
    config = model.config
    prefixes = Prefixes() if config.vision is not None else TEXT_ONLY
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(hf_config_dict(config), f, indent=2)
    export_params(model, gemma3_key_map(config, prefixes), directory, max_shard_bytes=max_shard_bytes)
