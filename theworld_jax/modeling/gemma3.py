"""Gemma 3 multimodal model: SigLIP tower + projector + text decoder (transformers `Gemma3Model` + lm_head).

input_ids (B, L) with `image_token_id` placeholders, pixel_values (N_img, C, S, S) -> logits (B, L, V).
Text embeddings are scaled by sqrt(hidden); image features replace the placeholders in row-major order
(row by row, left to right, image after image), unscaled. Positions come from attention_mask
(cumsum - 1, clipped at 0) unless position_ids are given; token_type_ids == 1 marks image soft tokens,
which then attend bidirectionally within their own block.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from theworld_jax.attention import AttentionMask, Layout, make_attention_mask
from theworld_jax.config.gemma3 import Gemma3Config
from theworld_jax.jit import shared_call
from theworld_jax.modeling.fusion import FusedBatch
from theworld_jax.modeling.gemma3_text import Gemma3TextDecoder
from theworld_jax.modeling.layers import positions_from_mask
from theworld_jax.modeling.mm_projector import Gemma3MultiModalProjector
from theworld_jax.modeling.siglip import SiglipVisionTower


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _check_same_shape(name: str, value, input_shape: tuple[int, ...]) -> None:
    if value is not None and tuple(value.shape) != input_shape:
        raise ValueError(f"{name} must have the shape of input_ids {input_shape}, got {tuple(value.shape)}")


def keep_positions(logits_to_keep, batch: int, length: int) -> jax.Array | None:
    """The positions (B, K) int32 whose logits are wanted: None = all (returns None); an int N = the
    last N; a (B, K) int array = those positions of each row (-1 = none: zero logits, no loss)."""
    if logits_to_keep is None:
        return None
    if isinstance(logits_to_keep, (int, np.integer)):
        if not 1 <= logits_to_keep <= length:
            raise ValueError(f"logits_to_keep={logits_to_keep} must lie in [1, {length}] (the sequence length)")
        return jnp.broadcast_to(jnp.arange(length - logits_to_keep, length, dtype=jnp.int32), (batch, logits_to_keep))
    positions = jnp.asarray(logits_to_keep)
    if positions.ndim != 2 or positions.shape[0] != batch or not jnp.issubdtype(positions.dtype, jnp.integer):
        raise ValueError(f"logits_to_keep must be None, an int or a (batch={batch}, K) integer array of positions, "
                         f"got {getattr(logits_to_keep, 'shape', logits_to_keep)}")
    if _is_concrete(positions) and positions.size and (int(positions.max()) >= length or int(positions.min()) < -1):
        raise ValueError(f"logits_to_keep positions must lie in [0, {length}) (or -1 for none), got values from "
                         f"{int(positions.min())} to {int(positions.max())}")
    return positions.astype(jnp.int32)


def decoder_inputs(config: Gemma3Config, embeds: jax.Array, attention_mask=None, token_type_ids=None,
                   position_ids=None, *, logits_to_keep=None,
                   layout: Layout | None = None) -> tuple[AttentionMask, jax.Array, jax.Array | None]:
    """The text decoder's mask, positions (B, L) and kept positions (B, K) or None for embeddings (B, L, D),
    with decode_embeds' defaults and checks."""
    b, length = embeds.shape[:2]
    if length > config.text.max_position_embeddings:
        raise ValueError(f"the sequence has {length} tokens; this model allows at most "
                         f"{config.text.max_position_embeddings} (max_position_embeddings)")
    _check_same_shape("attention_mask", attention_mask, (b, length))
    _check_same_shape("token_type_ids", token_type_ids, (b, length))
    _check_same_shape("position_ids", position_ids, (b, length))
    if attention_mask is None:
        attention_mask = jnp.ones((b, length), jnp.int32)
    if position_ids is None:
        position_ids = positions_from_mask(attention_mask)
    keep = keep_positions(logits_to_keep, b, length)
    return make_attention_mask(attention_mask, token_type_ids, layout=layout), position_ids, keep


