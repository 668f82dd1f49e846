"""Frozen dataclass configs read from HuggingFace / diffusers / TheWorld config.json files.

Every config reads its JSON through `read_json_config` (errors name the file) and raises `ConfigError`;
settings with a closed set of values are `Choice` enums.
"""

from theworld_jax.config.base import Choice, ConfigError, read_json_config
from theworld_jax.config.gemma3 import Gemma3Config, Gemma3TextConfig, RopeConfig, SiglipVisionConfig
from theworld_jax.config.theworld import (ProjectionArchitecture, ProjectionMode, TheWorldConfig, VaeInputRange,
                                          WorldAttention)
from theworld_jax.config.wan_vae import WanVAEConfig

__all__ = ["Choice", "ConfigError", "Gemma3Config", "Gemma3TextConfig", "ProjectionArchitecture", "ProjectionMode",
           "RopeConfig", "SiglipVisionConfig", "TheWorldConfig", "VaeInputRange", "WanVAEConfig", "WorldAttention",
           "read_json_config"]
