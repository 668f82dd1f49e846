"""Frozen config of TheWorld: which base models, how the world branch is built, fused and trained.

Two on-disk forms are read:
- our own config.json (`model_type: "theworld_jax"`), written by `to_dict()`; unknown fields are errors;
- an upstream PyTorch TheWorld config.json (`model_type: "the_world"`). Upstream's config class subclassed
  transformers' Gemma3Config, so its file also carries the whole Gemma 3 config and whatever bookkeeping
  the writing transformers version added; those fields are ignored here (read them with Gemma3Config).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from theworld_jax.config.base import Choice, ConfigError, read_json_config

MODEL_TYPE = "theworld_jax"
UPSTREAM_MODEL_TYPE = "the_world"

DEFAULT_GEMMA_MODEL = "google/gemma-3-4b-it"
DEFAULT_COSMOS_MODEL = "nvidia/Cosmos-Predict2-2B-Video2World"


class ProjectionMode(Choice):
    """How VAE latents (T', H', W', z) become world tokens."""

    SPATIAL = "spatial"  # T'*H'*W' tokens of z features
    CHANNEL = "channel"  # T'*z tokens of H'*W' features


class ProjectionArchitecture(Choice):
    """The world projector: upstream's `projection` Sequential."""

    MLP = "mlp"  # Linear -> GELU -> Linear -> GELU
    MLP_NO_FINAL_GELU = "mlp_no_final_gelu"  # Linear -> GELU -> Linear
    LINEAR = "linear"  # Linear


class WorldAttention(Choice):
    """How world tokens attend: causally like text, or as one bidirectional block like an image."""

    CAUSAL = "causal"
    BIDIRECTIONAL = "bidirectional"


class VaeInputRange(Choice):
    """Pixel values fed to the VAE."""

    MINUS_ONE_ONE = "minus_one_one"  # x / 127.5 - 1, what the VAE was trained on
    ZERO_255 = "zero_255"  # raw 0..255 as float, what upstream TheWorld fed it


_CHOICES = {"world_projection_mode": ProjectionMode, "projection_architecture": ProjectionArchitecture,
            "world_attention": WorldAttention, "vae_input_range": VaeInputRange}

# The TheWorld fields of upstream's config class (older versions lack the last three; defaults apply).
_UPSTREAM_FIELDS = ("cosmos_model_name", "enable_world", "freeze_gemma_vision", "freeze_gemma_language",
                    "freeze_cosmos_vae", "gemma_model_name", "world_projection_mode", "projection_architecture")


@dataclasses.dataclass(frozen=True)
class TheWorldConfig:
    """Every TheWorld setting that is not part of the Gemma 3 or VAE configs.

    gemma_model_name / cosmos_model_name: where the base models come from (a directory or a hub id).
    world_projection_mode, projection_architecture, world_attention, vae_input_range: the `Choice` enums
    above; strings are accepted and turned into members (anything else is a ConfigError).
    vae_image_size: (height, width) that images are resized to before the VAE.
    sow_token_id / eow_token_id: <start_of_world> / <end_of_world>, None until the processor is known.
    """

    gemma_model_name: str | None = DEFAULT_GEMMA_MODEL
    cosmos_model_name: str | None = DEFAULT_COSMOS_MODEL
    enable_world: bool = True
    world_projection_mode: ProjectionMode = ProjectionMode.SPATIAL
    projection_architecture: ProjectionArchitecture = ProjectionArchitecture.MLP
    freeze_gemma_vision: bool = True
    freeze_gemma_language: bool = True
    freeze_cosmos_vae: bool = True
    world_attention: WorldAttention = WorldAttention.CAUSAL
    vae_input_range: VaeInputRange = VaeInputRange.MINUS_ONE_ONE
    vae_image_size: tuple[int, int] = (512, 512)
    sow_token_id: int | None = None
    eow_token_id: int | None = None

    def __post_init__(self):
        for name in ("gemma_model_name", "cosmos_model_name"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise ConfigError(f"{name} must be a path or hub id (str) or None, got {value!r}")
        for name in ("enable_world", "freeze_gemma_vision", "freeze_gemma_language", "freeze_cosmos_vae"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        for name, choice in _CHOICES.items():
            object.__setattr__(self, name, choice.parse(getattr(self, name), name))
        size = self.vae_image_size
        if (not isinstance(size, (tuple, list)) or len(size) != 2
                or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size)):
            raise ConfigError(f"vae_image_size must be (height, width), two positive ints, got {size!r}")
        object.__setattr__(self, "vae_image_size", tuple(size))
        ids = (self.sow_token_id, self.eow_token_id)
        if (ids[0] is None) != (ids[1] is None):
            raise ConfigError(f"sow_token_id and eow_token_id must be set together, got {ids}")
        if ids[0] is not None:
            if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
                raise ConfigError(f"sow_token_id and eow_token_id must be non-negative ints, got {ids}")
            if ids[0] == ids[1]:
                raise ConfigError(f"sow_token_id and eow_token_id must differ, both are {ids[0]}")

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["vae_image_size"] = list(self.vae_image_size)
        return {"model_type": MODEL_TYPE, **out}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TheWorldConfig:
        """Our own config.json (model_type "theworld_jax"); unknown fields are errors."""
        model_type = raw.get("model_type", MODEL_TYPE)
        if model_type == UPSTREAM_MODEL_TYPE:
            raise ConfigError("this is an upstream PyTorch TheWorld config (model_type 'the_world'); "
                              "read it with TheWorldConfig.from_upstream_dict")
        if model_type != MODEL_TYPE:
            raise ConfigError(f"config model_type is {model_type!r}, expected {MODEL_TYPE!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known - {"model_type"})
        if unknown:
            raise ConfigError(f"unknown field(s) {unknown} in the TheWorld config; known fields are "
                              f"{sorted(known)}")
        fields = {k: v for k, v in raw.items() if k in known}
        if isinstance(fields.get("vae_image_size"), list):
            fields["vae_image_size"] = tuple(fields["vae_image_size"])
        return cls(**fields)

    @classmethod
    def from_upstream_dict(cls, raw: dict[str, Any]) -> TheWorldConfig:
        """An upstream TheWorld config.json. Upstream fed the VAE [0, 255], so vae_input_range="zero_255"."""
        model_type = raw.get("model_type")
        if model_type != UPSTREAM_MODEL_TYPE:
            raise ConfigError(f"config model_type is {model_type!r}, expected {UPSTREAM_MODEL_TYPE!r} for an "
                              "upstream TheWorld config")
        fields = {k: raw[k] for k in _UPSTREAM_FIELDS if k in raw}
        return cls(vae_input_range=VaeInputRange.ZERO_255, **fields)

    @classmethod
    def from_any_dict(cls, raw: dict[str, Any]) -> TheWorldConfig:
        """Either form, chosen by model_type."""
        if raw.get("model_type") == UPSTREAM_MODEL_TYPE:
            return cls.from_upstream_dict(raw)
        return cls.from_dict(raw)

    @classmethod
    def from_json_file(cls, path: str) -> TheWorldConfig:
        """A config.json (or a directory holding one) in either form."""
        return read_json_config(path, cls.from_any_dict)

    def to_json_file(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")
