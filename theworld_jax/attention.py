"""The one attention entry point: who may attend to whom (`AttentionMask`) and the kernels behind it.

Rule (transformers 5.24; docs/design.md, section 4), per batch row, query t and key s:

    allowed = k_valid[s] & (causal | same_block) & (window is None | k_index[s] > q_index[t] - window)
    causal = k_index[s] <= q_index[t];  same_block = (q_block[t] == k_block[s]) & (q_block[t] > 0)

Indices are token indices in the padded sequence (not RoPE positions); a KV-cache slot carries the
index of the token stored in it.

`dot_product_attention` picks its kernel (implementation=None):
- the fast exact path (`theworld_jax.interval_attention`: cuDNN flash calls only) when all of these hold:
  the default backend is a GPU, q is bfloat16/float16, head_dim <= 256 and a multiple of 8, and the mask
  is a whole padded sequence attending to itself with a static `Layout` (`make_attention_mask` gives
  one; `mask=None`, full bidirectional attention, needs none);
- otherwise the XLA einsum path (float32 logits, the numerical oracle): on CPU/TPU, in float32, for KV
  cache masks (decode steps and chunked prefill, see kv_cache.py), for masks whose token_type_ids were
  traced without a `Layout`, and for head_dim > 256 (the VAE's 384-channel mid-block attention).

`cache_attention` serves a KV cache stored heads-first: a decode step (one new token per row) on a GPU
in bfloat16/float16 takes the fused decode kernel (`theworld_jax.decode_attention`, Pallas); everything
else goes to `dot_product_attention`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

IMPLEMENTATIONS = ("xla", "cudnn")


@dataclasses.dataclass(frozen=True)
class Layout:
    """Static facts about a self-attention mask that the fast path builds on.

    The mask is one padded sequence attending to itself (q_index = k_index = arange), the real tokens of
    each row are contiguous (left and/or right padding), and the bidirectional blocks of a row, longest
    first, fit `blocks`: the r-th longest has at most blocks[r] tokens (descending). The fast path checks
    these facts on the device; a row that breaks them gets NaN outputs, never silently wrong ones.

    left_padding False: every row's real tokens also begin at position 0 (right padding or none, as in
    training batches), so the fast path attends in place instead of rolling each row to its first token.

    block_start: every block begins at least this many tokens after its row's first real token (an image
    after TheWorld's world tokens: over 4,000). Where it reaches a sliding window's W - 1, the fast path
    recomputes the block rows without dummy queries (`theworld_jax.interval_attention`). The training
    launcher sets it from its data; `block_layout` with a `window`; 0 (the default) claims nothing.
    """

    blocks: tuple[int, ...] = ()
    left_padding: bool = True
    block_start: int = 0

    def __post_init__(self):
        if any(b < 1 for b in self.blocks) or list(self.blocks) != sorted(self.blocks, reverse=True):
            raise ValueError(f"Layout.blocks must be positive lengths in descending order, got {self.blocks}")
        if self.block_start < 0:
            raise ValueError(f"Layout.block_start must be >= 0, got {self.block_start}")


@struct.dataclass
class AttentionMask:
    """Which keys each query may see. q_* are (B, T), k_* are (B, S); blocks are 0 = none."""

    q_index: jax.Array  # (B, T) int32: each query's index in the padded sequence
    k_index: jax.Array  # (B, S) int32: each key's index (a cache slot: the index of its token)
    k_valid: jax.Array  # (B, S) bool: a real token (attention_mask == 1; a cache slot: filled)
    q_block: jax.Array  # (B, T) int32: bidirectional block id of each query, 0 = none
    k_block: jax.Array  # (B, S) int32: bidirectional block id of each key, 0 = none
    layout: Layout | None = struct.field(pytree_node=False, default=None)  # None: the XLA path only
    aligned: bool = struct.field(pytree_node=False, default=False)  # every row's new tokens have row 0's indices

    def allowed(self, window: int | None) -> jax.Array:
        """(B, T, S) bool: may query t attend to key s."""
        q = self.q_index[:, :, None]
        k = self.k_index[:, None, :]
        causal = k <= q
        same_block = (self.q_block[:, :, None] == self.k_block[:, None, :]) & (self.q_block[:, :, None] > 0)
        allowed = self.k_valid[:, None, :] & (causal | same_block)
        if window is not None:
            allowed = allowed & (k > q - window)
        return allowed

    def select_queries(self, rows: jax.Array) -> AttentionMask:
        """The queries at rows (B, K) int (in [0, T)) against the same keys; no `Layout` (the fast path
        is for a sequence attending to itself)."""
        take = lambda a: jnp.take_along_axis(a, rows, axis=1)  # noqa: E731
        return self.replace(q_index=take(self.q_index), q_block=take(self.q_block), layout=None)


def block_ids(token_type_ids: jax.Array) -> jax.Array:
    """(B, L) int32 block ids: each maximal run of token_type_ids == 1 gets its own id (1, 2, ...), else 0."""
    is_block = token_type_ids == 1
    previous = jnp.pad(is_block, ((0, 0), (1, 0)))[:, :-1]
    starts = is_block & ~previous
    return jnp.where(is_block, jnp.cumsum(starts, axis=1, dtype=jnp.int32), 0)


def _is_concrete(x) -> bool:
    return x is None or not isinstance(x, jax.core.Tracer)


def block_layout(token_type_ids, attention_mask=None, *, extra_blocks: tuple[int, ...] = (),
                 multiple: int = 8, window: int | None = None) -> Layout | None:
    """The `Layout` of a batch from host values: the runs of token_type_ids == 1 (on real tokens when
    attention_mask is a host value too), plus `extra_blocks` that every row gains (e.g. the bidirectional
    world block), lengths rounded up to `multiple`; left_padding False when a host attention_mask shows
    every row starting at position 0. window: the model's sliding window W; block_start is then W - 1 when
    every run begins at least that far past its row's first real token (0 otherwise, and with extra_blocks,
    whose place is not known here): two values, so prompts keep sharing compiled programs; None: 0.
    token_type_ids None: no blocks. None when token_type_ids is traced (then only the caller knows a bound)."""
    rows: list[list[int]] = [[]]
    block_start = 0
    if token_type_ids is not None:
        if not _is_concrete(token_type_ids):
            return None
        types = np.asarray(token_type_ids) == 1
        first = np.zeros(types.shape[0], np.int64)  # each row's first real token, when known
        if attention_mask is not None and _is_concrete(attention_mask):
            real = np.asarray(attention_mask) != 0
            types &= real
            first = np.argmax(real, axis=1)
        edges = np.diff(np.pad(types.astype(np.int8), ((0, 0), (1, 1))), axis=1)
        rows = [[int(n) for n in np.nonzero(e == -1)[0] - np.nonzero(e == 1)[0]] for e in edges]
        starts = [int(np.nonzero(e == 1)[0][0] - f) for e, f in zip(edges, first) if (e == 1).any()]
        rows_begin_known = attention_mask is None or _is_concrete(attention_mask)
        if window is not None and starts and rows_begin_known and not extra_blocks and min(starts) >= window - 1:
            block_start = window - 1
    slots: list[int] = []
    for row in rows:
        for r, n in enumerate(sorted(row + [int(n) for n in extra_blocks], reverse=True)):
            if r == len(slots):
                slots.append(0)
            slots[r] = max(slots[r], -(-n // multiple) * multiple)
    return Layout(tuple(slots), left_padding=not _starts_at_zero(attention_mask), block_start=block_start)


def _starts_at_zero(attention_mask) -> bool:
    """Whether a host (B, L) attention_mask's rows all begin with a real token (rows of padding only too)."""
    if attention_mask is None or not _is_concrete(attention_mask):
        return False
    mask = np.asarray(attention_mask) != 0
    return bool(np.all(mask[:, 0] | ~mask.any(axis=1)))


