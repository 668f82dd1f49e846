"""Gemma building blocks: (1 + w) RMSNorm, einsum projections, positions and rotary embedding, gated MLP.

Weights are stored in `param_dtype` and used in `dtype`; shapes are in the model's own axis order.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from theworld_jax.config.gemma3 import RopeConfig
from theworld_jax.modeling.partitioning import param


class RMSNorm(nnx.Module):
    """Gemma RMSNorm over the last axis: x * rsqrt(mean(x^2) + eps) * (1 + weight), in float32.

    `weight` (D,) is the raw HuggingFace value (zero-initialised); the result has x's dtype.
    """

    def __init__(self, dim: int, *, eps: float, param_dtype=jnp.float32):
        self.eps = eps
        self.weight = param(jnp.zeros((dim,), param_dtype), ("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.weight[...], self.eps)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """Gemma's RMSNorm of x (..., D) with the raw weight (D,), computed in float32, returned in x's dtype.

    The backward is written out (`_rms_norm_backward`) and keeps only x: left to autodiff, the forward's
    per-row 1 / rms was a value the backward read, so XLA:GPU gave it a kernel of its own and could not
    make the norm one normalisation kernel (the H200's training step: two tiny kernels per norm)."""
    x32 = x.astype(jnp.float32)
    normed = x32 * _inv_rms(x32, eps)
    return (normed * (1.0 + weight.astype(jnp.float32))).astype(x.dtype)


def _inv_rms(x32: jax.Array, eps: float) -> jax.Array:
    return jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)


def _rms_norm_forward(x, weight, eps):
    return rms_norm(x, weight, eps), (x, weight)


def _rms_norm_backward(eps, saved, grad):
    """dx = r g - x r^3 mean(x g) with g = grad (1 + w), r = 1 / rms(x) recomputed (from x behind an
    optimization barrier, so that XLA does not reuse the forward's); dw = sum of grad x r over rows."""
    x, weight = saved
    x32 = jax.lax.optimization_barrier(x).astype(jnp.float32)
    grad32 = grad.astype(jnp.float32)
    r = _inv_rms(x32, eps)
    g = grad32 * (1.0 + weight.astype(jnp.float32))
    dx = r * g - x32 * (r * r * r) * jnp.mean(x32 * g, axis=-1, keepdims=True)
    dw = jnp.sum((grad32 * (x32 * r)).reshape(-1, x.shape[-1]), axis=0)
    return dx.astype(x.dtype), dw.astype(weight.dtype)


rms_norm.defvjp(_rms_norm_forward, _rms_norm_backward)


class Einsum(nnx.Module):
    """A bias-free projection with a `kernel` of any shape, applied by a named einsum.

    `axes` are the kernel's logical axis names; `fan_in` is the number of input features (for the
    initialiser's scale).
    """

    def __init__(self, shape: tuple[int, ...], axes: tuple[str, ...], *, fan_in: int, dtype, param_dtype,
                 rngs: nnx.Rngs):
        self.dtype = dtype
        std = fan_in ** -0.5
        self.kernel = param(std * jax.random.truncated_normal(rngs.params(), -2.0, 2.0, shape, param_dtype), axes)

    def __call__(self, equation: str, x: jax.Array) -> jax.Array:
        return jnp.einsum(equation, x.astype(self.dtype), self.kernel[...].astype(self.dtype))

    def matmul(self, x: jax.Array, contract: int) -> jax.Array:
        """x (..., *kernel.shape[:contract]) -> (..., *kernel.shape[contract:]) as one (M, K) @ (K, N).

        The contraction of the named einsum over the kernel's first `contract` axes, given to XLA as a
        plain matrix product. A product with one row (decoding at batch 1) goes in as two copies of the
        row: XLA:GPU rewrites a one-row product whose operands hold fewer than 10M values (q, k, v and o
        here) into a multiply and a reduction, several passes over the weight and several kernels where
        a matrix product reads it once; the barrier keeps it from slicing the row back out before the
        product. The two rows are a broadcast, which the GEMM fusion reads in place (a concatenation
        was one more kernel per product).
        """
        kernel = self.kernel[...].astype(self.dtype)
        k = int(np.prod(kernel.shape[:contract]))
        lead = x.shape[:x.ndim - contract]
        rows = x.astype(self.dtype).reshape(-1, k)
        single = rows.shape[0] == 1
        if single:
            rows = jnp.broadcast_to(rows, (2, k))
        y = flat_product(rows, kernel)
        if single:
            y = jax.lax.optimization_barrier(y)[:1]
        return y.reshape(*lead, *kernel.shape[contract:])


