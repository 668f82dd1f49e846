"""Exact attention under Gemma 3's mask from plain fused-attention calls (cuDNN flash on GPU).

For one padded sequence attending to itself, with each row's real tokens contiguous and bidirectional
blocks contiguous, the mask rule of attention.py lets every real query t see ONE contiguous key range

    [max(first, t - W + 1), end),   end = the end of t's block for a block query, else t + 1

(`first`: the row's first real token; no window: from `first`). So, per layer:
1. roll each row left by `first` and pad the length to a multiple of `multiple` (cuDNN's backward refuses
   some lengths, e.g. 4,399): rolled position p holds token first + p, the real tokens fill [0, count),
   and causal attention from a real query never reaches a padding key (a `Layout` without left padding
   skips the roll: in XLA:GPU's H200 compile of the batch-1 training step, 6.0 -> 4.6 GiB of copies);
2. main call: causal (+ window) attention over every rolled query; exact outside the blocks;
3. block rows recomputed, one batched call per group of equal bounds in `Layout.blocks` (slot r holds
   each row's r-th longest block, padded to its bound L):
   - no window: queries [s, s + L) against all keys with key_value_seq_lengths = block end e;
   - window W, blocks at least W - 1 tokens past their row's start (`Layout.block_start`): a band.
     Problem query m holds token e - L + m, key j holds token e - L - W + 1 + j; a left bound without a
     causal mask (key j >= query m: cuDNN's sliding window of 1 with is_causal=False) and
     key_value_seq_lengths = L + W - 1 give query t the keys [t - W + 1, e), with no dummy queries;
   - window W otherwise: the block reversed: problem position j < W - 1 is a dummy query, j = W - 1 + i
     holds query e - 1 - i, key j holds token e - 1 - j; top-left causality then lets query e - 1 - i see
     keys down to e - i - W, and key_value_seq_lengths = e keeps positions before the row's start out;
   their outputs replace the main call's rows of those queries (whose gradient is then zero);
4. roll back; padding queries get zeros, rows that break the `Layout` get NaN.
Gradients come from the kernel's own backward: no log-sum-exp merge is needed. Every move of rows is a
per-row dynamic slice or dynamic-update-slice (a copy forward, a copy backward); gathers along the
sequence would turn into scatter-adds in the backward pass.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from theworld_jax.attention import AttentionMask


# The cuDNN calls' lengths are padded to a multiple of this; a training batch padded to it needs no more.
CUDNN_MULTIPLE = 128


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _window(x: jax.Array, start: jax.Array, length: int) -> jax.Array:
    """x (B, T, ...), start (B,) int -> (B, length, ...): row b holds x[b, start[b] + j], zeros where
    start[b] + j falls outside [0, T). start must lie in [-length, T]."""
    b = x.shape[0]
    pad = [(0, 0), (length, length)] + [(0, 0)] * (x.ndim - 2)
    padded = jnp.pad(x, pad)
    rest = (0,) * (x.ndim - 2)
    size = (1, length) + x.shape[2:]
    return jnp.concatenate([jax.lax.dynamic_slice(padded, (i, start[i] + length) + rest, size) for i in range(b)])


def _pad_length(x: jax.Array, length: int) -> jax.Array:
    """x (B, T, ...) -> (B, length, ...), zeros after T (x itself when T == length)."""
    if x.shape[1] == length:
        return x
    return jnp.pad(x, [(0, 0), (0, length - x.shape[1])] + [(0, 0)] * (x.ndim - 2))


def _write(out: jax.Array, rows: jax.Array, start: jax.Array, keep: jax.Array) -> jax.Array:
    """out (B, T, ...) with rows (B, L, ...) written at positions start[b] + j where keep (B, L) holds;
    positions outside [0, T) are dropped. start must lie in [-L, T]."""
    b, length = rows.shape[:2]
    pad = [(0, 0), (length, length)] + [(0, 0)] * (out.ndim - 2)
    padded = jnp.pad(out, pad)
    rest = (0,) * (out.ndim - 2)
    for i in range(b):
        at = (i, start[i] + length) + rest
        region = jax.lax.dynamic_slice(padded, at, (1,) + rows.shape[1:])
        padded = jax.lax.dynamic_update_slice(padded, _select(keep[i:i + 1], rows[i:i + 1], region), at)
    return padded[:, length:length + out.shape[1]]


def block_plan(mask: AttentionMask) -> dict[str, jax.Array]:
    """Per row: first real token, real count, each slot's block (begin, length; slots a row does not
    fill have length 0) and `ok` (the row fits the mask's Layout)."""
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
    plan = dict(first=first, count=count, ok=ok)
    if slots == 0:
        return plan
    member = run[:, :, None] == jnp.arange(1, slots + 1, dtype=jnp.int32)  # (B, T, runs)
    length = jnp.sum(member, axis=1, dtype=jnp.int32)
    begin = jnp.where(length > 0, jnp.argmax(member, axis=1), first[:, None]).astype(jnp.int32)
    li, lj = length[:, :, None], length[:, None, :]
    i, j = np.arange(slots)[:, None], np.arange(slots)[None, :]
    rank = jnp.sum((lj > li) | ((lj == li) & (j < i)), axis=2, dtype=jnp.int32)  # longest first -> slot
    chosen = rank[:, None, :] == jnp.arange(slots)[None, :, None]  # (B, slot, run)
    plan["length"] = jnp.sum(jnp.where(chosen, length[:, None], 0), axis=2)
    plan["begin"] = jnp.sum(jnp.where(chosen, begin[:, None], 0), axis=2)
    plan["ok"] = ok & jnp.all(plan["length"] <= jnp.asarray(mask.layout.blocks, jnp.int32), axis=1)
    return plan


def interval_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask, *, window: int | None,
                       scale: float, backend: str = "cudnn", multiple: int | None = None) -> jax.Array:
    """q (B,T,N,H), k/v (B,T,K,H), `mask` a self-attention mask with a Layout -> (B,T,N,H) in q.dtype.

    backend: jax.nn.dot_product_attention's implementation ("cudnn"; "xla" runs the same logic on CPU).
    multiple: the calls' lengths are padded to a multiple of it (default CUDNN_MULTIPLE).
    """
    multiple = multiple or CUDNN_MULTIPLE
    b, t, n, h = q.shape
    if window is not None and window >= t:
        window = None  # the window holds every earlier key
    plan = block_plan(mask)
    first, ok = plan["first"], plan["ok"]
    tp = _round_up(t, multiple)
    if mask.layout.left_padding:
        qr, kr, vr = (_window(x, first, tp) for x in (q, k, v))  # rolled p <- token first + p (zeros past T)
    else:  # every row starts at 0: no roll, only the padding to tp
        ok &= first == 0
        first = jnp.zeros_like(first)
        qr, kr, vr = (_pad_length(x, tp) for x in (q, k, v))
    attend = functools.partial(_attend, scale=scale, backend=backend)
    out = attend(qr, kr, vr, is_causal=True, local_window_size=None if window is None else (window - 1, 0))
    for slot, bound in enumerate(mask.layout.blocks):
        s = plan["begin"][:, slot] - first  # (B,) the block's rolled start
        e = s + plan["length"][:, slot]  # (B,) its rolled end
        band = window is not None and _band_serves(bound, window, multiple, mask.layout.block_start)
        if band:
            ok &= (s >= mask.layout.block_start) | (e == s)
        rows, at, keep = _block_rows(qr, kr, vr, s, e, bound, attend, window, multiple, band)
        out = _write(out, rows, at, keep)
    out = _window(out, -first, t) if mask.layout.left_padding else out[:, :t]
    out = _select(mask.k_valid, out, jnp.zeros_like(out))
    return _select(ok[:, None], out, jnp.full_like(out, jnp.nan))


