"""Attention of one new token per row over a KV cache, as one fused GPU kernel (Pallas, Triton backend).

XLA's decode attention is five kernels per layer (q.k products, the softmax's max, its sum, the
probabilities, probabilities.v), each small and latency-bound. Here one kernel reads each cached key and
value once and keeps an online softmax (flash decoding): a program per (row, KV head, slice of the
slots), then a second kernel per (row, KV head) combines the slices' partial results. The mask is the
cache's own: a slot holds the sequence index of its token (-1 = empty or padding), and the query at
index q sees the slots with 0 <= index <= q (and index > q - window on sliding layers):
`AttentionMask.allowed` for cached keys, which carry no bidirectional block.

Numerics: q.k and p.v accumulate in float32 (the XLA oracle's precision), the scores and the softmax
are float32, the probabilities enter p.v in the value dtype as in the oracle; only the order of the
sums differs (online softmax). A row whose query sees no slot gets zeros, as in the oracle.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

# Slots per inner step of a program, Triton's warps and pipeline stages, and the programs the slice
# count aims at (about two per streaming multiprocessor of an H200).
BLOCK_SLOTS = 64
NUM_WARPS = 4
NUM_STAGES = 2
TARGET_PROGRAMS = 264
# Run the kernel in Pallas's interpreter, in any dtype (CPU tests of the dispatch through the model).
INTERPRET = False
# tl.dot's smallest row count: the query heads of one KV head are loaded into this many rows (masked).
_ROWS = 16


def supports(q: jax.Array, k: jax.Array) -> bool:
    """Whether the kernel serves q (B,1,N,H) over a cache k (B,K,S,H) on this backend."""
    b, t, n, h = q.shape
    group = n // k.shape[1]
    on_device = jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)
    return ((INTERPRET or on_device) and t == 1 and k.dtype == q.dtype and h in (16, 32, 64, 128, 256)
            and n % k.shape[1] == 0 and group in (1, 2, 4, 8, 16) and k.shape[2] % BLOCK_SLOTS == 0)


def slices_for(batch: int, kv_heads: int, slots: int) -> int:
    """How many slices the slots are cut into: the fewest (a divisor of the block count) that give
    TARGET_PROGRAMS programs, or one block per slice."""
    blocks = slots // BLOCK_SLOTS
    for count in range(1, blocks + 1):
        if blocks % count == 0 and batch * kv_heads * count >= TARGET_PROGRAMS:
            return count
    return blocks


def _kernel(qi_ref, q_ref, k_ref, v_ref, index_ref, o_ref, m_ref, l_ref, *, group: int, scale: float,
            window: int | None, block: int):
    """One (row, KV head, slice): q_ref (R,H) over the group's G heads, k/v_ref (C,H), index_ref (C,),
    qi_ref (1,) -> unnormalised output o (R,H), running max m (R,) and sum l (R,) (rows < G stored)."""
    heads = jnp.arange(_ROWS) < group
    q = plgpu.load(q_ref, mask=heads[:, None], other=0.0)
    qi = qi_ref[...]
    head_dim = q.shape[-1]

    def step(i, carry):
        o, m, l = carry
        slots = pl.ds(pl.multiple_of(i * block, block), block)
        s = plgpu.dot(q, k_ref[slots, :], trans_b=True) * scale  # (R, block) float32
        index = index_ref[slots]
        seen = (index >= 0) & (index <= qi)
        if window is not None:
            seen &= index > qi - window
        s = jnp.where(seen[None, :], s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        p = jnp.exp(s - m_new[:, None])
        alpha = jnp.exp(m - m_new)
        o = alpha[:, None] * o + plgpu.dot(p.astype(v_ref.dtype), v_ref[slots, :])
        return o, m_new, alpha * l + jnp.sum(p, axis=1)

    init = (jnp.zeros((_ROWS, head_dim), jnp.float32), jnp.full((_ROWS,), jnp.finfo(jnp.float32).min),
            jnp.zeros((_ROWS,), jnp.float32))
    o, m, l = jax.lax.fori_loop(0, k_ref.shape[0] // block, step, init)
    plgpu.store(o_ref, o, mask=heads[:, None])
    plgpu.store(m_ref, m, mask=heads)
    plgpu.store(l_ref, l, mask=heads)


def decode_attention(q: jax.Array, k: jax.Array, v: jax.Array, index: jax.Array, q_index: jax.Array, *,
                     window: int | None, scale: float) -> jax.Array:
    """q (B,1,N,H); k/v (B,K,S,H) the cache as stored; index (B,S) int32 each slot's token index (-1 =
    none); q_index (B,1) the new token's index -> (B,1,N,H) in q.dtype. Query head n uses KV head
    n // (N // K)."""
    b, _, n, h = q.shape
    kv_heads, slots = k.shape[1], k.shape[2]
    group = n // kv_heads
    count = slices_for(b, kv_heads, slots)
    chunk = slots // count
    kernel = functools.partial(_kernel, group=group, scale=scale, window=window, block=min(BLOCK_SLOTS, chunk))
    grid = (b, kv_heads, count)
    o, m, l = pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=[
            pl.BlockSpec((None, 1), lambda r, j, c: (r, 0)),
            pl.BlockSpec((None, None, _ROWS, h), lambda r, j, c: (r, j, 0, 0)),
            pl.BlockSpec((None, None, chunk, h), lambda r, j, c: (r, j, c, 0)),
            pl.BlockSpec((None, None, chunk, h), lambda r, j, c: (r, j, c, 0)),
            pl.BlockSpec((None, chunk), lambda r, j, c: (r, c)),
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, _ROWS, h), lambda r, j, c: (r, j, c, 0, 0)),
            pl.BlockSpec((None, None, None, _ROWS), lambda r, j, c: (r, j, c, 0)),
            pl.BlockSpec((None, None, None, _ROWS), lambda r, j, c: (r, j, c, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((b, kv_heads, count, group, h), jnp.float32),
            jax.ShapeDtypeStruct((b, kv_heads, count, group), jnp.float32),
            jax.ShapeDtypeStruct((b, kv_heads, count, group), jnp.float32),
        ],
        compiler_params=plgpu.CompilerParams(num_warps=NUM_WARPS, num_stages=NUM_STAGES),
        interpret=INTERPRET,
        name="decode_attention",
    )(q_index.astype(jnp.int32), q.reshape(b, kv_heads, group, h), k, v, index.astype(jnp.int32))
    padded = pl.next_power_of_2(count)
    out = pl.pallas_call(
        functools.partial(_combine_kernel, count=count),
        grid=(b, kv_heads),
        in_specs=[pl.BlockSpec((None, None, padded, group, h), lambda r, j: (r, j, 0, 0, 0)),
                  pl.BlockSpec((None, None, padded, group), lambda r, j: (r, j, 0, 0)),
                  pl.BlockSpec((None, None, padded, group), lambda r, j: (r, j, 0, 0))],
        out_specs=pl.BlockSpec((None, None, group, h), lambda r, j: (r, j, 0, 0)),
        out_shape=jax.ShapeDtypeStruct((b, kv_heads, group, h), q.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=NUM_WARPS, num_stages=1),
        interpret=INTERPRET,
        name="decode_attention_combine",
    )(o, m, l)
    return out.reshape(b, 1, n, h)


def _combine_kernel(o_ref, m_ref, l_ref, out_ref, *, count: int):
    """One (row, KV head): the C slices' o (C,G,H), m (C,G), l (C,G) (rows past `count` masked) -> the
    normalised output (G,H). A slice that saw no slot has l = 0; a row that saw none gets zeros."""
    used = jnp.arange(o_ref.shape[0]) < count
    m = plgpu.load(m_ref, mask=used[:, None], other=-jnp.inf)
    weight = jnp.exp(m - jnp.max(m, axis=0)[None, :])  # (C,G)
    total = jnp.sum(weight * plgpu.load(l_ref, mask=used[:, None], other=0.0), axis=0)
    o = jnp.sum(weight[:, :, None] * plgpu.load(o_ref, mask=used[:, None, None], other=0.0), axis=0)
    out_ref[...] = (o / jnp.where(total > 0, total, 1.0)[:, None]).astype(out_ref.dtype)