@jax.custom_vjp
def flat_product(rows: jax.Array, kernel: jax.Array) -> jax.Array:
    """rows (M, K) @ kernel (K_1, ..., N_1, ...) read as a (K, N) matrix -> (M, N).

    Its backward reads the kernel itself where autodiff of the reshape would save the reshaped kernel: a
    new array, which a program that returns its VJP's residuals (theworld_jax.train.staged) would copy
    (on an H200 every frozen q/k/v/o weight of the decoder, once per training step). rows are saved only
    when the kernel is differentiated."""
    return jnp.einsum("MK,KN->MN", rows, kernel.reshape(rows.shape[1], -1))


def _flat_product_forward(rows, kernel):
    saved_rows = rows.value if kernel.perturbed else None
    return flat_product(rows.value, kernel.value), (saved_rows, kernel.value)


def _flat_product_backward(saved, grad):
    rows, kernel = saved
    if isinstance(grad, jax.custom_derivatives.SymbolicZero):  # the product's output reached no loss
        return None, None
    matrix = kernel.reshape(-1, grad.shape[1])
    d_rows = jnp.einsum("MN,KN->MK", grad, matrix)
    d_kernel = None if rows is None else jnp.einsum("MK,MN->KN", rows, grad).reshape(kernel.shape)
    return d_rows, d_kernel


flat_product.defvjp(_flat_product_forward, _flat_product_backward, symbolic_zeros=True)


