"""The Wan2.1 VAE (= the Cosmos-Predict2 VAE) in Flax NNX, channels-last, as diffusers computes it.

`CosmosVAE.encode` maps a video (B, T, H, W, 3) in [-1, 1] to the posterior mean
(B, 1 + (T-1)//4, H/8, W/8, z_dim): frame 0 alone (the exact 2D path), then chunks of 4 frames in a
`lax.scan` that carries the causal feature cache; trailing frames that do not fill a chunk are dropped,
as in diffusers. `CosmosVAE.decode` decodes latent frame by latent frame the same way and clamps to [-1, 1].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from theworld_jax.config.wan_vae import WanVAEConfig
from theworld_jax.jit import jit_module
from theworld_jax.modeling.wan_blocks import (CausalConv3d, Downsample, FeatCache, MidBlock,
                                              ResidualBlock, Upsample, WanRMSNorm)

_CONV3 = (3, 3, 3)
_POINT = (1, 1, 1)


class Encoder(nnx.Module):
    """WanEncoder3d: (B, t, H, W, Cin) -> (B, t', H/f, W/f, 2 z_dim), one step of the chunk loop."""

    def __init__(self, cfg: WanVAEConfig, *, dtype, rngs: nnx.Rngs):
        dims = [cfg.base_dim * m for m in (1, *cfg.dim_mult)]
        self.conv_in = CausalConv3d(cfg.in_channels, dims[0], _CONV3, dtype=dtype, rngs=rngs)
        blocks = []
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
            for j in range(cfg.num_res_blocks):
                blocks.append(ResidualBlock(cin if j == 0 else cout, cout, dtype=dtype, rngs=rngs))
            if i != len(cfg.dim_mult) - 1:
                blocks.append(Downsample(cout, bool(cfg.temperal_downsample[i]), dtype=dtype, rngs=rngs))
        self.down_blocks = nnx.List(blocks)
        self.mid_block = MidBlock(dims[-1], dtype=dtype, rngs=rngs)
        self.norm_out = WanRMSNorm(dims[-1], dtype=dtype, rngs=rngs)
        self.conv_out = CausalConv3d(dims[-1], 2 * cfg.z_dim, _CONV3, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, cache: FeatCache) -> jax.Array:
        x = self.conv_in(x, cache)
        for block in self.down_blocks:
            x = block(x, cache)
        x = self.mid_block(x, cache)
        return self.conv_out(jax.nn.silu(self.norm_out(x)), cache)


class UpBlock(nnx.Module):
    """WanUpBlock: num_res_blocks + 1 residual blocks, then an optional upsampler."""

    def __init__(self, cin: int, cout: int, num_res_blocks: int, upsample: str | None, *, dtype, rngs):
        self.resnets = nnx.List([ResidualBlock(cin if j == 0 else cout, cout, dtype=dtype, rngs=rngs)
                                 for j in range(num_res_blocks + 1)])
        self.upsamplers = None if upsample is None else nnx.List(
            [Upsample(cout, upsample == "upsample3d", dtype=dtype, rngs=rngs)])

    def __call__(self, x: jax.Array, cache: FeatCache) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x, cache)
        return x if self.upsamplers is None else self.upsamplers[0](x, cache)


class Decoder(nnx.Module):
    """WanDecoder3d: (B, t, h, w, z_dim) -> (B, t', h*f, w*f, Cout), one step of the frame loop."""

    def __init__(self, cfg: WanVAEConfig, *, dtype, rngs: nnx.Rngs):
        dims = [cfg.decoder_dim * m for m in (cfg.dim_mult[-1], *cfg.dim_mult[::-1])]
        self.conv_in = CausalConv3d(cfg.z_dim, dims[0], _CONV3, dtype=dtype, rngs=rngs)
        self.mid_block = MidBlock(dims[0], dtype=dtype, rngs=rngs)
        blocks = []
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
            cin = cin // 2 if i > 0 else cin
            mode = None
            if i != len(cfg.dim_mult) - 1:
                mode = "upsample3d" if cfg.temperal_upsample[i] else "upsample2d"
            blocks.append(UpBlock(cin, cout, cfg.num_res_blocks, mode, dtype=dtype, rngs=rngs))
        self.up_blocks = nnx.List(blocks)
        self.norm_out = WanRMSNorm(dims[-1], dtype=dtype, rngs=rngs)
        self.conv_out = CausalConv3d(dims[-1], cfg.out_channels, _CONV3, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, cache: FeatCache) -> jax.Array:
        x = self.mid_block(self.conv_in(x, cache), cache)
        for block in self.up_blocks:
            x = block(x, cache)
        return self.conv_out(jax.nn.silu(self.norm_out(x)), cache)


