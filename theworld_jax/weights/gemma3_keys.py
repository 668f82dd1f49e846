"""Load a HuggingFace Gemma 3 checkpoint (config.json + safetensors) into a `Gemma3Model`.

Checkpoints come in three key layouts (notes/reference-semantics.md section 2); `canonical_key`
maps each onto one naming before matching:

    hub               language_model.model.*  vision_tower.vision_model.*  multi_modal_projector.*
    transformers 5    language_model.model.*  vision_tower.*               multi_modal_projector.*
    in memory         model.language_model.*  model.vision_tower.*         model.multi_modal_projector.*
    text-only CausalLM  model.*  (Gemma3ForCausalLM)

canonical: `language_model.*` (relative keys as `text_key_map` names them), `vision_tower.*` without
the `vision_model.` level, `multi_modal_projector.*`. The tied lm_head is ignored.
"""

from __future__ import annotations

import os

import jax.numpy as jnp
from flax import nnx

from theworld_jax.config.gemma3 import Gemma3Config
from theworld_jax.modeling.gemma3 import Gemma3Model
from theworld_jax.weights.gemma3_text_keys import text_key_map
from theworld_jax.weights.loader import Source, load_params
from theworld_jax.weights.safetensors_io import SafetensorsReader, find_safetensors
from theworld_jax.weights.vision_keys import projector_key_map, siglip_key_map

_MULTIMODAL_PREFIXES = (
    ("model.language_model.", "language_model."),
    ("language_model.model.", "language_model."),
    ("model.vision_tower.vision_model.", "vision_tower."),
    ("model.vision_tower.", "vision_tower."),
    ("vision_tower.vision_model.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
)
_TIED_HEADS = ("lm_head.weight", "language_model.lm_head.weight", "model.lm_head.weight")


def canonical_key(key: str, *, text_only: bool = False) -> str:
    """The layout-independent name of a checkpoint key (see the module docstring)."""
    for old, new in _MULTIMODAL_PREFIXES:
        if key.startswith(old):
            return new + key[len(old):]
    if text_only and key.startswith("model."):
        return "language_model." + key[len("model."):]
    return key


def is_tied_head(key: str) -> bool:
    return key in _TIED_HEADS


def gemma3_key_map(config: Gemma3Config) -> dict[str, Source]:
    """{Gemma3Model param path: Source} over canonical checkpoint keys."""
    km = {f"language_model.{path}": Source(tuple(f"language_model.{k}" for k in s.keys), s.transform)
          for path, s in text_key_map(config.text).items()}
    if config.vision is not None:
        km.update(siglip_key_map(config.vision, prefix="vision_tower.", key_prefix="vision_tower."))
        km.update(projector_key_map(prefix="multi_modal_projector.", key_prefix="multi_modal_projector."))
    return km


def read_gemma3_config(path: str) -> Gemma3Config:
    """The Gemma3Config of a checkpoint directory (or of a config.json path)."""
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{path!r} holds no config.json: not a HuggingFace Gemma 3 directory")
    return Gemma3Config.from_json_file(path)


def load_gemma3(path: str, dtype=jnp.float32, *, config: Gemma3Config | None = None,
                shardings=None) -> tuple[Gemma3Config, Gemma3Model]:
    """(config, Gemma3Model with dtype params) from a HuggingFace Gemma 3 directory, tensor by tensor."""
    config = config or read_gemma3_config(path)
    abstract = nnx.eval_shape(lambda: Gemma3Model(config, dtype=dtype, rngs=nnx.Rngs(0)))
    text_only = config.vision is None
    with SafetensorsReader(find_safetensors(path)) as reader:
        model = load_params(
            abstract, gemma3_key_map(config), reader,
            rename=lambda k: canonical_key(k, text_only=text_only), ignore=is_tied_head,
            desc=f"loading Gemma 3 from {os.path.basename(os.path.normpath(path))}", shardings=shardings)
    return config, model
