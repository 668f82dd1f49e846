"""Choosing the next token from logits: greedy, or sampling with temperature, top-k and top-p.

Order (as transformers' logits processors): ids at or past `vocab_limit` are removed, then the logits
are divided by the temperature, cut to the top k, then to the nucleus of mass top_p.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

NEG_INF = -jnp.inf


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen (static: a change recompiles, except temperature and top_p values).

    do_sample False: argmax. top_k None = no cut; top_p None = no nucleus. vocab_limit: ids >= it are
    never chosen (the tokenizer's original length: padding rows and the world tokens).
    """

    vocab_limit: int
    do_sample: bool = False
    top_k: int | None = None
    use_top_p: bool = False

    @classmethod
    def make(cls, *, vocab_limit: int, vocab_size: int, do_sample: bool = False, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None) -> SamplingConfig:
        """Validated settings; raises a ValueError naming the bad argument and the allowed range."""
        if not 1 <= vocab_limit <= vocab_size:
            raise ValueError(f"vocab_limit must be in [1, {vocab_size}] (the model's vocabulary), got {vocab_limit}")
        if do_sample:
            if not temperature > 0:
                raise ValueError(f"temperature must be > 0 when sampling, got {temperature}; "
                                 "use do_sample=False for greedy decoding")
            if top_k is not None and (int(top_k) != top_k or top_k < 1):
                raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")
            if top_p is not None and not 0 < top_p <= 1:
                raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")
        top_k = None if not do_sample or top_k is None or top_k >= vocab_limit else int(top_k)
        return cls(vocab_limit=vocab_limit, do_sample=bool(do_sample), top_k=top_k,
                   use_top_p=bool(do_sample and top_p is not None and top_p < 1))


def _nucleus(logits: jax.Array, ordered: jax.Array, top_p: jax.Array) -> jax.Array:
    """Keep the smallest set of highest logits whose probability reaches top_p (the top one always).

    `ordered` (B, k): the k highest logits in descending order (all that may survive).
    """
    probs = jax.nn.softmax(ordered, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = jnp.sum(mass_before < top_p, axis=-1, keepdims=True)  # >= 1
    threshold = jnp.take_along_axis(ordered, jnp.maximum(keep, 1) - 1, axis=-1)
    return jnp.where(logits < threshold, NEG_INF, logits)


def filter_logits(logits: jax.Array, config: SamplingConfig, temperature: jax.Array,
                  top_p: jax.Array) -> jax.Array:
    """logits (B, V) float32 -> the logits the choice is made from, removed entries at -inf."""
    logits = logits.astype(jnp.float32)
    ids = jnp.arange(logits.shape[-1])
    logits = jnp.where(ids < config.vocab_limit, logits, NEG_INF)
    if not config.do_sample:
        return logits
    logits = logits / temperature
    if config.top_k is not None:
        ordered = jax.lax.top_k(logits, config.top_k)[0]
        logits = jnp.where(logits < ordered[..., -1:], NEG_INF, logits)
    elif config.use_top_p:
        ordered = jnp.sort(logits, axis=-1)[..., ::-1]
    if config.use_top_p:
        logits = _nucleus(logits, ordered, top_p)
    return logits


def choose(logits: jax.Array, key: jax.Array, config: SamplingConfig, temperature: jax.Array,
           top_p: jax.Array) -> jax.Array:
    """logits (B, V) -> next tokens (B,) int32: argmax, or a draw from the filtered distribution."""
    logits = filter_logits(logits, config, temperature, top_p)
    if not config.do_sample:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
