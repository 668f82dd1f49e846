"""Frozen config of the Wan2.1 video VAE (diffusers `AutoencoderKLWan`), read from its config.json.

The Cosmos-Predict2 VAE is this model with diffusers' default config. Fields that change nothing at
inference (dropout, the scale_factor_* hints used for tiling) are kept for round-tripping; fields of the
Wan2.2 variant that this library does not implement (`is_residual`, `patch_size`) are rejected.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from theworld_jax.config.base import ConfigError, read_json_config

# diffusers' ConfigMixin bookkeeping: accepted and ignored.
_BOOKKEEPING = frozenset({"_class_name", "_diffusers_version", "_name_or_path", "_use_default_values",
                          "_commit_hash"})

_CHUNK_FRAMES = 4  # diffusers encodes frame 0 alone, then chunks of 4 frames


@dataclasses.dataclass(frozen=True)
class WanVAEConfig:
    """The fields of diffusers' AutoencoderKLWan config (defaults = the Wan2.1 / Cosmos VAE)."""

    base_dim: int = 96
    decoder_base_dim: int | None = None
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()
    temperal_downsample: tuple[bool, ...] = (False, True, True)
    dropout: float = 0.0
    latents_mean: tuple[float, ...] = (
        -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
        0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
    latents_std: tuple[float, ...] = (
        2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
        3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)
    is_residual: bool = False
    in_channels: int = 3
    out_channels: int = 3
    patch_size: int | None = None
    scale_factor_temporal: int | None = 4
    scale_factor_spatial: int | None = 8

    def __post_init__(self):
        for name in ("dim_mult", "attn_scales", "temperal_downsample", "latents_mean", "latents_std"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.is_residual:
            raise ConfigError("is_residual=True (the Wan2.2 VAE) is not supported; only the Wan2.1 VAE is")
        if self.patch_size not in (None, 1):
            raise ConfigError(f"patch_size={self.patch_size} (the Wan2.2 VAE) is not supported; expected null")
        if self.attn_scales:
            raise ConfigError(f"attn_scales={list(self.attn_scales)} is not supported: diffusers' AutoencoderKLWan "
                              "cannot encode with attention in the down blocks (its WanAttentionBlock takes no "
                              "feature cache), so there is no reference to match; expected []")
        if not self.dim_mult:
            raise ConfigError("dim_mult must not be empty")
        stages = len(self.dim_mult) - 1
        if len(self.temperal_downsample) < stages:
            raise ConfigError(f"temperal_downsample has {len(self.temperal_downsample)} entries; "
                              f"dim_mult {list(self.dim_mult)} needs at least {stages}")
        if self.temporal_downsamples > 2:
            raise ConfigError(f"temperal_downsample {list(self.temperal_downsample)} halves time "
                              f"{self.temporal_downsamples} times; diffusers' 4-frame chunks allow at most 2")

    @property
    def decoder_dim(self) -> int:
        return self.base_dim if self.decoder_base_dim is None else self.decoder_base_dim

    @property
    def temporal_downsamples(self) -> int:
        """How many encoder stages halve time (downsample3d)."""
        return sum(bool(t) for t in self.temperal_downsample[:len(self.dim_mult) - 1])

    @property
    def temperal_upsample(self) -> tuple[bool, ...]:
        """Decoder stages that double time: diffusers reverses the whole temperal_downsample list."""
        return tuple(self.temperal_downsample[::-1])

    @property
    def spatial_factor(self) -> int:
        """H and W are divided by this (2 per encoder stage)."""
        return 2 ** (len(self.dim_mult) - 1)

    @property
    def chunk_frames(self) -> int:
        return _CHUNK_FRAMES

    @property
    def latent_frames_per_chunk(self) -> int:
        return _CHUNK_FRAMES >> self.temporal_downsamples

    def latent_frames(self, frames: int) -> int:
        """Latent frames for a clip of `frames` frames: 1 + (T-1)//4 chunks; trailing frames are dropped."""
        return 1 + ((frames - 1) // _CHUNK_FRAMES) * self.latent_frames_per_chunk

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> WanVAEConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known - _BOOKKEEPING)
        if unknown:
            raise ConfigError(f"unknown field(s) {unknown} in the AutoencoderKLWan config")
        class_name = raw.get("_class_name", "AutoencoderKLWan")
        if class_name != "AutoencoderKLWan":
            raise ConfigError(f"config is for {class_name!r}, expected 'AutoencoderKLWan'")
        return cls(**{k: v for k, v in raw.items() if k in known})

    @classmethod
    def from_json_file(cls, path: str) -> WanVAEConfig:
        """A config.json (or a directory holding one)."""
        return read_json_config(path, cls.from_dict)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for name in ("dim_mult", "attn_scales", "temperal_downsample", "latents_mean", "latents_std"):
            out[name] = list(out[name])
        return {"_class_name": "AutoencoderKLWan", **out}
