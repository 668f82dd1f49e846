"""Load a HuggingFace Gemma 3 checkpoint (config.json + safetensors) into a `Gemma3Model`.

Checkpoints come in three key layouts (docs/design.md, section 5), plus the text-only one:

    layout            language model          vision tower                 projector
    hub               language_model.model.*  vision_tower.vision_model.*  multi_modal_projector.*
    transformers 5    language_model.model.*  vision_tower.*               multi_modal_projector.*
    in memory         model.language_model.*  model.vision_tower.*         model.multi_modal_projector.*
    Gemma3ForCausalLM model.*                 -                            -

`checkpoint_prefixes` reads each component's prefix off the checkpoint's keys, and the key map is
built on those exact keys, so every error names a tensor as the file spells it. The tied lm_head is
ignored.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable

import jax.numpy as jnp
import numpy as np
from flax import nnx

from theworld_jax.config.gemma3 import Gemma3Config
from theworld_jax.modeling.gemma3 import Gemma3Model
from theworld_jax.weights.gemma3_text_keys import text_key_map
from theworld_jax.weights.loader import Source, load_params
from theworld_jax.weights.safetensors_io import SafetensorsReader, find_safetensors
from theworld_jax.weights.vision_keys import projector_key_map, siglip_key_map

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
    """The checkpoint key prefix of each component (the layout of one checkpoint)."""

    text: str = "language_model.model."
    vision: str = "vision_tower.vision_model."
    projector: str = "multi_modal_projector."


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


def _lenient(transform: Callable[..., np.ndarray]) -> Callable[..., np.ndarray]:
    """A transform that passes a tensor it cannot reshape through, so the loader reports its shape."""
    def apply(x: np.ndarray) -> np.ndarray:
        try:
            return transform(x)
        except ValueError:
            return x
    return apply


def gemma3_key_map(config: Gemma3Config, prefixes: Prefixes = Prefixes()) -> dict[str, Source]:
    """{Gemma3Model param path: Source} over the checkpoint keys of the layout `prefixes`."""
    km = {f"language_model.{path}": Source(tuple(prefixes.text + k for k in s.keys), _lenient(s.transform))
          for path, s in text_key_map(config.text).items()}
    if config.vision is not None:
        km.update(siglip_key_map(config.vision, prefix="vision_tower.", key_prefix=prefixes.vision))
        km.update(projector_key_map(prefix="multi_modal_projector.", key_prefix=prefixes.projector))
    return km


def read_gemma3_config(path: str) -> Gemma3Config:
    """The Gemma3Config of a checkpoint directory (or of a config.json path)."""
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{path!r} holds no config.json: not a HuggingFace Gemma 3 directory")
    return Gemma3Config.from_json_file(path)


def load_gemma3(path: str, dtype=jnp.float32, *, config: Gemma3Config | None = None,
                shardings=None) -> tuple[Gemma3Config, Gemma3Model]:
    """(config, Gemma3Model with `dtype` params) from a HuggingFace Gemma 3 directory, tensor by tensor.

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
