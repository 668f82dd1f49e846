"""The Gemma 3 text decoder (transformers' Gemma3TextModel + tied lm_head), in Flax NNX.

Parameters keep their HuggingFace values (unscaled embedding, raw (1 + w) norm weights) in the model's
own axis order: q (D,N,H), k/v (D,K,H), o (N,H,D), gate/up (D,F), down (F,D), embedding (V,D).
"""

from __future__ import annotations

import functools
import weakref

import jax
import jax.numpy as jnp
from flax import nnx

from theworld_jax.attention import AttentionMask, dot_product_attention
from theworld_jax.config.gemma3 import Gemma3TextConfig, RopeConfig
from theworld_jax.jit import shared_call
from theworld_jax.modeling.kv_cache import KVCache, LayerCache, cached_attention
from theworld_jax.modeling.layers import Einsum, Embedding, GatedMLP, RMSNorm, apply_rope, rope_tables, take_rows
from theworld_jax.sharding import HIDDEN, constrain

# Rematerialisation of each decoder layer in the backward pass (name -> jax.checkpoint policy):
# "none" keeps every activation (fastest backward, most memory); "dots_saveable" keeps the matmul outputs
# and recomputes norms, RoPE, attention and activations; "full" keeps only each layer's input and
# recomputes the whole layer (least memory, about one more forward pass).
REMAT_POLICIES = {
    "none": None,
    "dots_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "full": jax.checkpoint_policies.nothing_saveable,
}


# One token (a decode step at batch 1) goes through the layers as two copies (Gemma3TextDecoder.__call__);
# a switch for the benchmarks' A/B runs.
TWIN_ONE_TOKEN = True


def check_remat(remat: str) -> str:
    if remat not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {remat!r}; expected one of {list(REMAT_POLICIES)}")
    return remat


