"""Fusing world tokens into a Gemma 3 token sequence, and the causal LM loss.

Each sample becomes `[..., BOS, <sow>, world x N, <eow>, rest...]`: the world tokens go right after the
row's own <start_of_world>, wherever it is (left padding, different prompts).

Device side (jit-able, static shapes, no per-row loop): `splice_world`, `causal_lm_loss`,
`causal_lm_loss_at`; one host helper for it, `labelled_positions`. The host half (marker validation,
injection after BOS) is `theworld_jax.inputs`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from theworld_jax.config.theworld import WorldAttention
from theworld_jax.modeling.layers import positions_from_mask

IGNORE_INDEX = -100


# ---------------------------------------------------------------- device side


class FusedBatch(NamedTuple):
    """The LM inputs after splicing: all (B, L+N[, D])."""

    embeds: jax.Array
    attention_mask: jax.Array
    token_type_ids: jax.Array | None
    labels: jax.Array | None
    positions: jax.Array


def splice_world(embeds: jax.Array, input_ids: jax.Array, attention_mask: jax.Array,
                 token_type_ids: jax.Array | None, labels: jax.Array | None, world: jax.Array, *,
                 sow_id: int, world_attention: str = WorldAttention.CAUSAL) -> FusedBatch:
    """Insert world (B, N, D) right after each row's <sow> in embeds (B, L, D) and the per-token arrays.

    The rows must have been checked by `validate_world_batch` (one <sow> immediately followed by <eow>).
    World tokens get attention_mask 1, token type 0 ("causal") or 1 ("bidirectional": one bidirectional
    block, like an image) and label -100; <sow> and <eow> get label -100 too. World embeddings are used
    as given (not scaled). positions: `positions_from_mask` of the fused mask.
    """
    world_attention = WorldAttention.parse(world_attention, "world_attention")
    b, length, d = embeds.shape
    if input_ids.shape != (b, length) or attention_mask.shape != (b, length):
        raise ValueError(f"input_ids {tuple(input_ids.shape)} and attention_mask {tuple(attention_mask.shape)} "
                         f"must be (B, L) = {(b, length)}, the first two axes of embeds")
    for name, x in (("token_type_ids", token_type_ids), ("labels", labels)):
        if x is not None and x.shape != (b, length):
            raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {(b, length)}")
    if world.ndim != 3 or world.shape[0] != b or world.shape[2] != d or world.shape[1] == 0:
        raise ValueError(f"world must be (B, N, D) = ({b}, N >= 1, {d}), got {tuple(world.shape)}")
    n = world.shape[1]

    sow = jnp.argmax(input_ids == sow_id, axis=1)[:, None]  # (B, 1)
    j = jnp.arange(length + n)[None, :]  # output index
    is_world = (j > sow) & (j <= sow + n)
    text_src = jnp.clip(jnp.where(j <= sow, j, j - n), 0, length - 1)
    world_src = jnp.clip(j - sow - 1, 0, n - 1)

    def take(x, src):
        return jnp.take_along_axis(x, src, axis=1)

    text_embeds = jnp.take_along_axis(embeds, text_src[..., None], axis=1)
    world_embeds = jnp.take_along_axis(world.astype(embeds.dtype), world_src[..., None], axis=1)
    out_embeds = jnp.where(is_world[..., None], world_embeds, text_embeds)
    mask = jnp.where(is_world, 1, take(attention_mask, text_src)).astype(attention_mask.dtype)

    bidirectional = world_attention == WorldAttention.BIDIRECTIONAL
    world_type = 1 if bidirectional else 0
    types = None
    if token_type_ids is not None or bidirectional:
        text_types = (jnp.zeros((b, length + n), jnp.int32) if token_type_ids is None
                      else take(token_type_ids, text_src))
        types = jnp.where(is_world, world_type, text_types).astype(text_types.dtype)

    out_labels = None
    if labels is not None:
        markers = is_world | (j == sow) | (j == sow + n + 1)
        out_labels = jnp.where(markers, IGNORE_INDEX, take(labels, text_src)).astype(labels.dtype)

    return FusedBatch(out_embeds, mask, types, out_labels, positions_from_mask(mask))


def causal_lm_loss_terms(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum of token cross-entropies, number of tokens) for logits (B, L, V) predicting labels shifted by 1.

    Tokens whose label is -100 are ignored. Log-softmax in float32. Labels outside [0, V) other than
    -100 are not checked (they are clipped); validate them on the host.
    """
    if logits.ndim != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(f"logits must be (B, L, V) and labels (B, L); got {tuple(logits.shape)} and "
                         f"{tuple(labels.shape)}")
    logits = logits[:, :-1].astype(jnp.float32)
    target = labels[:, 1:]
    valid = target != IGNORE_INDEX
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.clip(target, 0, logits.shape[-1] - 1))
    return jnp.sum(jnp.where(valid, nll, 0.0)), jnp.sum(valid, dtype=jnp.int32)


def causal_lm_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean cross-entropy of logits[:, :-1] against labels[:, 1:] over labels != -100 (float32 scalar).

    Like transformers' ForCausalLMLoss, except that a batch with no counted token gives 0.0 (not NaN).
    """
    total, count = causal_lm_loss_terms(logits, labels)
    return total / jnp.maximum(count, 1).astype(jnp.float32)


def causal_lm_loss_at(logits: jax.Array, labels: jax.Array, positions: jax.Array) -> jax.Array:
    """`causal_lm_loss` from the logits (B, K, V) of positions (B, K) only: each predicts labels[b, p + 1].

    Positions -1, the last position and labels -100 are not counted; with every labelled position kept
    this equals causal_lm_loss of the full logits.
    """
    total, count = causal_lm_loss_terms_at(logits, labels, positions)
    return total / jnp.maximum(count, 1).astype(jnp.float32)


def causal_lm_loss_terms_at(logits: jax.Array, labels: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(summed cross-entropy, number of counted targets) of `causal_lm_loss_at` (training sums these over
    micro-batches and devices, then divides once: a true mean over target tokens)."""
    if logits.ndim != 3 or positions.shape != logits.shape[:2] or labels.ndim != 2:
        raise ValueError(f"logits must be (B, K, V), positions (B, K) and labels (B, L); got {tuple(logits.shape)}, "
                         f"{tuple(positions.shape)} and {tuple(labels.shape)}")
    target = jnp.take_along_axis(labels, jnp.clip(positions + 1, 0, labels.shape[1] - 1), axis=1)
    target = jnp.where((positions >= 0) & (positions + 1 < labels.shape[1]), target, IGNORE_INDEX)
    padded = jnp.concatenate([logits, jnp.zeros_like(logits[:, :1])], axis=1)  # causal_lm_loss drops the last
    return causal_lm_loss_terms(padded, jnp.concatenate([target[:, :1], target], axis=1))


def labelled_positions(labels, size: int | None = None) -> np.ndarray:
    """Host (B, L) labels -> (B, K) int32 positions p whose next label labels[b, p + 1] is not -100, in order,
    padded with -1; K = `size` or the largest count of a row. For `logits_to_keep` in training."""
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be (batch, length), got shape {labels.shape}")
    wanted = labels[:, 1:] != IGNORE_INDEX
    counts = wanted.sum(axis=1)
    size = int(counts.max(initial=0)) if size is None else int(size)
    if counts.max(initial=0) > size:
        raise ValueError(f"a row has {int(counts.max())} labelled positions, more than size={size}")
    out = np.full((labels.shape[0], max(size, 1)), -1, np.int32)
    for row, where in enumerate(wanted):
        picked = np.nonzero(where)[0]
        out[row, :picked.size] = picked
    return out
