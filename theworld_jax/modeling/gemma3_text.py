"""The Gemma 3 text decoder (transformers' Gemma3TextModel + tied lm_head), in Flax NNX.

Parameters keep their HuggingFace values (unscaled embedding, raw (1 + w) norm weights) in the model's
own axis order: q (D,N,H), k/v (D,K,H), o (N,H,D), gate/up (D,F), down (F,D), embedding (V,D).
"""

from __future__ import annotations

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
        """x (B,T,D), rope (cos, sin) (B,T,H) -> ((B,T,D), updated cache or None). keep (B,K) int32 or
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

        policy = REMAT_POLICIES[check_remat(remat)]
        static = dict(prefilled=prefilled, implementation=implementation, twin=twin, remat_policy=policy)
        x = constrain(embeds.astype(self.dtype), HIDDEN)
        if twin:
            x = jax.lax.optimization_barrier(jnp.broadcast_to(x, (1, 2, x.shape[-1])))
            positions = jnp.broadcast_to(positions, (1, 2))
        rows = None if keep is None else jnp.maximum(keep, 0)
        ropes: dict[RopeConfig, tuple[jax.Array, jax.Array]] = {}
        new_layers = []
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            rope = self.config.rope_for(i)
            if rope not in ropes:
                ropes[rope] = rope_tables(positions, rope, self.config.head_dim, self.dtype)
            layer_cache = None if cache is None else cache.layer(i)
            # layers of one structure share one traced program (theworld_jax.jit.shared_call)
            x, layer_cache = shared_call(layer, x, ropes[rope], mask, layer_cache, rows if i == last else None,
                                         **static)
            x = constrain(x, HIDDEN)
            new_layers.append(layer_cache)
        hidden = self.norm(x)
        if twin:
            hidden = hidden[:, :1]
        if keep is not None:
            hidden = jnp.where(keep[..., None] >= 0, hidden, jnp.zeros((), hidden.dtype))
        new_cache = None if cache is None else cache.updated(new_layers)
        return hidden, new_cache

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