class Gemma3Model(nnx.Module):
    """Gemma 3 with its vision tower and projector (both None for a text-only config)."""

    def __init__(self, config: Gemma3Config, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.dtype = dtype
        self.language_model = Gemma3TextDecoder(config.text, dtype=dtype, rngs=rngs)
        if config.vision is not None:
            self.vision_tower = SiglipVisionTower(config.vision, dtype=dtype, rngs=rngs)
            self.multi_modal_projector = Gemma3MultiModalProjector(config, dtype=dtype, rngs=rngs)
        else:
            self.vision_tower = None
            self.multi_modal_projector = None

    @property
    def gemma_config(self) -> Gemma3Config:
        """This model's config (TheWorldModel answers the same with its Gemma's)."""
        return self.config

    def image_features(self, pixel_values: jax.Array) -> jax.Array:
        """pixel_values (N_img, C, S, S) -> (N_img, mm_tokens_per_image, D) soft-token embeddings."""
        if self.vision_tower is None:
            raise ValueError("pixel_values were given, but this is a text-only Gemma 3 (no vision_config)")
        return self.multi_modal_projector(self.vision_tower(pixel_values))

    def embed_inputs(self, input_ids: jax.Array, pixel_values: jax.Array | None = None, *,
                     image_features: jax.Array | None = None) -> jax.Array:
        """(B, L) ids (+ images) -> (B, L, D): scaled text embeddings, image features at the placeholders.

        image_features: `image_features(pixel_values)` computed apart (N_img, mm_tokens_per_image, D); given,
        pixel_values are not read."""
        cfg = self.config
        is_image = input_ids == cfg.image_token_id
        if cfg.image_token_id >= cfg.text.vocab_size:  # out of the embedding: embed pad, overwritten below
            input_ids = jnp.where(is_image, cfg.text.pad_token_id, input_ids)
        embeds = self.language_model.embed(input_ids)
        if pixel_values is None and image_features is None:
            return embeds
        if image_features is None:
            if self.vision_tower is None:
                raise ValueError("pixel_values were given, but this is a text-only Gemma 3 (no vision_config)")
            self.vision_tower.check_pixels(pixel_values)
        n_images = (pixel_values if image_features is None else image_features).shape[0]
        n_features = n_images * cfg.mm_tokens_per_image
        if _is_concrete(input_ids):
            n_tokens = int(np.asarray(is_image).sum())
            if n_tokens != n_features:
                raise ValueError(
                    f"input_ids hold {n_tokens} image tokens (id {cfg.image_token_id}) but {n_images} "
                    f"image(s) give {n_features} features ({cfg.mm_tokens_per_image} per image); they must match")
        features = self.image_features(pixel_values) if image_features is None else image_features
        return self.place_features(embeds, is_image, features.astype(embeds.dtype))

    def lm_inputs(self, input_ids, attention_mask, *, pixel_values=None, token_type_ids=None, labels=None,
                  video=None, image_features=None) -> FusedBatch:
        """The decoder's inputs (B, L): embeddings with image features, positions from the mask."""
        if video is not None:
            raise ValueError("a video was given, but a Gemma 3 model has no world branch")
        return FusedBatch(self.embed_inputs(input_ids, pixel_values, image_features=image_features), attention_mask,
                          token_type_ids, labels, positions_from_mask(attention_mask))

    @staticmethod
    def place_features(embeds: jax.Array, where: jax.Array, features: jax.Array) -> jax.Array:
        """Write features (N, T, D) into embeds (B, L, D) at the True entries of where (B, L), in order.

        Static shapes (a gather by running count), so it jits; entries past the features' end repeat the
        last feature, which is why callers check the counts when they can.
        """
        b, length, d = embeds.shape
        flat = features.reshape(-1, d)
        index = jnp.clip(jnp.cumsum(where.reshape(-1).astype(jnp.int32)) - 1, 0, flat.shape[0] - 1)
        placed = flat[index].reshape(b, length, d)
        return jnp.where(where[..., None], placed, embeds)

    def decode_embeds(self, embeds: jax.Array, attention_mask: jax.Array | None = None,
                      token_type_ids: jax.Array | None = None, position_ids: jax.Array | None = None,
                      *, logits_to_keep=None, layout: Layout | None = None, remat: str = "none",
                      implementation: str | None = None) -> jax.Array:
        """Run the text decoder on ready embeddings (B, L, D) -> logits (B, L, V) float32, or (B, K, V) at
        the positions `logits_to_keep` names (see keep_positions).

        attention_mask (B, L) 1 = token, 0 = padding (default all ones); token_type_ids (B, L) 1 on image
        soft tokens (bidirectional blocks) or None (purely causal); position_ids default from the mask.
        layout: the static block bound of the fast attention path (theworld_jax.attention.Layout; by
        default derived from host token_type_ids); remat: a decoder remat policy name; implementation:
        the attention kernel (None picks).
        """
        mask, position_ids, keep = decoder_inputs(self.config, embeds, attention_mask, token_type_ids, position_ids,
                                                  logits_to_keep=logits_to_keep, layout=layout)
        hidden, _ = self.language_model(embeds, positions=position_ids, mask=mask, remat=remat,
                                        implementation=implementation, keep=keep)
        return shared_call(self.language_model, hidden, method="logits")

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 pixel_values: jax.Array | None = None, token_type_ids: jax.Array | None = None,
                 position_ids: jax.Array | None = None, *, logits_to_keep=None, layout: Layout | None = None,
                 remat: str = "none", implementation: str | None = None) -> jax.Array:
        """input_ids (B, L) -> logits (B, L, V) float32 (see decode_embeds for the other inputs)."""
        if getattr(input_ids, "ndim", None) != 2 or 0 in input_ids.shape:
            raise ValueError(f"input_ids must be a non-empty (batch, length) array, got shape "
                             f"{tuple(getattr(input_ids, 'shape', ()))}")
        if not jnp.issubdtype(input_ids.dtype, jnp.integer):
            raise ValueError(f"input_ids must be integer token ids, got dtype {input_ids.dtype}")
        _check_same_shape("attention_mask", attention_mask, tuple(input_ids.shape))
        _check_same_shape("token_type_ids", token_type_ids, tuple(input_ids.shape))
        vocab = self.config.text.vocab_size
        if _is_concrete(input_ids):
            ids = np.asarray(input_ids)
            if ids.min() < 0 or ids.max() >= vocab:
                raise ValueError(f"token ids must lie in [0, {vocab}), got values from {ids.min()} to {ids.max()}")
        embeds = self.embed_inputs(jnp.asarray(input_ids), pixel_values)
        return self.decode_embeds(embeds, attention_mask, token_type_ids, position_ids,
                                  logits_to_keep=logits_to_keep, layout=layout, remat=remat,
                                  implementation=implementation)
