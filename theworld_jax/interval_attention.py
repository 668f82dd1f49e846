"""Exact attention under Gemma 3's mask from plain fused-attention calls (cuDNN flash on GPU).

For one padded sequence attending to itself, with each row's real tokens contiguous and bidirectional
blocks contiguous, the mask rule of attention.py lets every real query t see ONE contiguous key range

    [max(first, t - W + 1), end),   end = the end of t's block for a block query, else t + 1

(`first`: the row's first real token; no window: from `first`). So, per layer:
1. roll each row left by `first` and pad the length to a multiple of `multiple` (cuDNN's backward refuses
   some lengths, e.g. 4,399): rolled position p holds token first + p, the real tokens fill [0, count),
   and causal attention from a real query never reaches a padding key;
2. main call: causal (+ window) attention over every rolled query; exact outside the blocks;
3. block rows recomputed, one batched call per group of equal bounds in `Layout.blocks` (slot r holds
   each row's r-th longest block, padded to its bound L):
   - no window: queries [s, s + L) against all keys with key_value_seq_lengths = block end e;
   - window W: the block reversed: problem position j < W - 1 is a dummy query, j = W - 1 + i holds
     query e - 1 - i, key j holds token e - 1 - j; top-left causality then lets query e - 1 - i see keys
     down to e - i - W, and key_value_seq_lengths = e keeps positions before the row's start out;
   their outputs replace the main call's rows of those queries (whose gradient is then zero);
4. roll back; padding queries get zeros, rows that break the `Layout` get NaN.
Gradients come from the kernel's own backward: no log-sum-exp merge is needed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from theworld_jax.attention import AttentionMask


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _rows(x: jax.Array, index: jax.Array) -> jax.Array:
    """x (B, T, ...) gathered along T at index (B, P) -> (B, P, ...)."""
    return jnp.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 2)), axis=1)


def block_plan(mask: AttentionMask) -> dict[str, jax.Array]:
    """Per row: first real token, real count, each slot's block (begin, length), the slot of each
    position (-1: none) and `ok` (the row fits the mask's Layout)."""
    valid, slots = mask.k_valid, len(mask.layout.blocks)
    b, t = valid.shape
    pos = jnp.arange(t, dtype=jnp.int32)[None]
    count = jnp.sum(valid, axis=1, dtype=jnp.int32)
    first = jnp.where(count > 0, jnp.argmax(valid, axis=1), 0).astype(jnp.int32)
    ok = jnp.all(valid == ((pos >= first[:, None]) & (pos < (first + count)[:, None])), axis=1)
    block = jnp.where(valid, mask.q_block, 0)
    before = jnp.pad(block, ((0, 0), (1, 0)))[:, :-1]
    starts = (block > 0) & (block != before)
    run = jnp.where(block > 0, jnp.cumsum(starts, axis=1, dtype=jnp.int32), 0)  # 1, 2, ... per row
    ok &= jnp.all(jnp.where(starts, block > jax.lax.cummax(before, axis=1), True), axis=1)  # one run per id
    ok &= jnp.max(run, axis=1) <= slots
    plan = dict(first=first, count=count, ok=ok, slot=jnp.full((b, t), -1, jnp.int32))
    if slots == 0:
        return plan
    member = run[:, :, None] == jnp.arange(1, slots + 1, dtype=jnp.int32)  # (B, T, runs)
    length = jnp.sum(member, axis=1, dtype=jnp.int32)
    begin = jnp.argmax(member, axis=1).astype(jnp.int32)
    li, lj = length[:, :, None], length[:, None, :]
    i, j = np.arange(slots)[:, None], np.arange(slots)[None, :]
    rank = jnp.sum((lj > li) | ((lj == li) & (j < i)), axis=2, dtype=jnp.int32)  # longest first -> slot
    chosen = rank[:, None, :] == jnp.arange(slots)[None, :, None]  # (B, slot, run)
    plan["length"] = jnp.sum(jnp.where(chosen, length[:, None], 0), axis=2)
    plan["begin"] = jnp.sum(jnp.where(chosen, begin[:, None], 0), axis=2)
    plan["ok"] = ok & jnp.all(plan["length"] <= jnp.asarray(mask.layout.blocks, jnp.int32), axis=1)
    plan["slot"] = jnp.where(run > 0, jnp.take_along_axis(rank, jnp.clip(run - 1, 0, slots - 1), axis=1), -1)
    return plan


def interval_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask, *, window: int | None,
                       scale: float, backend: str = "cudnn", multiple: int = 128) -> jax.Array:
    """q (B,T,N,H), k/v (B,T,K,H), `mask` a self-attention mask with a Layout -> (B,T,N,H) in q.dtype.

    backend: jax.nn.dot_product_attention's implementation ("cudnn"; "xla" runs the same logic on CPU).
    """
    b, t, n, h = q.shape
    if window is not None and window >= t:
        window = None  # the window holds every earlier key
    plan = block_plan(mask)
    first, count = plan["first"], plan["count"]
    tp = _round_up(t, multiple)
    roll = (jnp.arange(tp, dtype=jnp.int32)[None] + first[:, None]) % t  # rolled p <- token first + p
    qr, kr, vr = (_rows(x, roll) for x in (q, k, v))
    attend = lambda q_, k_, v_, **kw: jax.nn.dot_product_attention(q_, k_, v_, scale=scale, implementation=backend,
                                                                   **kw)
    out = attend(qr, kr, vr, is_causal=True, local_window_size=None if window is None else (window - 1, 0))
    p = jnp.arange(tp, dtype=jnp.int32)[None]
    slot_of = jnp.where(p < count[:, None], _rows(plan["slot"], roll), -1)  # (B, tp)
    bounds = mask.layout.blocks
    for bound in sorted(set(bounds), reverse=True):
        group = [r for r, x in enumerate(bounds) if x == bound]
        out = _recompute_group(out, qr, kr, vr, plan, group, bound, slot_of, attend, window, multiple)
    back = (jnp.arange(t, dtype=jnp.int32)[None] - first[:, None]) % t
    out = jnp.where(mask.k_valid[:, :, None, None], _rows(out, back), jnp.zeros((), out.dtype))
    return jnp.where(plan["ok"][:, None, None, None], out, jnp.asarray(jnp.nan, out.dtype))