class Gemma3Attention(nnx.Module):
    """Self-attention of one layer: q/k/v projections, q/k RMSNorm, RoPE, GQA, output projection."""

    def __init__(self, config: Gemma3TextConfig, layer: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        d, n, kv, h = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = Einsum((d, n, h), ("embed", "heads", "head_dim"), fan_in=d, **kw)
        self.k_proj = Einsum((d, kv, h), ("embed", "kv_heads", "head_dim"), fan_in=d, **kw)
        self.v_proj = Einsum((d, kv, h), ("embed", "kv_heads", "head_dim"), fan_in=d, **kw)
        self.o_proj = Einsum((n, h, d), ("heads", "head_dim", "embed"), fan_in=n * h, **kw)
        self.q_norm = RMSNorm(h, eps=config.rms_norm_eps, param_dtype=param_dtype)
        self.k_norm = RMSNorm(h, eps=config.rms_norm_eps, param_dtype=param_dtype)
        self.window = config.window(layer)
        self.scale = config.query_scale

    def __call__(self, x, rope: tuple[jax.Array, jax.Array], mask: AttentionMask, cache: LayerCache | None,
                 keep: jax.Array | None = None, *, prefilled: bool, implementation: str | None,
                 twin: bool = False) -> tuple[jax.Array, LayerCache | None]:
        """x (B,T,D), rope (cos, sin) (B,T,1,H) -> ((B,T,D), updated cache or None). keep (B,K) int32 or
        None: queries only at these positions (every token is still a key) -> (B,K,D). twin: x and rope
        are (1,2,...), two copies of the mask's one token (see Gemma3TextDecoder)."""
        cos, sin = rope
        xq, cos_q, sin_q = (x, cos, sin) if keep is None else (take_rows(a, keep) for a in (x, cos, sin))
        if keep is not None:
            mask = mask.select_queries(keep)
        q = apply_rope(self.q_norm(self.q_proj.matmul(xq, 1)), cos_q, sin_q)  # BTD,DNH->BTNH
        k = apply_rope(self.k_norm(self.k_proj.matmul(x, 1)), cos, sin)  # BSD,DKH->BSKH
        v = self.v_proj.matmul(x, 1)  # BSD,DKH->BSKH
        if twin:  # the token attends once; both copies get its output
            q, k, v = q[:, :1], k[:, :1], v[:, :1]
        kw = dict(window=self.window, scale=self.scale, implementation=implementation)
        if cache is None:
            out = dot_product_attention(q, k, v, mask, **kw)
        else:
            out, cache = cached_attention(cache, prefilled, q, k, v, mask, **kw)
        if twin:
            out = jnp.broadcast_to(out, (1, 2) + out.shape[2:])
        return self.o_proj.matmul(out, 2), cache  # BTNH,NHD->BTD


class Gemma3DecoderLayer(nnx.Module):
    """x += post_attn_norm(attn(input_norm(x))); x += post_ffw_norm(mlp(pre_ffw_norm(x)))."""

    def __init__(self, config: Gemma3TextConfig, layer: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        d, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = Gemma3Attention(config, layer, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.mlp = GatedMLP(d, config.intermediate_size, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.input_layernorm = RMSNorm(d, eps=eps, param_dtype=param_dtype)
        self.post_attention_layernorm = RMSNorm(d, eps=eps, param_dtype=param_dtype)
        self.pre_feedforward_layernorm = RMSNorm(d, eps=eps, param_dtype=param_dtype)
        self.post_feedforward_layernorm = RMSNorm(d, eps=eps, param_dtype=param_dtype)

    def __call__(self, x, rope, mask, cache, keep=None, *, prefilled, implementation, twin=False):
        """keep (B,K) or None: the output only at these positions (B,K,D); twin: see Gemma3Attention."""
        attn, cache = self.self_attn(self.input_layernorm(x), rope, mask, cache, keep, prefilled=prefilled,
                                     implementation=implementation, twin=twin)
        if keep is not None:
            x = take_rows(x, keep)
        x = x + self.post_attention_layernorm(attn)
        x = x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        return x, cache


_GROUPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class LayerGroup(nnx.Module):
    """Consecutive decoder layers (the decoder's own modules) called as one: `rope_index[i]` picks
    layer i's RoPE tables. The decoder calls each run of one period of its layer pattern through one
    program (theworld_jax.jit.shared_call), so Gemma 3 4B's 34 layers make two or three programs, each
    called once per run: one compilation per program when the caller runs outside jit."""

    def __init__(self, layers: list[Gemma3DecoderLayer], rope_index: tuple[int, ...]):
        self.layers = nnx.List(layers)
        self.rope_index = rope_index

    def __call__(self, x, ropes: tuple, mask: AttentionMask, caches: tuple, keep=None, *, prefilled: bool,
                 implementation: str | None, twin: bool, layer_remat=None):
        """x (B,T,D), ropes: (cos, sin) tables, caches: one LayerCache or None per layer, keep: for the
        last layer (see Gemma3DecoderLayer); layer_remat: each layer's jax.checkpoint policy or None ->
        (x, the layers' updated caches)."""
        new = []
        for i, (layer, cache) in enumerate(zip(self.layers, caches)):
            # layers of one structure share one traced program
            x, cache = shared_call(layer, x, ropes[self.rope_index[i]], mask, cache,
                                   keep if i == len(self.layers) - 1 else None, remat_policy=layer_remat,
                                   prefilled=prefilled, implementation=implementation, twin=twin)
            x = constrain(x, HIDDEN)
            new.append(cache)
        return x, tuple(new)


@functools.partial(jax.jit, static_argnames=("ropes", "head_dim", "dtype", "twin"))
def _prologue(embeds, positions, keep, *, ropes: tuple[RopeConfig, ...], head_dim: int, dtype, twin: bool):
    """The decoder's input (B,T,D) in `dtype` (twin: (1,2,D), two copies behind an optimization barrier),
    the (cos, sin) tables of each RoPE in `ropes`, and keep clipped to valid rows (or None)."""
    x = constrain(embeds.astype(dtype), HIDDEN)
    if twin:
        x = jax.lax.optimization_barrier(jnp.broadcast_to(x, (1, 2, x.shape[-1])))
        positions = jnp.broadcast_to(positions, (1, 2))
    rows = None if keep is None else jnp.maximum(keep, 0)
    return x, tuple(rope_tables(positions, rope, head_dim, dtype) for rope in ropes), rows


@functools.partial(jax.jit, static_argnames=("twin",))
def _epilogue(hidden, keep, *, twin: bool):
    """The normed hidden states of the real token (twin) and zero rows where keep is -1."""
    if twin:
        hidden = hidden[:, :1]
    if keep is not None:
        hidden = jnp.where(keep[..., None] >= 0, hidden, jnp.zeros((), hidden.dtype))
    return hidden


class Gemma3TextDecoder(nnx.Module):
    """Embedding, decoder layers, final norm and tied output head of Gemma 3.

    `dtype` is the compute dtype (and the parameter dtype unless `param_dtype` is given); norms, RoPE
    tables, attention logits and softmax are computed in float32.
    """

    def __init__(self, config: Gemma3TextConfig, *, dtype=jnp.float32, param_dtype=None, rngs: nnx.Rngs):
        param_dtype = dtype if param_dtype is None else param_dtype
        self.config = config
        self.dtype = dtype
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size, dtype=dtype,
                                      param_dtype=param_dtype, rngs=rngs)
        self.layers = nnx.List([
            Gemma3DecoderLayer(config, i, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
            for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, param_dtype=param_dtype)

    def embed(self, input_ids: jax.Array) -> jax.Array:
        """input_ids (B, L) -> W[ids] * sqrt(D) (B, L, D) in `dtype` (the scale rounded to `dtype` first)."""
        return self.embed_tokens(input_ids, self.config.embed_scale)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """hidden (B, L, D) after the final norm -> (B, L, V) float32, through the tied embedding."""
        return self.embed_tokens.attend(hidden)

    def __call__(self, embeds: jax.Array, *, positions: jax.Array, mask: AttentionMask,
                 cache: KVCache | None = None, implementation: str | None = None,
                 remat: str = "none", keep: jax.Array | None = None) -> tuple[jax.Array, KVCache | None]:
        """embeds (B, L, D) (text tokens already scaled), positions (B, L) int RoPE positions, `mask` over
        these L tokens (and, without a cache, as keys too) -> (hidden (B, L, D) after the final norm,
        the cache with these tokens stored, or None). implementation: the attention kernel (None picks,
        see theworld_jax.attention); remat: a name of REMAT_POLICIES; keep (B, K) int32 or None: the
        hidden states wanted, at these positions ((B, K, D); -1 gives a zero row): the last layer then
        computes its queries, MLP and residual only there (every earlier layer runs on all tokens).

        One token (a decode step at batch 1) runs as two copies of itself, which XLA cannot tell apart
        (an optimization barrier): its norms and residuals then have rows, which XLA:GPU fuses with
        their neighbours, where one row gave a reduction to a scalar and a separate kernel for each
        (the H200's decode step: 873 -> 572 kernels). The token attends once (`twin`)."""
        self._check_inputs(embeds, positions, mask, cache, keep)
        prefilled = cache is not None and cache.prefilled
        twin = TWIN_ONE_TOKEN and embeds.shape[0] * embeds.shape[1] == 1 and keep is None

        static = dict(prefilled=prefilled, implementation=implementation, twin=twin,
                      layer_remat=REMAT_POLICIES[check_remat(remat)])
        x, ropes, rows = self.prologue(embeds, positions, keep, twin=twin)
        new_layers = []
        for group, module in self.groups(split_last=keep is not None):
            caches = tuple(None if cache is None else cache.layer(i) for i in group)
            # groups of one structure share one program (theworld_jax.jit.shared_call)
            last = group[-1] == len(self.layers) - 1
            x, caches = shared_call(module, x, ropes, mask, caches, rows if last else None, **static)
            new_layers.extend(caches)
        hidden = self.epilogue(x, keep, twin=twin)
        new_cache = None if cache is None else cache.updated(new_layers)
        return hidden, new_cache

    def prologue(self, embeds, positions, keep=None, *, twin: bool = False):
        """The layers' input x (B, L, D) in the compute dtype, the (cos, sin) tables of each RoPE kind of
        `groups` (ropes), and keep clipped to valid rows for the last layer (rows, or None)."""
        return _prologue(embeds, positions, keep, ropes=self._rope_kinds(), head_dim=self.config.head_dim,
                         dtype=self.dtype, twin=twin)

    def epilogue(self, x, keep=None, *, twin: bool = False) -> jax.Array:
        """The last layer's output -> the final norm's hidden states ((B, K, D) with keep: -1 rows zero)."""
        return _epilogue(shared_call(self.norm, x), keep, twin=twin)

    def layer_groups(self, *, split_last: bool = False) -> list[range]:
        """The layers in runs of one period of the layer pattern (Gemma 3 4B: 5 sliding + 1 full, so
        [0, 6), [6, 12), ..., [30, 34)); runs of one period have one structure and share one program.
        split_last: the last layer alone (it computes only the kept positions)."""
        types = self.config.layer_types
        period = next(p for p in range(1, len(types) + 1)
                      if all(t == types[i % p] for i, t in enumerate(types)))
        bounds = list(range(0, len(types), period)) + [len(types)]
        if split_last and bounds[-2] != len(types) - 1:
            bounds.insert(-1, len(types) - 1)
        return [range(a, b) for a, b in zip(bounds, bounds[1:])]

    def groups(self, *, split_last: bool = False) -> list[tuple[range, LayerGroup]]:
        """`layer_groups` with a LayerGroup of each (called with `prologue`'s x and ropes), kept while the
        layers stay the same (so that calls outside jit reuse the group's bound variables, theworld_jax.jit)."""
        rope_kinds = self._rope_kinds()
        key = (split_last, rope_kinds, tuple(id(layer) for layer in self.layers))
        cached = _GROUPS.setdefault(self, {})
        if key not in cached:
            cached[key] = [(group, LayerGroup([self.layers[i] for i in group],
                                              tuple(rope_kinds.index(self.config.rope_for(i)) for i in group)))
                           for group in self.layer_groups(split_last=split_last)]
        return cached[key]

    def _rope_kinds(self) -> tuple[RopeConfig, ...]:
        return tuple(dict.fromkeys(self.config.rope_for(i) for i in range(len(self.layers))))

    def _check_inputs(self, embeds, positions, mask: AttentionMask, cache: KVCache | None, keep) -> None:
        cfg = self.config
        if embeds.ndim != 3 or embeds.shape[-1] != cfg.hidden_size:
            raise ValueError(f"embeds must be (batch, length, {cfg.hidden_size}), got shape {embeds.shape}")
        b, length = embeds.shape[:2]
        if b == 0 or length == 0:
            raise ValueError(f"embeds is empty: shape {embeds.shape}")
        if positions.shape != (b, length):
            raise ValueError(f"positions has shape {positions.shape}, expected {(b, length)}")
        if mask.q_index.shape != (b, length) or mask.q_block.shape != (b, length):
            raise ValueError(f"the mask's queries have shape {mask.q_index.shape}, expected {(b, length)}")
        if keep is not None and (keep.ndim != 2 or keep.shape[0] != b or not jnp.issubdtype(keep.dtype, jnp.integer)):
            raise ValueError(f"keep must be (batch={b}, K) integer positions, got {keep.dtype} of shape {keep.shape}")
        if cache is None and mask.k_index.shape != (b, length):
            raise ValueError(f"without a KV cache the keys are the {length} input tokens, but the mask's keys "
                             f"have shape {mask.k_index.shape}")
        if cache is not None:
            if len(cache.keys) != cfg.num_hidden_layers:
                raise ValueError(f"the KV cache has {len(cache.keys)} layers, the model {cfg.num_hidden_layers}")
            if cache.batch != b:
                raise ValueError(f"the KV cache is for batch {cache.batch}, the input has {b}")
            max_length = max(cache.slot_counts())
            if length > max_length:
                raise ValueError(f"{length} new tokens do not fit a KV cache of max_length {max_length}")
