"""Frozen dataclass configs read from HuggingFace / diffusers config.json files."""

from theworld_jax.config.gemma3 import (ConfigError, Gemma3Config, Gemma3TextConfig, RopeConfig,
                                        SiglipVisionConfig)

__all__ = ["ConfigError", "Gemma3Config", "Gemma3TextConfig", "RopeConfig", "SiglipVisionConfig"]