def _recompute_group(out, qr, kr, vr, plan, group, bound, slot_of, attend, window, multiple):
    """Replace the rows of the blocks in slots `group` (bound `bound`) by their exact attention."""
    b, tp, n, h = qr.shape
    g = len(group)
    first = plan["first"][:, None]
    s = plan["begin"][:, group] - first  # (B, g) rolled block starts
    e = s + plan["length"][:, group]  # (B, g) rolled block ends
    flat = lambda x: x.reshape((b * g,) + x.shape[2:])
    if window is None:
        size = _round_up(bound, multiple)
        j = jnp.arange(size, dtype=jnp.int32)
        qb = _rows(qr, jnp.clip(s[..., None] + j, 0, tp - 1).reshape(b, g * size))
        kb, vb = (jnp.repeat(x, g, axis=0) for x in (kr, vr))
        ob = attend(flat(qb.reshape(b, g, size, n, h)), kb, vb, key_value_seq_lengths=flat(jnp.maximum(e, 1)))
    else:
        size = _round_up(bound + window - 1, multiple)
        j = jnp.arange(size, dtype=jnp.int32)
        i = j - (window - 1)
        dummy = (i < 0) | (i >= bound)
        qb = _rows(qr, jnp.clip(e[..., None] - 1 - i, 0, tp - 1).reshape(b, g * size))
        qb = jnp.where(jnp.tile(dummy, g)[None, :, None, None], jnp.zeros((), qb.dtype), qb)
        src = jnp.clip(e[..., None] - 1 - j, 0, tp - 1).reshape(b, g * size)
        kb, vb = (flat(_rows(x, src).reshape((b, g, size) + x.shape[2:])) for x in (kr, vr))
        ob = attend(flat(qb.reshape(b, g, size, n, h)), kb, vb, is_causal=True,
                    key_value_seq_lengths=flat(jnp.clip(e, 1, size)))
    hit = slot_of[..., None] == jnp.asarray(group, jnp.int32)  # (B, tp, g)
    which = jnp.argmax(hit, axis=-1).astype(jnp.int32)
    s_p, e_p = jnp.take_along_axis(s, which, axis=1), jnp.take_along_axis(e, which, axis=1)
    p = jnp.arange(tp, dtype=jnp.int32)[None]
    row = p - s_p if window is None else window - 1 + (e_p - 1 - p)
    index = jnp.clip(which * size + row, 0, g * size - 1)
    mine = _rows(ob.reshape(b, g * size, n, h), index)
    return jnp.where(jnp.any(hit, axis=-1)[..., None, None], mine, out)