class Embedding(nnx.Module):
    """Token embedding `embedding` (V, D), unscaled as in the checkpoint; also the tied output head."""

    def __init__(self, vocab_size: int, dim: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.dtype = dtype
        table = 0.02 * jax.random.normal(rngs.params(), (vocab_size, dim), param_dtype)
        self.embedding = param(table, ("vocab", "embed"))

    def __call__(self, ids: jax.Array, scale: float) -> jax.Array:
        """ids (B, L) -> W[ids] * scale (B, L, D); the scale is rounded to float32 then to `dtype`."""
        table = self.embedding[...]
        rows = jnp.take(table, ids, axis=0).astype(self.dtype)
        return rows * jnp.asarray(np.float32(scale), self.dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        """x (B, L, D) -> x @ W^T (B, L, V), computed in `dtype`, returned in float32."""
        return tied_logits(x.astype(self.dtype), self.embedding[...].astype(self.dtype))


@jax.custom_vjp
def tied_logits(x: jax.Array, table: jax.Array) -> jax.Array:
    """x (B, L, D) @ table (V, D)^T -> (B, L, V) float32, both inputs in one dtype.

    The backward's products take the float32 cotangent in that dtype (as autocast does): left to JAX, a
    mixed product converted the whole table to float32 on every training step (2.7 GB, about 1 ms on
    an H200)."""
    return jnp.einsum("BLD,VD->BLV", x, table, preferred_element_type=jnp.float32)


def _tied_logits_forward(x, table):
    return tied_logits(x, table), (x, table)


def _tied_logits_backward(saved, grad):
    x, table = saved
    grad = grad.astype(x.dtype)
    dx = jnp.einsum("BLV,VD->BLD", grad, table, preferred_element_type=jnp.float32).astype(x.dtype)
    dtable = jnp.einsum("BLV,BLD->VD", grad, x, preferred_element_type=jnp.float32).astype(table.dtype)
    return dx, dtable


tied_logits.defvjp(_tied_logits_forward, _tied_logits_backward)


def take_rows(x: jax.Array, rows: jax.Array) -> jax.Array:
    """x (B, L, ...) at rows (B, K) int (in [0, L)) -> (B, K, ...)."""
    return jnp.take_along_axis(x, rows.reshape(rows.shape + (1,) * (x.ndim - 2)), axis=1)


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """(B, L) 0/1 mask -> positions cumsum - 1, clipped at 0 (as transformers' generate computes them)."""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> np.ndarray:
    """(head_dim // 2,) float32 inverse frequencies, computed as transformers does (float32, / factor)."""
    exponents = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    inv = np.float32(1.0) / (np.float32(rope.theta) ** exponents)
    return (inv / np.float32(rope.factor)).astype(np.float32)


def rope_tables(positions: jax.Array, rope: RopeConfig, head_dim: int, dtype) -> tuple[jax.Array, jax.Array]:
    """positions (B, L) int -> (cos, sin), each (B, L, 1, head_dim) (one row for every head), computed in
    float32, cast to dtype. The head axis is there already so that `apply_rope`'s VJP saves the tables
    themselves: a staged program (theworld_jax.train.staged) returns its VJP's residuals, and an expanded
    copy of an argument is a residual it must write out."""
    freqs = positions.astype(jnp.float32)[..., None, None] * jnp.asarray(rope_inv_freq(rope, head_dim))
    angles = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Half-split rotation. x (B, L, N, H), cos/sin (B, L, 1, H) -> (B, L, N, H)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


class GatedMLP(nnx.Module):
    """down(gelu_tanh(x @ gate) * (x @ up)). gate/up kernels (D, F), down (F, D)."""

    def __init__(self, dim: int, hidden: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = Einsum((dim, hidden), ("embed", "mlp"), fan_in=dim, **kw)
        self.up_proj = Einsum((dim, hidden), ("embed", "mlp"), fan_in=dim, **kw)
        self.down_proj = Einsum((hidden, dim), ("mlp", "embed"), fan_in=hidden, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        hidden = gelu_gated(self.gate_proj("BLD,DF->BLF", x), self.up_proj("BLD,DF->BLF", x))
        return self.down_proj("BLF,FD->BLD", hidden)


GELU_C = float(np.sqrt(2.0 / np.pi))


@jax.custom_vjp
def gelu_gated(gate: jax.Array, up: jax.Array) -> jax.Array:
    """gelu_tanh(gate) * up (B, L, F). The backward keeps only its two inputs and recomputes the gelu
    from `gate` (in float32); autodiff also kept tanh(...) of the forward, one more (B, L, F) array per
    layer to write and read back (184 MB a layer for a 4,480-token bf16 row)."""
    return jax.nn.gelu(gate, approximate=True) * up


def _gelu_gated_forward(gate, up):
    """The differentiated forward takes the gelu of `gate` behind an optimization barrier: the backward keeps
    `gate`, and XLA:GPU otherwise computed the gelu in the gate GEMM's cuBLAS epilogue, which then wrote
    `gate` a second time as an auxiliary output (GELU_AUX: 88 MiB a layer for a 4,480-token bf16 row)."""
    return jax.nn.gelu(jax.lax.optimization_barrier(gate), approximate=True) * up, (gate, up)


def _gelu_gated_backward(saved, grad):
    gate, up = saved
    x, up32, grad = gate.astype(jnp.float32), up.astype(jnp.float32), grad.astype(jnp.float32)
    t = jnp.tanh(GELU_C * (x + 0.044715 * x * x * x))
    gelu = 0.5 * x * (1.0 + t)
    slope = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * GELU_C * (1.0 + 3 * 0.044715 * x * x)
    return (grad * up32 * slope).astype(gate.dtype), (grad * gelu).astype(up.dtype)


gelu_gated.defvjp(_gelu_gated_forward, _gelu_gated_backward)
