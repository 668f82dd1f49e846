"""Fusing world tokens into a Gemma 3 token sequence, and the causal LM loss.

Each sample becomes `[..., BOS, <sow>, world x N, <eow>, rest...]`: the world tokens go right after the
row's own <start_of_world>, wherever it is (left padding, different prompts).

Host side (NumPy, validates): `validate_world_batch`, `inject_world_tokens` (adds <sow><eow> after BOS
when the prompt has none, as upstream did), `check_fused_length`.
Device side (jit-able, static shapes, no per-row loop): `splice_world`, `causal_lm_loss`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from theworld_jax.config.theworld import WORLD_ATTENTIONS

IGNORE_INDEX = -100


# ---------------------------------------------------------------- host side


def _as_2d(name: str, x, shape: tuple[int, ...] | None) -> np.ndarray | None:
    if x is None:
        return None
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must be (batch, length), got shape {x.shape}")
    if shape is not None and x.shape != shape:
        raise ValueError(f"{name} has shape {x.shape}, expected {shape} (the shape of input_ids)")
    return x


def _check_inputs(input_ids, attention_mask, token_type_ids=None, labels=None):
    ids = _as_2d("input_ids", input_ids, None)
    if ids.size == 0:
        raise ValueError(f"input_ids is empty (shape {ids.shape}); expected at least one token per row")
    mask = _as_2d("attention_mask", attention_mask, ids.shape)
    if mask is None:
        mask = np.ones_like(ids)
    return ids, mask, _as_2d("token_type_ids", token_type_ids, ids.shape), _as_2d("labels", labels, ids.shape)


def validate_world_batch(input_ids, attention_mask=None, *, sow_id: int, eow_id: int) -> np.ndarray | None:
    """Positions (B,) of each row's <start_of_world>, or None when no row has one (nor an <end_of_world>).

    Every row must then hold exactly one <sow>, on a non-padding position, immediately followed by one
    <eow> (the world tokens go between them); anything else is an error naming the row.
    """
    ids, mask, _, _ = _check_inputs(input_ids, attention_mask)
    is_sow, is_eow = ids == sow_id, ids == eow_id
    n_sow, n_eow = is_sow.sum(1), is_eow.sum(1)
    if not n_sow.any():
        if n_eow.any():
            row = int(np.argmax(n_eow > 0))
            raise ValueError(f"row {row} has <end_of_world> (id {eow_id}) without a <start_of_world> "
                             f"(id {sow_id})")
        return None
    positions = np.argmax(is_sow, axis=1)
    for row in range(ids.shape[0]):
        what = f"row {row}: expected exactly one <start_of_world> (id {sow_id}) immediately followed by " \
               f"one <end_of_world> (id {eow_id})"
        if n_sow[row] == 0:
            raise ValueError(f"{what}, but it has none while other rows have one (every row or no row "
                             "must carry the world markers)")
        if n_sow[row] > 1:
            raise ValueError(f"{what}, but it has {n_sow[row]} <start_of_world>")
        if n_eow[row] == 0:
            raise ValueError(f"{what}, but its <start_of_world> has no <end_of_world>")
        if n_eow[row] > 1:
            raise ValueError(f"{what}, but it has {n_eow[row]} <end_of_world>")
        s, e = positions[row], int(np.argmax(is_eow[row]))
        if e < s:
            raise ValueError(f"{what}, but its <end_of_world> (position {e}) comes before its "
                             f"<start_of_world> (position {s})")
        if e != s + 1:
            raise ValueError(f"{what}, but {e - s - 1} token(s) stand between them (positions {s} and {e})")
        if not mask[row, s] or not mask[row, e]:
            raise ValueError(f"{what}, but the markers sit on padding (attention_mask 0)")
    return positions


def inject_world_tokens(input_ids, attention_mask, token_type_ids, labels, *, bos_id: int, sow_id: int,
                        eow_id: int):
    """Add `<sow><eow>` right after each row's BOS unless the batch already carries them.

    All four arrays are (B, L) NumPy-convertible (token_type_ids / labels may be None); returns the
    same four, (B, L+2) when injected (mask 1, token type 0, label -100 on the pair), else unchanged.
    BOS is each row's first non-padding token (left padding is allowed); attention_mask None means all
    ones (and comes back as ones when injected).
    """
    ids, mask, types, labs = _check_inputs(input_ids, attention_mask, token_type_ids, labels)
    if validate_world_batch(ids, mask, sow_id=sow_id, eow_id=eow_id) is not None:
        return input_ids, attention_mask, token_type_ids, labels
    real = mask != 0
    first = np.argmax(real, axis=1)
    rows = np.arange(ids.shape[0])
    for row in rows:
        if not real[row].any():
            raise ValueError(f"row {row} is all padding (attention_mask 0 everywhere); expected at least a BOS")
        if ids[row, first[row]] != bos_id:
            raise ValueError(f"row {row} has no BOS (id {bos_id}) at its first non-padding position "
                             f"{first[row]} (found id {ids[row, first[row]]}); cannot place <start_of_world>")

    def insert(x, sow_value, eow_value):
        if x is None:
            return None
        b, length = x.shape
        out = np.empty((b, length + 2), x.dtype)
        j = np.arange(length + 2)[None, :]
        src = np.where(j <= first[:, None], j, j - 2)
        out[...] = np.take_along_axis(x, np.clip(src, 0, length - 1), axis=1)
        out[rows, first + 1] = sow_value
        out[rows, first + 2] = eow_value
        return out

    return (insert(ids, sow_id, eow_id), insert(np.asarray(mask), 1, 1),
            insert(types, 0, 0), insert(labs, IGNORE_INDEX, IGNORE_INDEX))


def check_fused_length(text_length: int, world_tokens: int, max_positions: int) -> None:
    """Raise if the fused sequence (text + world tokens) is longer than the model's positions."""
    total = text_length + world_tokens
    if total > max_positions:
        raise ValueError(f"the fused sequence has {total} tokens ({text_length} text + {world_tokens} world), "
                         f"more than the model's max_position_embeddings {max_positions}; shorten the prompt "
                         "or use fewer world tokens (smaller vae_image_size)")


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
                 sow_id: int, world_attention: str = "causal") -> FusedBatch:
    """Insert world (B, N, D) right after each row's <sow> in embeds (B, L, D) and the per-token arrays.

    The rows must have been checked by `validate_world_batch` (one <sow> immediately followed by <eow>).
    World tokens get attention_mask 1, token type 0 ("causal") or 1 ("bidirectional": one bidirectional
    block, like an image) and label -100; <sow> and <eow> get label -100 too. World embeddings are used
    as given (not scaled). positions = cumsum(mask) - 1, clipped at 0.
    """
    if world_attention not in WORLD_ATTENTIONS:
        raise ValueError(f"world_attention={world_attention!r} is not supported; expected one of "
                         f"{list(WORLD_ATTENTIONS)}")
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

    world_type = 1 if world_attention == "bidirectional" else 0
    types = None
    if token_type_ids is not None or world_attention == "bidirectional":
        text_types = (jnp.zeros((b, length + n), jnp.int32) if token_type_ids is None
                      else take(token_type_ids, text_src))
        types = jnp.where(is_world, world_type, text_types).astype(text_types.dtype)

    out_labels = None
    if labels is not None:
        markers = is_world | (j == sow) | (j == sow + n + 1)
        out_labels = jnp.where(markers, IGNORE_INDEX, take(labels, text_src)).astype(labels.dtype)

    positions = jnp.maximum(jnp.cumsum(mask, axis=1, dtype=jnp.int32) - 1, 0)
    return FusedBatch(out_embeds, mask, types, out_labels, positions)


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
    picked = jnp.take_along_axis(logits, jnp.where(valid, target, 0)[..., None], axis=-1, mode="clip")[..., 0]
    nll = jax.nn.logsumexp(logits, axis=-1) - picked
    return jnp.sum(jnp.where(valid, nll, 0.0)), jnp.sum(valid, dtype=jnp.int32)


def causal_lm_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean cross-entropy of logits[:, :-1] against labels[:, 1:] over labels != -100 (float32 scalar).

    Like transformers' ForCausalLMLoss, except that a batch with no counted token gives 0.0 (not NaN).
    """
    total, count = causal_lm_loss_terms(logits, labels)
    return total / jnp.maximum(count, 1).astype(jnp.float32)
