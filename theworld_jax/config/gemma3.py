"""Frozen configs for Gemma 3 (text decoder, SigLIP vision tower, multimodal glue).

Read from a HuggingFace config.json. transformers' own config classes normalise the legacy spellings
(`rope_scaling`, `rope_local_base_freq`, `sliding_window_pattern`, ...); we then keep only the fields
the model uses. A field that neither transformers nor we know is an error naming it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from theworld_jax.config.base import ConfigError, read_json_config

# Fields that older or newer checkpoints carry and that do not change the computation.
_LEGACY_FIELDS = frozenset({
    "rope_theta", "rope_local_base_freq", "rope_scaling", "sliding_window_pattern", "torch_dtype",
    "cache_implementation", "transformers_version", "architectures", "_name_or_path", "model_type",
    "attn_implementation", "dtype", "pad_token_id", "bos_token_id", "eos_token_id", "use_cache",
    "final_logit_softcapping", "attn_logit_softcapping", "image_token_id", "boi_token_id", "eoi_token_id",
    # Fields some transformers versions write and others lack (the check uses the installed version).
    "vision_use_head", "use_bidirectional_attention", "_sliding_window_pattern", "rope_parameters", "layer_types",
    "output_attentions", "output_hidden_states", "return_dict", "chunk_size_feed_forward", "is_encoder_decoder",
    "id2label", "label2id", "problem_type", "tie_word_embeddings", "initializer_range", "attention_dropout",
})


def _check_fields(raw: dict[str, Any], known: set[str], what: str) -> None:
    unknown = sorted(set(raw) - known - _LEGACY_FIELDS)
    if unknown:
        raise ConfigError(f"unknown field(s) {unknown} in the {what} config")


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding of one layer type: angle = position / (theta**(2i/d) * factor)."""

    theta: float
    factor: float = 1.0  # linear scaling ("linear" rope_type); 1.0 for "default"

    @classmethod
    def from_hf(cls, params: dict[str, Any]) -> RopeConfig:
        rope_type = params.get("rope_type", "default")
        if rope_type == "default":
            return cls(theta=float(params["rope_theta"]))
        if rope_type == "linear":
            return cls(theta=float(params["rope_theta"]), factor=float(params["factor"]))
        raise ConfigError(f"rope_type {rope_type!r} is not supported (only 'default' and 'linear')")


@dataclasses.dataclass(frozen=True)
class Gemma3TextConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    query_pre_attn_scalar: float
    sliding_window: int
    rms_norm_eps: float
    layer_types: tuple[str, ...]  # "sliding_attention" | "full_attention", one per layer
    rope: tuple[tuple[str, RopeConfig], ...]  # (layer type, rope) pairs; a tuple keeps the config hashable
    max_position_embeddings: int
    hidden_activation: str = "gelu_pytorch_tanh"
    tie_word_embeddings: bool = True
    pad_token_id: int = 0
    bos_token_id: int = 2
    eos_token_id: tuple[int, ...] = (1,)

    def __post_init__(self):
        if len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(
                f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers")
        bad = sorted(set(self.layer_types) - {"sliding_attention", "full_attention"})
        if bad:
            raise ConfigError(f"unsupported layer types {bad}")
        if self.hidden_activation not in ("gelu_pytorch_tanh", "gelu_tanh"):
            raise ConfigError(f"hidden_activation {self.hidden_activation!r} is not supported")
        if not self.tie_word_embeddings:
            raise ConfigError("Gemma 3 ties lm_head to the embedding; tie_word_embeddings=False is not supported")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError("num_attention_heads must be a multiple of num_key_value_heads")

    @property
    def embed_scale(self) -> float:
        return self.hidden_size ** 0.5

    @property
    def query_scale(self) -> float:
        return self.query_pre_attn_scalar ** -0.5

    def rope_for(self, layer: int) -> RopeConfig:
        return dict(self.rope)[self.layer_types[layer]]

    def window(self, layer: int) -> int | None:
        """Sliding window (keys q-W < k <= q) of a layer, None for full attention."""
        return self.sliding_window if self.layer_types[layer] == "sliding_attention" else None

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Gemma3TextConfig:
        from transformers import Gemma3TextConfig as HFConfig

        _check_fields(raw, set(HFConfig().to_dict()), "Gemma 3 text")
        hf = HFConfig(**{k: v for k, v in raw.items() if k not in ("model_type", "transformers_version")})
        rope_params = hf.rope_parameters
        eos = hf.eos_token_id
        return cls(
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size,
            num_hidden_layers=hf.num_hidden_layers,
            num_attention_heads=hf.num_attention_heads,
            num_key_value_heads=hf.num_key_value_heads,
            head_dim=hf.head_dim,
            query_pre_attn_scalar=float(hf.query_pre_attn_scalar),
            sliding_window=int(hf.sliding_window),
            rms_norm_eps=float(hf.rms_norm_eps),
            layer_types=tuple(hf.layer_types),
            rope=tuple((t, RopeConfig.from_hf(rope_params[t])) for t in sorted(set(hf.layer_types))),
            max_position_embeddings=int(hf.max_position_embeddings),
            hidden_activation=hf.hidden_activation,
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", True)),
            pad_token_id=int(hf.pad_token_id if hf.pad_token_id is not None else 0),
            bos_token_id=int(hf.bos_token_id if hf.bos_token_id is not None else 2),
            eos_token_id=tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),),
        )


