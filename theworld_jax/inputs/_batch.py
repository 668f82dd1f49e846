"""What a model takes (`Batch`), what preparing it needs to know (`InputSpec`), and `prepare_batch`."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from theworld_jax.config.gemma3 import Gemma3Config
from theworld_jax.config.theworld import TheWorldConfig
from theworld_jax.config.wan_vae import WanVAEConfig
from theworld_jax.inputs._video import as_samples, prepare_video
from theworld_jax.inputs._world import check_fused_length, inject_world_tokens
from theworld_jax.modeling.world_projector import num_world_tokens

_INT32 = np.iinfo(np.int32)


@struct.dataclass
class Batch:
    """A prepared batch (a pytree; `world_tokens` is static).

    input_ids, attention_mask: (B, L) int32, with <start_of_world><end_of_world> in place when `video` is
    given; token_type_ids, labels, position_ids: (B, L) int32 or None; pixel_values: (N_img, C, S, S) in
    the model's dtype or None; video: (B, T, H, W, 3) float32 VAE input or None; logits_to_keep: (B, K)
    int32 positions of these input_ids whose logits are wanted (-1 = none) or None; world_tokens: the
    world tokens the model splices into each row (0 without video).
    """

    input_ids: Any
    attention_mask: Any
    token_type_ids: Any = None
    labels: Any = None
    position_ids: Any = None
    pixel_values: Any = None
    video: Any = None
    logits_to_keep: Any = None
    world_tokens: int = struct.field(pytree_node=False, default=0)

    def model_inputs(self) -> dict[str, Any]:
        """The arrays as keyword arguments of `TheWorldModel.forward`."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "world_tokens"}


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """What preparing a batch needs to know of a model: its Gemma 3 config, and for the world branch its
    TheWorldConfig and VAE config (`world` None: plain Gemma 3, images are refused); `dtype`: the dtype
    pixel_values are cast to."""

    gemma: Gemma3Config
    world: TheWorldConfig | None = None
    vae: WanVAEConfig | None = None
    dtype: Any = jnp.float32

    def __post_init__(self):
        if self.world is not None and not self.world.enable_world:
            object.__setattr__(self, "world", None)
        if self.world is not None and (self.vae is None or self.world.sow_token_id is None):
            raise ValueError("the world branch needs the VAE config and the world token ids (sow/eow)")

    def world_tokens(self, frames: int = 1) -> int:
        """World tokens per row for a clip of `frames` frames (1 for an image)."""
        return num_world_tokens(self.world.world_projection_mode, self.vae, self.world.vae_image_size, frames)


