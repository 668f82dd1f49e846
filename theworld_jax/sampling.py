"""Choosing the next token from logits: greedy, or sampling with temperature, top-k and top-p.

Order (as transformers' logits processors): ids at or past `vocab_limit` are removed, then the logits
are divided by the temperature, cut to the top k, then to the nucleus of mass top_p.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

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


# Thresholds by radix search: RADIX candidate keys per pass, 32 / log2(RADIX) passes over the vocabulary,
# each one fused reduction (no sort of the vocabulary, no branch on the device).
RADIX_BITS = 4


def _limited(logits: jax.Array, config: SamplingConfig) -> jax.Array:
    """(B, V) float32 logits with the ids at or past vocab_limit at -inf."""
    logits = logits.astype(jnp.float32)
    return jnp.where(jnp.arange(logits.shape[-1]) < config.vocab_limit, logits, NEG_INF)


def _order_keys(x: jax.Array) -> jax.Array:
    """float32 (B, V) -> uint32 keys in the same order (negative floats flipped below the positive ones)."""
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(1 << 31))


def _threshold(keys: jax.Array, weights: jax.Array | None, target: jax.Array) -> tuple[jax.Array, jax.Array]:
    """keys (B, V) uint32, weights (B, V) float32 or None (a count), target () or (B, 1) -> (B, 1) uint32:
    the largest key t whose weight at or above it, sum(weights[keys >= t]), reaches target (0 if none),
    and (B, 1) that weight.

    Found digit by digit from the top: each pass weighs 2**RADIX_BITS candidate keys at once."""
    radix = 1 << RADIX_BITS
    lo = jnp.zeros((keys.shape[0], 1), jnp.uint32)
    for shift in range(32 - RADIX_BITS, -1, -RADIX_BITS):
        candidates = lo + (jnp.arange(radix, dtype=jnp.uint32) << shift)[None, :]  # (B, R), no overflow
        above = keys[:, None, :] >= candidates[:, :, None]  # (B, R, V)
        if weights is None:
            weight = jnp.sum(above, axis=-1, dtype=jnp.int32)
        else:
            weight = jnp.sum(jnp.where(above, weights[:, None, :], 0.0), axis=-1)
        digit = jnp.sum(weight[:, 1:] >= target, axis=-1, dtype=jnp.uint32)  # weight falls as keys rise
        lo = lo + (digit << shift)[:, None]
    return lo, jnp.take_along_axis(weight, digit[:, None].astype(jnp.int32), axis=-1)


def _from_keys(keys: jax.Array) -> jax.Array:
    """The inverse of _order_keys: uint32 keys -> the float32 values."""
    bits = jnp.where(keys >> 31 == 1, keys & jnp.uint32(0x7FFFFFFF), ~keys)
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


_NO_KEY = np.uint32(0xFFFFFFFF)  # above every key of a float


def _higher_then_smaller(a: tuple, b: tuple) -> tuple:
    """Of two (probability, key) pairs, the one of higher probability, and of equal ones the smaller key."""
    first = (a[0] > b[0]) | ((a[0] == b[0]) & (a[1] < b[1]))
    return jnp.where(first, a[0], b[0]), jnp.where(first, a[1], b[1])


def _nucleus_of_top_k(logits: jax.Array, keys: jax.Array, t: jax.Array, survivors: jax.Array, k: int,
                      top_p: jax.Array) -> jax.Array:
    """logits (B, V) and their keys; t (B, 1): top-k's threshold key; survivors (B, 1): how many keys are
    >= t; top_p () or (B, 1) -> (B, 1) uint32: the smallest key top-p keeps among the survivors.

    The cut of top-p's radix search over the survivors' probabilities, found from k entries instead of
    the vocabulary: the logits above t (fewer than k) are gathered into k slots and every other survivor
    equals t, so the mass at or above each slot's probability is a sum over the slots (a k x k
    comparison), and the survivors equal to t, the least probable, are all kept exactly when no slot of
    higher probability reaches top_p. Probabilities are computed and compared as softmax gives them
    (distinct logits whose probabilities round equal stay together); the cut is then a logit's key
    (softmax is monotone). Only the rounding of the sums differs (top_p within float error of a mass)."""
    rows = logits.shape[0]
    above = keys > t  # (B, V): fewer than k per row
    slot = jnp.where(above, jnp.cumsum(above, axis=-1, dtype=jnp.int32) - 1, k)
    top = jnp.full((rows, k), NEG_INF, jnp.float32).at[jnp.arange(rows)[:, None], slot].set(logits, mode="drop")
    top_keys = _order_keys(top)
    valid = top_keys > t  # (B, k): the filled slots
    t_logit = _from_keys(t)
    m = jnp.maximum(jnp.max(top, axis=-1, keepdims=True), t_logit)  # the largest logit
    e, e_t = jnp.exp(top - m), jnp.exp(t_logit - m)
    at_t = survivors - jnp.sum(valid, axis=-1, keepdims=True, dtype=jnp.int32)
    z = jnp.sum(jnp.concatenate([e, at_t.astype(jnp.float32) * e_t], axis=-1), axis=-1, keepdims=True)
    p, p_t = e / z, e_t / z  # (B, k), (B, 1): the survivors' probabilities (the -inf slots': 0)
    mass = jnp.sum(jnp.where(p[:, None, :] >= p[:, :, None], p[:, None, :], 0.0), axis=-1)  # (B, k)
    reaches = valid & (p > p_t) & (mass >= top_p)
    # The largest probability that reaches top_p and, of the slots with it, the smallest key (one reduction).
    cut, smallest = jax.lax.reduce((jnp.where(reaches, p, -1.0), jnp.where(reaches, top_keys, _NO_KEY)),
                                   (jnp.float32(-1.0), _NO_KEY), _higher_then_smaller, (1,))
    return jnp.where(cut[:, None] >= 0, smallest[:, None], t)


def _kept(logits: jax.Array, config: SamplingConfig, top_p: jax.Array) -> jax.Array:
    """(B, V) scaled logits -> (B, V) bool: the ids top-k and then top-p keep.

    As transformers' warpers: top-k keeps every logit at least the k-th largest (ties included); top-p
    keeps the smallest set of the highest probabilities (after top-k) whose mass reaches top_p, and every
    id tied with its smallest member. With top-k, top-p works on the k survivors (_nucleus_of_top_k);
    alone, it is a radix search over the vocabulary's probabilities."""
    if config.top_k is not None:
        keys = _order_keys(logits)
        t, survivors = _threshold(keys, None, jnp.int32(config.top_k))
        if config.use_top_p:
            t = _nucleus_of_top_k(logits, keys, t, survivors, config.top_k, top_p)
        return keys >= t
    probs = jax.nn.softmax(logits, axis=-1)
    keys = _order_keys(probs)
    return keys >= _threshold(keys, probs, top_p)[0]


def filter_logits(logits: jax.Array, config: SamplingConfig, temperature: jax.Array,
                  top_p: jax.Array) -> jax.Array:
    """logits (B, V) -> the float32 logits the choice is made from, removed entries at -inf."""
    logits = _limited(logits, config)
    if not config.do_sample:
        return logits
    logits = logits / temperature
    if config.top_k is None and not config.use_top_p:
        return logits
    return jnp.where(_kept(logits, config, top_p), logits, NEG_INF)


def choose(logits: jax.Array, key: jax.Array, config: SamplingConfig, temperature: jax.Array,
           top_p: jax.Array) -> jax.Array:
    """logits (B, V) -> next tokens (B,) int32: argmax, or a draw from the filtered distribution (a fixed
    number of passes over the vocabulary: no sort, no branch)."""
    if not config.do_sample:
        return jnp.argmax(_limited(logits, config), axis=-1).astype(jnp.int32)
    filtered = filter_logits(logits, config, temperature, top_p)
    return jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)