@dataclasses.dataclass(frozen=True)
class SiglipVisionConfig:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    image_size: int
    patch_size: int
    layer_norm_eps: float
    num_channels: int = 3
    hidden_act: str = "gelu_pytorch_tanh"

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ConfigError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.hidden_act not in ("gelu_pytorch_tanh", "gelu_tanh"):
            raise ConfigError(f"hidden_act {self.hidden_act!r} is not supported")

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> SiglipVisionConfig:
        from transformers import SiglipVisionConfig as HFConfig

        _check_fields(raw, set(HFConfig().to_dict()), "SigLIP vision")
        hf = HFConfig(**{k: v for k, v in raw.items() if k not in ("model_type", "transformers_version")})
        return cls(
            hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size,
            num_hidden_layers=hf.num_hidden_layers,
            num_attention_heads=hf.num_attention_heads,
            image_size=hf.image_size,
            patch_size=hf.patch_size,
            layer_norm_eps=float(hf.layer_norm_eps),
            num_channels=hf.num_channels,
            hidden_act=hf.hidden_act,
        )


@dataclasses.dataclass(frozen=True)
class Gemma3Config:
    """A Gemma 3 checkpoint: text decoder, vision tower (None for text-only) and the glue tokens."""

    text: Gemma3TextConfig
    vision: SiglipVisionConfig | None
    mm_tokens_per_image: int = 256
    boi_token_id: int = 255_999
    eoi_token_id: int = 256_000
    image_token_id: int = 262_144
    eos_token_id: tuple[int, ...] = (1, 106)

    def __post_init__(self):
        if self.vision is not None:
            side = self.vision.patches_per_side
            tokens_side = round(self.mm_tokens_per_image ** 0.5)
            if tokens_side ** 2 != self.mm_tokens_per_image or side % tokens_side:
                raise ConfigError(
                    f"mm_tokens_per_image {self.mm_tokens_per_image} does not pool a {side}x{side} patch grid")

    @property
    def pool_kernel(self) -> int:
        return self.vision.patches_per_side // round(self.mm_tokens_per_image ** 0.5)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Gemma3Config:
        if raw.get("model_type") == "gemma3_text" or "text_config" not in raw:
            text = Gemma3TextConfig.from_dict(raw)
            return cls(text=text, vision=None, eos_token_id=text.eos_token_id)
        from transformers import Gemma3Config as HFConfig

        top = {k: v for k, v in raw.items() if k not in ("text_config", "vision_config")}
        _check_fields(top, set(HFConfig().to_dict()) | {"text_config", "vision_config"}, "Gemma 3")
        text = Gemma3TextConfig.from_dict(raw["text_config"])
        vision = SiglipVisionConfig.from_dict(raw.get("vision_config") or {})
        eos = raw.get("eos_token_id", text.eos_token_id)
        return cls(
            text=text,
            vision=vision,
            mm_tokens_per_image=int(raw.get("mm_tokens_per_image", 256)),
            boi_token_id=int(raw.get("boi_token_index", raw.get("boi_token_id", 255_999))),
            eoi_token_id=int(raw.get("eoi_token_index", raw.get("eoi_token_id", 256_000))),
            image_token_id=int(raw.get("image_token_index", raw.get("image_token_id", 262_144))),
            eos_token_id=tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),),
        )

    @classmethod
    def from_json_file(cls, path: str) -> Gemma3Config:
        """A config.json (or a directory holding one)."""
        return read_json_config(path, cls.from_dict)