def make_attention_mask(attention_mask: jax.Array, token_type_ids: jax.Array | None = None, *,
                        layout: Layout | None = None) -> AttentionMask:
    """Mask of a whole (padded) sequence attending to itself, no cache: q_index = k_index = arange(L).

    attention_mask (B, L): 1 on real tokens, 0 on padding. token_type_ids (B, L) or None: 1 on tokens of
    bidirectional blocks (image soft tokens), which then see their whole block. `layout`: the static
    block bound for the fast path; by default taken from token_type_ids when they are host values (no
    blocks when None); traced token_type_ids without a layout take the XLA path.
    """
    shape = tuple(np.shape(attention_mask))
    if len(shape) != 2:
        raise ValueError(f"attention_mask must be (batch, length), got shape {shape}")
    if token_type_ids is not None and tuple(np.shape(token_type_ids)) != shape:
        raise ValueError(f"token_type_ids has shape {tuple(np.shape(token_type_ids))}, expected the shape of "
                         f"attention_mask {shape}")
    if layout is None:
        layout = block_layout(token_type_ids, attention_mask)
    attention_mask = jnp.asarray(attention_mask)
    b, length = shape
    index = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
    blocks = jnp.zeros(shape, jnp.int32) if token_type_ids is None else block_ids(jnp.asarray(token_type_ids))
    return AttentionMask(q_index=index, k_index=index, k_valid=attention_mask.astype(bool),
                         q_block=blocks, k_block=blocks, layout=layout)


def make_decode_mask(index: jax.Array, valid: jax.Array | None = None, *, batch: int | None = None) -> AttentionMask:
    """Mask of T new tokens (no blocks) at sequence indices `index` (B, T); `valid` (B, T) bool or all-true.
    With `batch`, `index` is (T,): the same indices for every row (left-padded prompts), which lets a KV
    cache store one new token per row at one offset.

    Its k fields describe the same new tokens; a KV cache adds the keys it holds (see kv_cache.py).
    """
    index = jnp.asarray(index, jnp.int32)
    if index.ndim != (2 if batch is None else 1):
        raise ValueError(f"index must be (batch, new tokens), or (new tokens,) with batch=, got shape {index.shape}")
    if batch is not None:
        index = jnp.broadcast_to(index, (batch, index.shape[0]))
    valid = jnp.ones(index.shape, bool) if valid is None else jnp.asarray(valid, bool)
    blocks = jnp.zeros(index.shape, jnp.int32)
    return AttentionMask(q_index=index, k_index=index, k_valid=valid, q_block=blocks, k_block=blocks,
                         aligned=batch is not None)