def as_ids(name: str, value, shape: tuple[int, int] | None = None, bounds: tuple[int, int] | None = None
           ) -> np.ndarray:
    """An int32 (B, L) array from a list / NumPy / JAX / torch value (a (L,) one is one row).

    Values are checked against `bounds` [low, high) (default: what int32 holds) before the cast, whatever
    the dtype, so no id wraps around; anything else is a one-line error naming `name`.
    """
    array = np.asarray(value.numpy() if hasattr(value, "numpy") and not isinstance(value, np.ndarray) else value)
    if array.ndim == 1:
        array = array[None]
    if array.ndim != 2 or 0 in array.shape:
        raise ValueError(f"{name} must be a non-empty (batch, length) array; got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.integer) and not np.issubdtype(array.dtype, np.bool_):
        raise ValueError(f"{name} must hold integers; got dtype {array.dtype}")
    if shape is not None and array.shape != shape:
        raise ValueError(f"{name} has shape {array.shape}, expected {shape} like input_ids")
    low, high = (_INT32.min, _INT32.max + 1) if bounds is None else bounds
    lo, hi = int(array.min()), int(array.max())
    if lo < low or hi >= high:
        raise ValueError(f"{name} must lie in [{low}, {high}); got values from {lo} to {hi}")
    return array.astype(np.int32)


def _pixels(pixel_values, dtype) -> jax.Array:
    """pixel_values in the model's dtype; a device array stays on the device."""
    return jnp.asarray(pixel_values if isinstance(pixel_values, jax.Array) else np.asarray(pixel_values), dtype)


def _check_image_tokens(spec: InputSpec, input_ids: np.ndarray, pixel_values) -> None:
    config = spec.gemma
    if config.vision is None:
        raise ValueError("pixel_values were given, but this is a text-only Gemma 3 (no vision_config)")
    n_tokens = int((input_ids == config.image_token_id).sum())
    n_features = len(pixel_values) * config.mm_tokens_per_image
    if n_tokens != n_features:
        raise ValueError(f"input_ids hold {n_tokens} image tokens (id {config.image_token_id}) but "
                         f"{len(pixel_values)} image(s) give {n_features} features; they must match")


def _world_samples(images, rows: int) -> list:
    """`images` as one sample (image or clip) per row; a single image or clip is fine for one row."""
    samples = as_samples(images)
    if len(samples) != rows:
        raise ValueError(f"got {len(samples)} images/clips for a batch of {rows} row(s); pass one per row: a list "
                         "of PIL images, (H, W, 3) uint8 arrays or clips ((T, H, W, 3) arrays or lists of frames), "
                         "or a single image or clip for a batch of one row")
    return samples


def _keep_positions(logits_to_keep, rows: int, length: int) -> np.ndarray:
    """(B, K) int32 positions in [-1, length) for `rows` rows (a (K,) array is one row)."""
    if isinstance(logits_to_keep, (int, np.integer)):
        raise ValueError("prepare_batch takes logits_to_keep as (batch, K) positions; an int N (the last N) "
                         "is static and goes to the forward itself")
    keep = as_ids("logits_to_keep", logits_to_keep, bounds=(-1, length))
    if keep.shape[0] != rows:
        raise ValueError(f"logits_to_keep has {keep.shape[0]} rows, expected {rows} like input_ids")
    return keep


def prepare_batch(spec: InputSpec, input_ids, attention_mask=None, *, pixel_values=None, token_type_ids=None,
                  labels=None, position_ids=None, images=None, logits_to_keep=None) -> Batch:
    """Check and convert what a caller passes into a `Batch` (see its docstring for the shapes).

    input_ids (B, L) (or (L,)) ids in [0, vocab); attention_mask default all ones; `images` (one per row,
    or a single image or clip for one row) turn the world branch on: the world markers are injected after
    BOS unless the rows carry them, and the VAE input is built as the config says. logits_to_keep: (B, K)
    positions of the given input_ids (-1 = none), moved past the markers when they are injected.
    """
    text = spec.gemma.text
    ids = as_ids("input_ids", input_ids, bounds=(0, text.vocab_size))
    b, length = ids.shape
    mask = np.ones_like(ids) if attention_mask is None else as_ids("attention_mask", attention_mask, (b, length))
    types, labs, positions = (None if x is None else as_ids(name, x, (b, length)) for name, x in (
        ("token_type_ids", token_type_ids), ("labels", labels), ("position_ids", position_ids)))
    keep = None if logits_to_keep is None else _keep_positions(logits_to_keep, b, length)
    if pixel_values is not None:
        _check_image_tokens(spec, ids, pixel_values)
        pixel_values = _pixels(pixel_values, spec.dtype)
    if images is None:
        return Batch(ids, mask, types, labs, positions, pixel_values, logits_to_keep=keep)
    world = spec.world
    if world is None:
        raise ValueError("images were given but the world branch is disabled (enable_world=False)")
    if positions is not None:
        raise ValueError("position_ids cannot be given with images: the world tokens change positions")
    samples = _world_samples(images, b)
    ids, mask, types, labs = inject_world_tokens(ids, mask, types, labs, bos_id=text.bos_token_id,
                                                 sow_id=world.sow_token_id, eow_id=world.eow_token_id)
    if keep is not None and ids.shape[1] > length:  # <sow><eow> went in after each row's first real token
        first = np.argmax(mask != 0, axis=1)[:, None]
        keep = np.where(keep > first, keep + ids.shape[1] - length, keep)
    video = prepare_video(samples, size=world.vae_image_size, value_range=world.vae_input_range)
    n_world = spec.world_tokens(video.shape[1])
    check_fused_length(ids.shape[1], n_world, text.max_position_embeddings)
    return Batch(ids, mask, types, labs, None, pixel_values, video, keep, world_tokens=n_world)