def _causal_loop(step, first: jax.Array, rest: jax.Array) -> jax.Array:
    """Run `step(x, FeatCache)` on `first` (B, 1, ...) alone, then scan it over `rest` (n, B, t, ...)
    with the cache as carry; the outputs are concatenated along time."""
    cache = FeatCache()
    out = step(first, cache)
    if rest.shape[0] == 0:
        return out

    def body(carry, x):
        c = FeatCache(carry)
        y = step(x, c)
        return c.new, y

    _, ys = jax.lax.scan(body, cache.new, rest)
    ys = jnp.moveaxis(ys, 0, 1)
    return jnp.concatenate([out, ys.reshape(ys.shape[0], -1, *ys.shape[3:])], axis=1)


class CosmosVAE(nnx.Module):
    """diffusers AutoencoderKLWan: encoder + quant_conv, post_quant_conv + decoder. Channels-last.

    Loading and export: theworld_jax.CosmosVAE (from_pretrained, save_pretrained)."""

    def __init__(self, config: WanVAEConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.dtype = dtype
        z = config.z_dim
        self.encoder = Encoder(config, dtype=dtype, rngs=rngs)
        self.quant_conv = CausalConv3d(2 * z, 2 * z, _POINT, dtype=dtype, rngs=rngs)
        self.post_quant_conv = CausalConv3d(z, z, _POINT, dtype=dtype, rngs=rngs)
        self.decoder = Decoder(config, dtype=dtype, rngs=rngs)

    def encode(self, video) -> jax.Array:
        """video (B, T, H, W, 3) in [-1, 1] -> posterior mean (B, 1+(T-1)//4, H/f, W/f, z_dim), jitted."""
        return jit_module(CosmosVAE.encode_mean, self)(self._check_video(video))

    def decode(self, latents) -> jax.Array:
        """latents (B, T', h, w, z_dim) -> video (B, 1+4(T'-1), h*f, w*f, 3) clamped to [-1, 1], jitted."""
        return jit_module(CosmosVAE.decode_frames, self)(self._check_latents(latents))

    def encode_mean(self, x: jax.Array) -> jax.Array:
        """The traceable encode (no input checks, no jit); x (B, T, H, W, Cin)."""
        cfg = self.config
        b, t, h, w, c = x.shape
        n, k = (t - 1) // cfg.chunk_frames, cfg.chunk_frames
        rest = jnp.moveaxis(x[:, 1:1 + n * k].reshape(b, n, k, h, w, c), 1, 0)
        moments = _causal_loop(self.encoder, x[:, :1], rest)
        kernel = self.quant_conv.kernel[...][0, 0, 0, :, :cfg.z_dim].astype(moments.dtype)
        return moments @ kernel + self.quant_conv.bias[...][:cfg.z_dim].astype(moments.dtype)

    def decode_frames(self, z: jax.Array) -> jax.Array:
        """The traceable decode (no input checks, no jit); z (B, T', h, w, z_dim)."""
        x = self.post_quant_conv(z)
        rest = jnp.moveaxis(x[:, 1:, None], 1, 0)
        return jnp.clip(_causal_loop(self.decoder, x[:, :1], rest), -1.0, 1.0)

    def _check_video(self, video) -> jax.Array:
        cfg, f = self.config, self.config.spatial_factor
        shape = tuple(np.shape(video))
        expected = f"(B, T, H, W, {cfg.in_channels}) with H and W multiples of {f}"
        if len(shape) != 5:
            raise ValueError(f"video must have rank 5 {expected}; got shape {shape}")
        if shape[-1] != cfg.in_channels:
            hint = " (channels-first input? transpose to channels-last)" if shape[1] == cfg.in_channels else ""
            raise ValueError(f"video must be {expected}; got {shape[-1]} channels in shape {shape}{hint}")
        if 0 in shape:
            raise ValueError(f"video must be {expected} with B, T >= 1; got an empty shape {shape}")
        if shape[2] % f or shape[3] % f:
            raise ValueError(f"video must be {expected}; got H={shape[2]}, W={shape[3]}")
        dtype = np.dtype(getattr(video, "dtype", np.float32))
        if not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(f"video must be floating point in [-1, 1]; got dtype {dtype} "
                             "(use theworld_jax.inputs.prepare_video for uint8 images)")
        used = 1 + (shape[1] - 1) // cfg.chunk_frames * cfg.chunk_frames  # diffusers drops the rest
        return jnp.asarray(video if used == shape[1] else video[:, :used], self.dtype)

    def _check_latents(self, latents) -> jax.Array:
        z = self.config.z_dim
        shape = tuple(np.shape(latents))
        if len(shape) != 5 or shape[-1] != z or 0 in shape:
            raise ValueError(f"latents must be (B, T', h, w, {z}) with B, T' >= 1; got shape {shape}")
        return jnp.asarray(latents, self.dtype)
