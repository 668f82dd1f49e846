"""Host-side input preparation: what a caller passes -> the `Batch` a jitted model takes.

The one place where ids, masks, labels, world markers, images and clips are checked and converted
(NumPy and PIL, no tracing). `TheWorld.__call__`, `TheWorld.generate` / `generate_stream`, training and
evaluation all go through `prepare_batch`.

API:
- `Batch`: a frozen pytree of arrays: input_ids, attention_mask (B, L) int32; token_type_ids, labels,
  position_ids (B, L) int32 or None; pixel_values (N_img, C, S, S) or None; video (B, T, H, W, 3)
  float32 VAE input or None; logits_to_keep (B, K) int32 or None; `world_tokens` (static) per row.
  `Batch.model_inputs()` gives the arrays as keyword arguments of `TheWorldModel.forward`.
- `InputSpec(gemma, world=None, vae=None, dtype=float32)`: the configs preparation reads (`world`: a
  TheWorldConfig, None or enable_world=False for plain Gemma 3); `TheWorld.input_spec` is one.
  `spec.world_tokens(frames)`: world tokens per row.
- `prepare_batch(spec, input_ids, attention_mask=None, *, pixel_values=None, token_type_ids=None,
  labels=None, position_ids=None, images=None, logits_to_keep=None) -> Batch`: ids outside [0, vocab)
  are an error whatever their dtype; `images` is one image or clip per row (a single one for a batch of
  one row), which injects <start_of_world><end_of_world> after BOS unless the rows carry them and builds
  the VAE input; logits_to_keep (B, K) positions of the given ids follow the injected markers.
- `as_ids(name, value, shape=None, bounds=None)`: an int32 (B, L) array, range-checked before the cast.
- `prepare_video(images_or_clips, size=(512, 512), value_range="minus_one_one", convert_rgb=False)`:
  PIL images, (H, W, 3) uint8 arrays or clips -> (B, T, H, W, 3) float32 VAE input.
- `validate_world_batch`, `inject_world_tokens`, `check_fused_length`: the world markers on the host.
"""

from theworld_jax.inputs._batch import Batch, InputSpec, as_ids, prepare_batch
from theworld_jax.inputs._video import prepare_video
from theworld_jax.inputs._world import check_fused_length, inject_world_tokens, validate_world_batch

__all__ = ["Batch", "InputSpec", "as_ids", "check_fused_length", "inject_world_tokens", "prepare_batch",
           "prepare_video", "validate_world_batch"]
