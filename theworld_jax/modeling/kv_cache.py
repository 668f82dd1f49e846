"""Static-shape KV cache for the Gemma 3 decoder, with ring buffers on sliding-window layers.

Each layer keeps k, v (B, K, S_l, H) (after k_norm and RoPE; heads before slots, so that decode
attention reads each head's keys as one contiguous (S_l, H) matrix with no transposed copy of the
cache). Full layers have S_l = max_length slots; sliding layers S_l = min(window, max_length), used as a
ring: the token with index i lives in slot i % S_l. Indices must stay below max_length. Layers with the
same S_l hold the same tokens in the same slots, so they share one `index` (B, S_l) int32: the sequence
index of the token in each slot, or -1 for an empty slot or a padding token (`index >= 0` is the key's
validity). Each layer computes the same update of its shared index, which XLA merges into one.

Every call hands the decoder an `AttentionMask` describing only the T new tokens (q fields and k
fields alike, e.g. from `make_attention_mask` for a prompt or `make_decode_mask` for new tokens);
the cache adds the keys it holds. New tokens must come after every cached one. Three cases:
- prefill (`prefilled` is False, a static field): attend over the new tokens alone, then store them
  (on sliding layers only the last S_l indices survive);
- one new token: write it into its slot first, then attend over the whole cache (no copy);
- several new tokens (chunked prefill): attend over [cached keys; new keys], then store.
Bidirectional blocks act among the new tokens of one call; cached keys carry no block.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import struct

from theworld_jax.attention import AttentionMask, cache_attention, dot_product_attention
from theworld_jax.config.gemma3 import Gemma3TextConfig


@struct.dataclass
class LayerCache:
    """One layer's keys and values. k, v (B, K, S, H); index (B, S) int32, -1 = no valid token."""

    k: jax.Array
    v: jax.Array
    index: jax.Array

    @property
    def slots(self) -> int:
        return self.index.shape[1]

    def write(self, k: jax.Array, v: jax.Array, index: jax.Array, valid: jax.Array,
              aligned: bool = False) -> LayerCache:
        """Store T tokens (k, v (B,T,K,H), index/valid (B,T)) at slots index % S; when T > S, only the
        last S indices of each row are kept. Invalid tokens are stored with index -1. aligned: every row's
        tokens have row 0's indices (then one token is written at one offset for all rows)."""
        slots = self.slots
        stored = jnp.where(valid, index, -1).astype(jnp.int32)
        k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)  # (B,K,T,H), as stored
        if index.shape[1] == 1 and (aligned or index.shape[0] == 1):
            # one slot for every row: in-place updates that fuse with what computes k and v (a scatter
            # becomes an update guarded by an in-bounds select, two kernels per array)
            slot = index[0, 0] % slots
            return LayerCache(k=jax.lax.dynamic_update_slice(self.k, k.astype(self.k.dtype), (0, 0, slot, 0)),
                              v=jax.lax.dynamic_update_slice(self.v, v.astype(self.v.dtype), (0, 0, slot, 0)),
                              index=jax.lax.dynamic_update_slice(self.index, stored, (0, slot)))
        if index.shape[1] == 1:  # one token per row (decoding): its slot is always in range, which the
            # scatter promises XLA (a clamped or dropping write made it add a guard of 3 kernels per array)
            rows, slot = jnp.arange(index.shape[0]), index[:, 0] % slots
            return LayerCache(
                k=self.k.at[rows, :, slot].set(k[:, :, 0].astype(self.k.dtype), mode="promise_in_bounds"),
                v=self.v.at[rows, :, slot].set(v[:, :, 0].astype(self.v.dtype), mode="promise_in_bounds"),
                index=self.index.at[rows, slot].set(stored[:, 0], mode="promise_in_bounds"))

        def put(buffer, where, values):  # buffer (S,) or (K, S, H); values (T,) or (K, T, H)
            at = buffer.at[where] if buffer.ndim == 1 else buffer.at[:, where]
            return at.set(values.astype(buffer.dtype), mode="drop")
        newest = jnp.max(index, axis=1, keepdims=True)
        slot = jnp.where(index > newest - slots, index % slots, slots)  # out of range: dropped
        return LayerCache(k=jax.vmap(put)(self.k, slot, k), v=jax.vmap(put)(self.v, slot, v),
                          index=jax.vmap(put)(self.index, slot, stored))

    def keys(self) -> tuple[jax.Array, jax.Array]:
        """(k, v) as (B, S, K, H), the layout of the attention functions (a view: XLA folds the
        transpose into the attention's dot products)."""
        return jnp.swapaxes(self.k, 1, 2), jnp.swapaxes(self.v, 1, 2)

    def key_mask(self, mask: AttentionMask) -> AttentionMask:
        """The queries of `mask` against this cache's slots."""
        return AttentionMask(q_index=mask.q_index, k_index=self.index, k_valid=self.index >= 0,
                             q_block=mask.q_block, k_block=jnp.zeros_like(self.index))


