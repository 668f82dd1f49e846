"""Building blocks of the Wan2.1 VAE (diffusers `autoencoder_kl_wan`), channels-last.

Activations are (B, T, H, W, C). Causal 3x3x3 convolutions see two frames of the past: zeros before the
first frame, afterwards the frames kept in a `FeatCache` from the previous step. diffusers runs the
network on frame 0 alone and then on chunks; we do the same. On the first frame every causal conv reduces
exactly to a 2D conv with the kernel's last time tap (the others only see zero padding), which is the
fast path for images.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from theworld_jax.attention import dot_product_attention
from theworld_jax.modeling.partitioning import axes, param

CACHE_FRAMES = 2  # past frames a causal 3-tap conv sees


class FeatCache:
    """The temporal caches of one network step, read and written in call order.

    `old` is None on the first frame (nothing cached: causal zero padding); otherwise it is the list
    written by the previous step. Each cached layer reads its entry and writes one to `new`, the carry
    of the next step, so the first-frame path and the chunk path write lists of the same structure.
    """

    def __init__(self, old: list[jax.Array] | None = None):
        self.old = old
        self.new: list[jax.Array] = []

    @property
    def first(self) -> bool:
        return self.old is None

    def read(self) -> jax.Array:
        return self.old[len(self.new)]

    def write(self, value: jax.Array) -> None:
        self.new.append(value)


def _conv(x: jax.Array, kernel: jax.Array, strides, padding) -> jax.Array:
    spatial = "DHW"[3 - (kernel.ndim - 2):]
    dims = (f"N{spatial}C", f"{spatial}IO", f"N{spatial}C")
    return jax.lax.conv_general_dilated(x, kernel.astype(x.dtype), strides, padding, dimension_numbers=dims)


def _per_frame(fn, x: jax.Array) -> jax.Array:
    """Apply an image function (N, H, W, C) -> (N, H', W', C') to every frame of (B, T, H, W, C)."""
    b, t = x.shape[:2]
    y = fn(x.reshape(b * t, *x.shape[2:]))
    return y.reshape(b, t, *y.shape[1:])


class CausalConv3d(nnx.Module):
    """diffusers WanCausalConv3d with kernel (kt, k, k), stride 1, padding (kt//2, k//2, k//2).

    kernel: (kt, k, k, Cin, Cout). Time is padded by kt-1 frames in front (zeros or the cache), space
    symmetrically. kt == 1 convs are pointwise and keep no cache.
    """

    def __init__(self, cin: int, cout: int, kernel: tuple[int, int, int], *, dtype, rngs: nnx.Rngs):
        init = nnx.initializers.lecun_normal()
        self.kernel = param(init(rngs.params(), (*kernel, cin, cout), dtype), ("vae",) * 5)
        self.bias = param(jnp.zeros((cout,), dtype), ("vae",))

    def __call__(self, x: jax.Array, cache: FeatCache | None = None) -> jax.Array:
        kernel = self.kernel[...]
        kt, kh, kw = kernel.shape[:3]
        pad_hw = ((kh // 2, kh // 2), (kw // 2, kw // 2))
        if kt == 1:
            y = _per_frame(lambda f: _conv(f, kernel[0], (1, 1), pad_hw), x)
        elif cache.first:
            if x.shape[1] != 1:
                raise ValueError(f"the first step takes one frame, got {x.shape[1]}")
            cache.write(jnp.concatenate([jnp.zeros_like(x)] * (CACHE_FRAMES - 1) + [x], axis=1))
            y = _per_frame(lambda f: _conv(f, kernel[-1], (1, 1), pad_hw), x)
        else:
            full = jnp.concatenate([cache.read(), x], axis=1)
            cache.write(full[:, -CACHE_FRAMES:])
            y = _conv(full, kernel, (1, 1, 1), ((0, 0), *pad_hw))
        return y + self.bias[...].astype(y.dtype)


class Conv2d(nnx.Module):
    """A per-frame 2D conv (the resample convs); kernel (k, k, Cin, Cout)."""

    def __init__(self, cin: int, cout: int, *, stride: int, padding, dtype, rngs: nnx.Rngs):
        init = nnx.initializers.lecun_normal()
        self.kernel = param(init(rngs.params(), (3, 3, cin, cout), dtype), ("vae",) * 4)
        self.bias = param(jnp.zeros((cout,), dtype), ("vae",))
        self.stride = stride
        self.padding = padding

    def __call__(self, x: jax.Array) -> jax.Array:
        stride, padding = (self.stride, self.stride), self.padding
        y = _per_frame(lambda f: _conv(f, self.kernel[...], stride, padding), x)
        return y + self.bias[...].astype(y.dtype)


class WanRMSNorm(nnx.Module):
    """WanRMS_norm: L2-normalise over channels (in float32), times sqrt(C) and gamma (C,)."""

    def __init__(self, dim: int, *, dtype, rngs: nnx.Rngs):
        self.gamma = param(jnp.ones((dim,), dtype), ("vae",))

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        norm = jnp.sqrt(jnp.sum(xf * xf, axis=-1, keepdims=True))
        normalized = (xf / jnp.maximum(norm, 1e-12)).astype(x.dtype)
        return normalized * math.sqrt(x.shape[-1]) * self.gamma[...].astype(x.dtype)


class ResidualBlock(nnx.Module):
    """WanResidualBlock: shortcut(x) + conv2(silu(norm2(conv1(silu(norm1(x))))))."""

    def __init__(self, cin: int, cout: int, *, dtype, rngs: nnx.Rngs):
        self.norm1 = WanRMSNorm(cin, dtype=dtype, rngs=rngs)
        self.conv1 = CausalConv3d(cin, cout, (3, 3, 3), dtype=dtype, rngs=rngs)
        self.norm2 = WanRMSNorm(cout, dtype=dtype, rngs=rngs)
        self.conv2 = CausalConv3d(cout, cout, (3, 3, 3), dtype=dtype, rngs=rngs)
        self.conv_shortcut = CausalConv3d(cin, cout, (1, 1, 1), dtype=dtype, rngs=rngs) if cin != cout else None

    def __call__(self, x: jax.Array, cache: FeatCache) -> jax.Array:
        h = x if self.conv_shortcut is None else self.conv_shortcut(x)
        x = self.conv1(jax.nn.silu(self.norm1(x)), cache)
        x = self.conv2(jax.nn.silu(self.norm2(x)), cache)
        return x + h


class AttentionBlock(nnx.Module):
    """WanAttentionBlock: single-head self-attention over the H*W positions of each frame, residual.

    to_qkv.kernel (C, 3C) and proj.kernel (C, C) are the 1x1 convs as dense layers over channels.
    """

    def __init__(self, dim: int, *, dtype, rngs: nnx.Rngs):
        self.norm = WanRMSNorm(dim, dtype=dtype, rngs=rngs)
        kw = dict(dtype=dtype, param_dtype=dtype, rngs=rngs, kernel_metadata=axes("vae", "vae"),
                  bias_metadata=axes("vae"))
        self.to_qkv = nnx.Linear(dim, 3 * dim, **kw)
        self.proj = nnx.Linear(dim, dim, **kw)

    def __call__(self, x: jax.Array, cache: FeatCache | None = None) -> jax.Array:
        b, t, h, w, c = x.shape
        q, k, v = jnp.split(self.to_qkv(self.norm(x)).reshape(b * t, h * w, 1, 3 * c), 3, axis=-1)
        out = dot_product_attention(q, k, v, None, window=None, scale=1 / math.sqrt(c))
        return x + self.proj(out).reshape(b, t, h, w, c)


class MidBlock(nnx.Module):
    """WanMidBlock: resnet, attention, resnet."""

    def __init__(self, dim: int, *, dtype, rngs: nnx.Rngs):
        self.resnets = nnx.List([ResidualBlock(dim, dim, dtype=dtype, rngs=rngs) for _ in range(2)])
        self.attentions = nnx.List([AttentionBlock(dim, dtype=dtype, rngs=rngs)])

    def __call__(self, x: jax.Array, cache: FeatCache) -> jax.Array:
        x = self.resnets[0](x, cache)
        return self.resnets[1](self.attentions[0](x), cache)


class Downsample(nnx.Module):
    """WanResample downsample2d/3d: zero-pad right/bottom, 3x3 stride-2 conv per frame; in 3d mode then
    time_conv (3, 1, 1) stride 2 over (the cached last frame, this chunk). The first frame skips it."""

    def __init__(self, dim: int, temporal: bool, *, dtype, rngs: nnx.Rngs):
        self.resample = Conv2d(dim, dim, stride=2, padding=((0, 1), (0, 1)), dtype=dtype, rngs=rngs)
        self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), dtype=dtype, rngs=rngs) if temporal else None

    def __call__(self, x: jax.Array, cache: FeatCache) -> jax.Array:
        x = self.resample(x)
        if self.time_conv is None:
            return x
        if cache.first:
            cache.write(x[:, -1:])
            return x
        full = jnp.concatenate([cache.read(), x], axis=1)
        cache.write(x[:, -1:])
        y = _conv(full, self.time_conv.kernel[...], (2, 1, 1), ((0, 0), (0, 0), (0, 0)))
        return y + self.time_conv.bias[...].astype(y.dtype)


class Upsample(nnx.Module):
    """WanResample upsample2d/3d: in 3d mode first time_conv (3, 1, 1) C -> 2C, whose halves become two
    frames (skipped on the first frame, whose cache starts as zeros); then nearest 2x and a 3x3 conv
    C -> C/2 per frame."""

    def __init__(self, dim: int, temporal: bool, *, dtype, rngs: nnx.Rngs):
        self.resample = Conv2d(dim, dim // 2, stride=1, padding=((1, 1), (1, 1)), dtype=dtype, rngs=rngs)
        self.time_conv = CausalConv3d(dim, 2 * dim, (3, 1, 1), dtype=dtype, rngs=rngs) if temporal else None

    def __call__(self, x: jax.Array, cache: FeatCache) -> jax.Array:
        if self.time_conv is not None:
            if cache.first:
                cache.write(jnp.zeros((*x.shape[:1], CACHE_FRAMES, *x.shape[2:]), x.dtype))
            else:
                b, t, h, w, c = x.shape
                y = self.time_conv(x, cache)
                x = y.reshape(b, t, h, w, 2, c).transpose(0, 1, 4, 2, 3, 5).reshape(b, 2 * t, h, w, c)
        x = jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)
        return self.resample(x)
