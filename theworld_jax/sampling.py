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


# top-p alone draws from the top CANDIDATES ids when they hold the nucleus (almost always), instead of
# sorting the whole vocabulary; a row whose nucleus is larger sends the step through the full sort.
CANDIDATES = 256


def _limited(logits: jax.Array, config: SamplingConfig) -> jax.Array:
    """(B, V) float32 logits with the ids at or past vocab_limit at -inf."""
    logits = logits.astype(jnp.float32)
    return jnp.where(jnp.arange(logits.shape[-1]) < config.vocab_limit, logits, NEG_INF)


def _nucleus(ordered: jax.Array, probs: jax.Array, top_p: jax.Array) -> jax.Array:
    """`ordered` (B, k) descending logits, `probs` their probabilities -> `ordered` with the entries past the
    smallest prefix whose mass reaches top_p at -inf (the top one always stays; ties with the last kept stay)."""
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = jnp.sum(mass_before < top_p, axis=-1, keepdims=True)  # >= 1
    threshold = jnp.take_along_axis(ordered, jnp.maximum(keep, 1) - 1, axis=-1)
    return jnp.where(ordered < threshold, NEG_INF, ordered)


def _survivors(logits: jax.Array, k: int, config: SamplingConfig, top_p: jax.Array,
               top: tuple[jax.Array, jax.Array] | None = None) -> tuple[jax.Array, jax.Array]:
    """(values, ids) (B, k): the k highest of the (scaled) logits in descending order, those that top-p
    removes at -inf. With top_k the nucleus is taken within the top k (as transformers' warpers chain);
    without it, k must hold the nucleus (probabilities over the whole vocabulary)."""
    values, ids = jax.lax.top_k(logits, k) if top is None else top
    if config.use_top_p:
        if config.top_k is not None:
            probs = jax.nn.softmax(values, axis=-1)
        else:
            probs = jnp.exp(values - jax.nn.logsumexp(logits, axis=-1, keepdims=True))
        values = _nucleus(values, probs, top_p)
    return values, ids


def filter_logits(logits: jax.Array, config: SamplingConfig, temperature: jax.Array,
                  top_p: jax.Array) -> jax.Array:
    """logits (B, V) -> the float32 logits the choice is made from, removed entries at -inf."""
    logits = _limited(logits, config)
    if not config.do_sample:
        return logits
    logits = logits / temperature
    if config.top_k is None and not config.use_top_p:
        return logits
    values, ids = _survivors(logits, config.top_k or logits.shape[-1], config, top_p)
    rows = jnp.arange(logits.shape[0])[:, None]
    return jnp.full_like(logits, NEG_INF).at[rows, ids].set(values)


def choose(logits: jax.Array, key: jax.Array, config: SamplingConfig, temperature: jax.Array,
           top_p: jax.Array) -> jax.Array:
    """logits (B, V) -> next tokens (B,) int32: argmax, or a draw from the filtered distribution.

    Sampling draws among the top-k (or, for top-p alone, the top CANDIDATES) ids only, never sorting the
    vocabulary unless a nucleus is larger than CANDIDATES."""
    logits = _limited(logits, config)
    if not config.do_sample:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if config.top_k is None and not config.use_top_p:
        return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)

    def draw(values, ids):
        pick = jax.random.categorical(key, values, axis=-1)
        return jnp.take_along_axis(ids, pick[:, None], axis=-1)[:, 0].astype(jnp.int32)

    vocab = logits.shape[-1]
    k = config.top_k or min(CANDIDATES, vocab)
    top = jax.lax.top_k(logits, k)
    if config.top_k is not None or k == vocab:
        return draw(*_survivors(logits, k, config, top_p, top))
    mass = jnp.sum(jnp.exp(top[0] - jax.nn.logsumexp(logits, axis=-1, keepdims=True)), axis=-1)
    return jax.lax.cond(jnp.all(mass >= top_p), lambda: draw(*_survivors(logits, k, config, top_p, top)),
                        lambda: draw(*_survivors(logits, vocab, config, top_p)))