@jax.custom_vjp
def _select(keep: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
    """a where keep, else b: a and b (B, T, ...) of one shape, keep (B, T) or (B, 1) bool. Its backward
    saves keep as it is: autodiff of the select saves its predicate broadcast to a's shape (B, T, N, H),
    which a program returning its VJP's residuals writes out (theworld_jax.train.staged)."""
    return jnp.where(_expand(keep, a), a, b)


def _expand(keep: jax.Array, x: jax.Array) -> jax.Array:
    return keep.reshape(keep.shape + (1,) * (x.ndim - keep.ndim))


def _select_forward(keep, a, b):
    return _select(keep, a, b), keep


def _select_backward(keep, grad):
    keep, zero = _expand(keep, grad), jnp.zeros((), grad.dtype)
    return None, jnp.where(keep, grad, zero), jnp.where(keep, zero, grad)


_select.defvjp(_select_forward, _select_backward)


def _attend(q, k, v, *, scale, backend, band=False, **kw):
    """jax.nn.dot_product_attention on `backend`; band=True: query i sees keys j >= i only (below
    key_value_seq_lengths), which cuDNN reads from a sliding window of 1 without a causal mask and
    jax.nn's XLA backend (where that window means the diagonal) gets as an explicit mask."""
    if band and backend == "cudnn":
        kw["local_window_size"] = (0, 0)
    elif band:
        kw["mask"] = (jnp.arange(k.shape[1])[None, :] >= jnp.arange(q.shape[1])[:, None])[None, None]
    return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation=backend, **kw)