def cudnn_supports(q: jax.Array) -> bool:
    """Whether jax.nn's cuDNN flash attention can take queries like q (B,T,N,H) here."""
    return (jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)
            and q.shape[-1] <= 256 and q.shape[-1] % 8 == 0)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask | None, *,
                          window: int | None, scale: float, implementation: str | None = None) -> jax.Array:
    """Grouped-query attention. q (B,T,N,H), k/v (B,S,K,H) with N a multiple of K -> (B,T,N,H) in q.dtype.

    Query head n uses KV head n // (N // K). mask None: every query sees every key (no window). A query
    that may see no key (a padding token) gets a zero output; the fast path zeroes every padding query.
    implementation: None picks (module docstring), "xla" forces the oracle, "cudnn" the fast path.
    """
    b, t, n, h = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[3] != h or n % k.shape[2]:
        raise ValueError(f"attention shapes do not fit: q {q.shape}, k {k.shape}, v {v.shape} "
                         "(expected q (B,T,N,H), k = v (B,S,K,H) with N a multiple of K)")
    if implementation not in (None,) + IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {implementation!r}; expected None or one of "
                         f"{IMPLEMENTATIONS}")
    fast_mask = mask is None or (mask.layout is not None and t == k.shape[1])
    if implementation == "cudnn" and not fast_mask:
        raise ValueError("implementation='cudnn' needs a self-attention mask with a Layout (make_attention_mask) "
                         f"or mask=None (got T={t}, S={k.shape[1]}, layout "
                         f"{None if mask is None else mask.layout}); use 'xla'")
    if implementation == "cudnn" or (implementation is None and fast_mask and cudnn_supports(q)):
        from theworld_jax.interval_attention import interval_attention

        if mask is None:
            return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="cudnn")
        return interval_attention(q, k, v, mask, window=window, scale=scale, backend="cudnn")
    return _xla_attention(q, k, v, mask, window=window, scale=scale)


def cache_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask, *, window: int | None,
                    scale: float, implementation: str | None = None) -> jax.Array:
    """Attention over a KV cache stored heads-first: q (B,T,N,H), k/v (B,K,S,H), `mask` the cache's key
    mask (`LayerCache.key_mask`: k_index the token index of each slot, -1 = none; k_valid = k_index >= 0;
    no key blocks) -> (B,T,N,H).

    One new token per row on a GPU (a decode step) takes the fused decode kernel
    (`theworld_jax.decode_attention`) unless implementation="xla"; anything else goes to
    `dot_product_attention` over the cache's (B,S,K,H) view.
    """
    from theworld_jax import decode_attention

    if implementation is None and decode_attention.supports(q, k):
        return decode_attention.decode_attention(q, k, v, mask.k_index, mask.q_index, window=window, scale=scale)
    return dot_product_attention(q, jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), mask, window=window,
                                 scale=scale, implementation=implementation)


def _xla_attention(q, k, v, mask: AttentionMask | None, *, window, scale):
    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(b, t, kv_heads, n // kv_heads, h)
    logits = _query_key_logits(q, k) * scale
    if mask is not None:
        allowed = mask.allowed(window)[:, None, None]  # (B,1,1,T,S)
        logits = jnp.where(allowed, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    if mask is not None:
        probs = jnp.where(allowed, probs, 0.0)
    out = jnp.einsum("BKGTS,BSKH->BTKGH", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(b, t, n, h).astype(q.dtype)


def _query_key_logits(q: jax.Array, k: jax.Array) -> jax.Array:
    """q (B,T,K,G,H), k (B,S,K,H) -> q.k (B,K,G,T,S) float32.

    A single query (a decode step at batch 1) goes as float32 products summed over H, the same numbers
    as the einsum, because XLA:GPU laid the one-query einsum's logits out keys-major, which made the
    softmax's reductions over the keys column reductions (11.5 us each over 1,024 keys): 3.32 instead of
    3.74 ms per decode step on an H200. At batch 8 both forms took 3.59 ms; with more rows the einsum
    stays, since the products may read each cached key once per query head of its group.
    """
    if q.shape[0] * q.shape[1] == 1:
        return _single_query_logits(q, k)
    return jnp.einsum("BTKGH,BSKH->BKGTS", q, k, preferred_element_type=jnp.float32)


def _single_query_logits(q: jax.Array, k: jax.Array) -> jax.Array:
    """q (B,1,K,G,H), k (B,S,K,H) -> (B,K,G,1,S) float32: products summed over H, the keys minor-most."""
    products = q[:, 0, :, :, None, :].astype(jnp.float32) * jnp.swapaxes(k, 1, 2)[:, :, None].astype(jnp.float32)
    return jnp.sum(products, axis=-1)[:, :, :, None, :]
