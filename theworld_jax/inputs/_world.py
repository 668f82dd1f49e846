"""World markers on the host (NumPy): validation, injection of <sow><eow> after BOS, the fused length."""

from __future__ import annotations

import numpy as np

from theworld_jax.modeling.fusion import IGNORE_INDEX


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