def _band_serves(bound: int, window: int, multiple: int, block_start: int) -> bool:
    """Whether a sliding layer's block rows can come from the band call: every block begins W - 1 tokens
    past its row's start (no key before the row is needed), and the band's padding queries (up to the
    multiple) still see a key."""
    return block_start >= window - 1 and window - 1 >= _round_up(bound, multiple) - bound


def _block_rows(qr, kr, vr, s, e, bound, attend, window, multiple, band):
    """The exact outputs of the block [s, e) of each row (length <= bound): (rows (B, bound, N, H), the
    rolled position of rows[:, 0] (B,), which rows belong to the block (B, bound)). band: a sliding
    layer's rows from the band call (`_band_serves`), else from the reversed one."""
    j = jnp.arange(bound, dtype=jnp.int32)[None]
    if window is None:
        size = _round_up(bound, multiple)
        rows = attend(_window(qr, s, size), kr, vr, key_value_seq_lengths=jnp.maximum(e, 1))[:, :bound]
        return rows, s, j < (e - s)[:, None]
    rows_of = _band_block_rows if band else _reversed_block_rows
    rows = rows_of(qr, kr, vr, e, bound=bound, attend=attend, window=window, multiple=multiple)
    return rows, e - bound, j >= bound - (e - s)[:, None]


def _band_block_rows(qr, kr, vr, e, *, bound, attend, window, multiple):
    """rows[m] (B, bound, N, H): query e - bound + m over keys [e - bound + m - W + 1, e); exact for the
    block's queries when they lie at least W - 1 tokens past the row's start (no earlier key is needed)."""
    keys = bound + window - 1
    size = _round_up(keys, multiple)
    queries = _window(qr, e - bound, _round_up(bound, multiple))
    k, v = (_window(x, e - keys, size) for x in (kr, vr))
    lengths = jnp.full(e.shape, keys, jnp.int32)
    return attend(queries, k, v, band=True, key_value_seq_lengths=lengths)[:, :bound]


def _reversed_block_rows(qr, kr, vr, e, *, bound, attend, window, multiple):
    """rows[m] (B, bound, N, H): query e - bound + m over keys [max(0, e - bound + m - W + 1), e), from
    the block reversed behind W - 1 dummy queries (top-left causal)."""
    size = _round_up(bound + window - 1, multiple)
    flip = lambda x: jnp.flip(x, axis=1)
    queries = flip(_window(qr, e - bound, bound))
    queries = jnp.pad(queries, ((0, 0), (window - 1, size - bound - window + 1), (0, 0), (0, 0)))
    keys, values = (flip(_window(x, e - size, size)) for x in (kr, vr))
    out = attend(queries, keys, values, is_causal=True, key_value_seq_lengths=jnp.clip(e, 1, size))
    return flip(out[:, window - 1:window - 1 + bound])  # rows[m] is query e - bound + m
