"""The one attention entry point: who may attend to whom (`AttentionMask`) and the kernels.

Rule (transformers 5.24; docs/design.md, section 4), per batch row, query t and key s:

    allowed = k_valid[s] & (causal | same_block) & (window is None | k_index[s] > q_index[t] - window)
    causal = k_index[s] <= q_index[t];  same_block = (q_block[t] == k_block[s]) & (q_block[t] > 0)

Indices are token indices in the padded sequence (not RoPE positions); a KV-cache slot carries the
index of the token stored in it. "xla" is the numerical oracle; "cudnn" is the fused GPU kernel for
plain causal / sliding-window attention without padding or bidirectional blocks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

IMPLEMENTATIONS = ("xla", "cudnn")


@struct.dataclass
class AttentionMask:
    """Which keys each query may see. q_* are (B, T), k_* are (B, S); blocks are 0 = none."""

    q_index: jax.Array  # (B, T) int32: each query's index in the padded sequence
    k_index: jax.Array  # (B, S) int32: each key's index (a cache slot: the index of its token)
    k_valid: jax.Array  # (B, S) bool: a real token (attention_mask == 1; a cache slot: filled)
    q_block: jax.Array  # (B, T) int32: bidirectional block id of each query, 0 = none
    k_block: jax.Array  # (B, S) int32: bidirectional block id of each key, 0 = none

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


def block_ids(token_type_ids: jax.Array) -> jax.Array:
    """(B, L) int32 block ids: each maximal run of token_type_ids == 1 gets its own id (1, 2, ...), else 0."""
    is_block = token_type_ids == 1
    previous = jnp.pad(is_block, ((0, 0), (1, 0)))[:, :-1]
    starts = is_block & ~previous
    return jnp.where(is_block, jnp.cumsum(starts, axis=1, dtype=jnp.int32), 0)


def make_attention_mask(attention_mask: jax.Array, token_type_ids: jax.Array | None = None) -> AttentionMask:
    """Mask of a whole (padded) sequence attending to itself, no cache: q_index = k_index = arange(L).

    attention_mask (B, L): 1 on real tokens, 0 on padding. token_type_ids (B, L) or None: 1 on tokens of
    bidirectional blocks (image soft tokens), which then see their whole block.
    """
    attention_mask = jnp.asarray(attention_mask)
    if attention_mask.ndim != 2:
        raise ValueError(f"attention_mask must be (batch, length), got shape {attention_mask.shape}")
    b, length = attention_mask.shape
    index = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
    if token_type_ids is None:
        blocks = jnp.zeros((b, length), jnp.int32)
    else:
        token_type_ids = jnp.asarray(token_type_ids)
        if token_type_ids.shape != attention_mask.shape:
            raise ValueError(f"token_type_ids has shape {token_type_ids.shape}, expected the shape of "
                             f"attention_mask {attention_mask.shape}")
        blocks = block_ids(token_type_ids)
    return AttentionMask(q_index=index, k_index=index, k_valid=attention_mask.astype(bool),
                         q_block=blocks, k_block=blocks)


def make_decode_mask(index: jax.Array, valid: jax.Array | None = None) -> AttentionMask:
    """Mask of T new tokens (no blocks) at sequence indices `index` (B, T); `valid` (B, T) bool or all-true.

    Its k fields describe the same new tokens; a KV cache adds the keys it holds (see kv_cache.py).
    """
    index = jnp.asarray(index, jnp.int32)
    if index.ndim != 2:
        raise ValueError(f"index must be (batch, new tokens), got shape {index.shape}")
    valid = jnp.ones(index.shape, bool) if valid is None else jnp.asarray(valid, bool)
    blocks = jnp.zeros(index.shape, jnp.int32)
    return AttentionMask(q_index=index, k_index=index, k_valid=valid, q_block=blocks, k_block=blocks)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask, *,
                          window: int | None, scale: float, implementation: str = "xla") -> jax.Array:
    """Grouped-query attention. q (B,T,N,H), k/v (B,S,K,H) with N a multiple of K -> (B,T,N,H) in q.dtype.

    Query head n uses KV head n // (N // K). Logits and softmax are float32; a query that may see no key
    (a padding token) gets a zero output.
    """
    b, t, n, h = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[3] != h or n % k.shape[2]:
        raise ValueError(f"attention shapes do not fit: q {q.shape}, k {k.shape}, v {v.shape} "
                         "(expected q (B,T,N,H), k = v (B,S,K,H) with N a multiple of K)")
    if implementation == "xla":
        return _xla_attention(q, k, v, mask, window=window, scale=scale)
    if implementation == "cudnn":
        return _fused_causal_attention(q, k, v, window=window, scale=scale, backend="cudnn")
    raise ValueError(f"unknown attention implementation {implementation!r}; expected one of {IMPLEMENTATIONS}")


def _xla_attention(q, k, v, mask: AttentionMask, *, window, scale):
    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(b, t, kv_heads, n // kv_heads, h)
    logits = jnp.einsum("BTKGH,BSKH->BKGTS", q, k, preferred_element_type=jnp.float32) * scale
    allowed = mask.allowed(window)[:, None, None]  # (B,1,1,T,S)
    logits = jnp.where(allowed, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    probs = jnp.where(allowed, probs, 0.0)
    out = jnp.einsum("BKGTS,BSKH->BTKGH", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(b, t, n, h).astype(q.dtype)


def _fused_causal_attention(q, k, v, *, window, scale, backend: str):
    """jax.nn.dot_product_attention (backend "cudnn" on GPU). The caller guarantees the mask is plain
    causal (with `window`) over q_index = k_index = arange(T): no padding, no blocks, no cache."""
    if q.shape[1] != k.shape[1]:
        raise ValueError(
            f"implementation='cudnn' needs queries and keys of the same sequence (got T={q.shape[1]}, "
            f"S={k.shape[1]}): it handles only causal self-attention without a KV cache; use 'xla'")
    local = None if window is None else (window - 1, 0)
    return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True, local_window_size=local,
                                        implementation=backend)