@struct.dataclass
class KVCache:
    """Per-layer keys and values, one slot index per slot count; `prefilled` (static) is False until the
    first call has stored tokens. keys/values[l] (B, K, S_l, H); index[j] (B, S) for the j-th distinct S."""

    keys: tuple[jax.Array, ...]
    values: tuple[jax.Array, ...]
    index: tuple[jax.Array, ...]
    prefilled: bool = struct.field(pytree_node=False, default=False)

    @classmethod
    def init(cls, config: Gemma3TextConfig, batch: int, max_length: int, dtype=jnp.bfloat16) -> KVCache:
        """An empty cache for sequences of up to `max_length` tokens (prompt included)."""
        if batch < 1 or max_length < 1:
            raise ValueError(f"a KV cache needs batch >= 1 and max_length >= 1, got {batch} and {max_length}")
        slot_counts = [max_length if config.window(i) is None else min(config.window(i), max_length)
                       for i in range(config.num_hidden_layers)]
        shapes = [(batch, config.num_key_value_heads, slots, config.head_dim) for slots in slot_counts]
        return cls(keys=tuple(jnp.zeros(shape, dtype) for shape in shapes),
                   values=tuple(jnp.zeros(shape, dtype) for shape in shapes),
                   index=tuple(jnp.full((batch, slots), -1, jnp.int32) for slots in dict.fromkeys(slot_counts)),
                   prefilled=False)

    @property
    def batch(self) -> int:
        return self.index[0].shape[0]

    def slot_counts(self) -> tuple[int, ...]:
        return tuple(k.shape[2] for k in self.keys)

    def _shared(self, slots: int) -> int:
        return next(j for j, index in enumerate(self.index) if index.shape[1] == slots)

    def layer(self, i: int) -> LayerCache:
        """Layer i's keys and values with the index of its slot count."""
        return LayerCache(k=self.keys[i], v=self.values[i], index=self.index[self._shared(self.keys[i].shape[2])])

    def updated(self, layers: Sequence[LayerCache]) -> KVCache:
        """The cache holding every layer's written keys and values (`layers`, one per layer), prefilled.
        The layers of one slot count wrote the same index; the first one's is kept."""
        index = list(self.index)
        for layer in reversed(layers):
            index[self._shared(layer.slots)] = layer.index
        return KVCache(keys=tuple(layer.k for layer in layers), values=tuple(layer.v for layer in layers),
                       index=tuple(index), prefilled=True)


def cached_attention(cache: LayerCache, prefilled: bool, q: jax.Array, k: jax.Array, v: jax.Array,
                     mask: AttentionMask, *, window: int | None, scale: float,
                     implementation: str | None = None) -> tuple[jax.Array, LayerCache]:
    """Attention of T new tokens through one layer's cache. q (B,Q,N,H) (Q = T, or the queries `mask`
    selects), k/v (B,T,K,H), `mask` over the new tokens only -> (out (B,Q,N,H), the cache with the new
    tokens stored)."""
    t = k.shape[1]
    if mask.k_index.shape != (q.shape[0], t):
        raise ValueError(f"with a KV cache the mask's keys must be the {t} new tokens, got k_index of shape "
                         f"{mask.k_index.shape}; build it with make_attention_mask or make_decode_mask")
    kw = dict(window=window, scale=scale, implementation=implementation)
    if not prefilled:
        out = dot_product_attention(q, k, v, mask, **kw)
        return out, cache.write(k, v, mask.k_index, mask.k_valid)
    if t == 1:
        cache = cache.write(k, v, mask.k_index, mask.k_valid, aligned=mask.aligned)
        return cache_attention(q, cache.k, cache.v, cache.key_mask(mask), **kw), cache
    held = cache.key_mask(mask)
    joint = AttentionMask(
        q_index=mask.q_index, q_block=mask.q_block,
        k_index=jnp.concatenate([held.k_index, mask.k_index], axis=1),
        k_valid=jnp.concatenate([held.k_valid, mask.k_valid], axis=1),
        k_block=jnp.concatenate([held.k_block, mask.k_block], axis=1))
    held_k, held_v = cache.keys()
    keys = jnp.concatenate([held_k, k.astype(held_k.dtype)], axis=1)
    values = jnp.concatenate([held_v, v.astype(held_v.dtype)], axis=1)
    out = dot_product_attention(q, keys, values, joint, **kw)
    return out, cache.write(k, v, mask.k_index, mask.k_valid)
