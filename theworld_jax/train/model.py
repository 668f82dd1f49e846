"""The one place training touches TheWorld's internals: building the model, freezing, the loss.

`build_theworld` makes the TheWorld to train (a tiny random one, a pretrained one, or an earlier run's
final/); `split_trainable` cuts its parameters into the trained (float32 master copies) and the frozen
(compute dtype) parts; `loss_terms` is the summed token cross-entropy and the token count of a batch.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from theworld_jax.modeling.fusion import causal_lm_loss_terms_at, labelled_positions
from theworld_jax.weights.loader import param_path

# Which parameters each freeze flag covers (a pattern on the parameter path); the world projector
# always trains.
FREEZE_GROUPS = {
    "freeze_gemma_vision": r"^gemma\.(vision_tower|multi_modal_projector)\.",
    "freeze_gemma_language": r"^gemma\.language_model\.",
    "freeze_cosmos_vae": r"^vae\.",
}

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _world_settings(model_cfg) -> dict:
    return dict(world_projection_mode=model_cfg.world_projection_mode,
                projection_architecture=model_cfg.projection_architecture,
                world_attention=model_cfg.world_attention,
                vae_image_size=tuple(model_cfg.vae_image_size),
                freeze_gemma_vision=model_cfg.freeze_gemma_vision,
                freeze_gemma_language=model_cfg.freeze_gemma_language,
                freeze_cosmos_vae=model_cfg.freeze_cosmos_vae)


def build_theworld(model_cfg, *, init: str | None, seed: int, mesh=None):
    """The TheWorld to train: from `init` (an earlier run's final/), a tiny random model built in place
    (model.name "tiny", theworld_jax.tiny's Gemma 3 and VAE), a random model of a real architecture
    (`random_init`: model.name a directory with a Gemma 3 config.json and processor files, benchmarks), or
    `TheWorld.from_pretrained(model.name)`. The new config's freeze flags apply. Loaded parameters are
    read straight onto `mesh` (with many processes, every process reads its own shards)."""
    from theworld_jax.theworld import TheWorld

    dtype = _DTYPES[model_cfg.dtype]
    settings = _world_settings(model_cfg)
    if init is not None:
        shape_fields = ("world_projection_mode", "projection_architecture", "vae_image_size")
        keep = {k: v for k, v in settings.items() if k not in shape_fields}
        return TheWorld.from_pretrained(init, dtype=dtype, mesh=mesh, **keep)
    if model_cfg.name == "tiny":
        from theworld_jax import tiny

        return build_random_theworld(tiny.gemma3_config_dict(), tiny.build_processor(), tiny.wan_vae_config(),
                                     dtype=dtype, seed=seed, enable_world=model_cfg.enable_world, **settings)
    if model_cfg.random_init:
        from theworld_jax.config.wan_vae import WanVAEConfig
        from theworld_jax.processing import load_processor
        from theworld_jax.sources import read_config

        cosmos = model_cfg.cosmos_model_name
        vae_config = WanVAEConfig.from_json_file(cosmos) if cosmos else WanVAEConfig()
        return build_random_theworld(read_config(model_cfg.name), load_processor(model_cfg.name), vae_config,
                                     dtype=dtype, seed=seed, enable_world=model_cfg.enable_world, **settings)
    return TheWorld.from_pretrained(model_cfg.name, enable_world=model_cfg.enable_world,
                                    cosmos_model_name=model_cfg.cosmos_model_name, dtype=dtype, seed=seed,
                                    mesh=mesh, **settings)


def build_random_theworld(raw_gemma: dict, processor, vae_config, *, dtype, seed: int, enable_world: bool = True,
                          **settings):
    """A TheWorld of random parameters (theworld_jax.tiny.random_like): the Gemma 3 of config.json dict
    `raw_gemma` with `processor`, and `vae_config`'s VAE."""
    from theworld_jax.config.gemma3 import Gemma3Config
    from theworld_jax.config.theworld import TheWorldConfig
    from theworld_jax.modeling.theworld import TheWorldModel
    from theworld_jax.processing import add_world_tokens
    from theworld_jax.theworld import GEMMA_CONFIG_FILE, VAE_CONFIG_FILE, TheWorld
    from theworld_jax.tiny import random_like

    gemma_config = Gemma3Config.from_dict(raw_gemma)
    sow, eow = add_world_tokens(processor, gemma_config.text.vocab_size)
    config = TheWorldConfig(gemma_model_name=None, cosmos_model_name=None, enable_world=enable_world,
                            sow_token_id=sow, eow_token_id=eow, **settings)
    vae_config = vae_config if enable_world else None
    model = random_like(lambda: TheWorldModel.create(config, gemma_config, vae_config, dtype=dtype,
                                                     rngs=nnx.Rngs(0)), seed)
    raw = {GEMMA_CONFIG_FILE: raw_gemma}
    if vae_config is not None:
        raw[VAE_CONFIG_FILE] = vae_config.to_dict()
    return TheWorld(model, config, gemma_config, vae_config, processor, raw_configs=raw)


def trainable_paths(model: nnx.Module, world_config) -> set[str]:
    """Paths of the parameters that train under `world_config`'s freeze flags."""
    frozen = [pattern for flag, pattern in FREEZE_GROUPS.items() if getattr(world_config, flag)]
    paths = {param_path(p) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    return {p for p in paths if not any(re.search(pattern, p) for pattern in frozen)}


@dataclasses.dataclass(frozen=True)
class SplitModel:
    """A model cut in two: the trained parameters (`template`, an nnx.State) and the rest, `frozen`: their
    values as a flat tuple of arrays (at `frozen_paths`), which a jitted step takes at a fraction of an
    nnx.State's per-call cost (flattening 883 variables through NNX took 2.2 ms per call on a CPU core).

    Training keeps the trained parameters as a flat {path: float32 array} (`initial_trainable`)."""

    graphdef: nnx.GraphDef
    template: nnx.State
    frozen_paths: tuple
    frozen: tuple

    def initial_trainable(self) -> dict[str, jax.Array]:
        """{path: float32 copy} of the trained parameters: new arrays even where the model is float32
        already, since the training step donates them and the model's own must survive it."""
        return {param_path(p): jnp.array(v.get_value(), dtype=jnp.float32, copy=True)
                for p, v in nnx.to_flat_state(self.template)}

    def merge(self, trainable: dict[str, jax.Array], frozen: tuple | None = None, *,
              cast: bool = False) -> nnx.Module:
        """The whole model with `trainable` (and `frozen` values, default the split's) in place, cast back
        to the stored dtypes when `cast`."""
        flat = []
        for path, var in nnx.to_flat_state(self.template):
            value = trainable[param_path(path)]
            flat.append((path, var.replace(value.astype(var.get_value().dtype) if cast else value)))
        rest = nnx.from_flat_state(list(zip(self.frozen_paths, self.frozen if frozen is None else frozen)))
        return nnx.merge(self.graphdef, nnx.from_flat_state(flat), rest)


def split_trainable(model: nnx.Module, paths: set[str]) -> SplitModel:
    """Cut `model` into the parameters at `paths` and everything else."""
    if not paths:
        raise ValueError("nothing to train: every parameter is frozen")

    def trains(path, value) -> bool:
        return isinstance(value, nnx.Param) and param_path(path) in paths

    graphdef, template, frozen = nnx.split(model, trains, ...)
    flat = nnx.to_flat_state(frozen)
    return SplitModel(graphdef, template, tuple(path for path, _ in flat), tuple(v.get_value() for _, v in flat))


def loss_terms(model: nnx.Module, batch: dict, *, layout, remat: str, media=None) -> tuple[jax.Array, jax.Array]:
    """(summed cross-entropy over target tokens, number of target tokens) of one micro-batch, from the
    logits of the labelled positions only.

    batch: input_ids / attention_mask / token_type_ids / labels (B, L) with the world markers already in
    the ids, keep (B, K) the labelled positions (`with_keep`), pixel_values (B, C, S, S) and video
    (B, 1, H, W, 3) when the rows have images. The markers and world tokens are never targets, so
    labels[p + 1] of the ids' position p is the target of the fused position p maps to. media: the
    encoders' outputs computed apart (TheWorldModel.encode_media), which pixel_values and video then are not.
    """
    out = model.forward(batch["input_ids"], batch["attention_mask"], pixel_values=batch.get("pixel_values"),
                        token_type_ids=batch.get("token_type_ids"), video=batch.get("video"),
                        logits_to_keep=batch["keep"], layout=layout, remat=remat, media=media)
    return causal_lm_loss_terms_at(out.logits, batch["labels"], batch["keep"])


def keep_size(target_counts: np.ndarray, multiple: int = 8) -> int:
    """K of `logits_to_keep` for every step: the most target tokens of a row, rounded up (one compile)."""
    most = int(target_counts.max()) if len(target_counts) else 1
    return -(-max(most, 1) // multiple) * multiple


def with_keep(batch: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    """`batch` plus "keep" (B, size): the positions whose next label is a target, padded with -1."""
    return {**batch, "keep": labelled_positions(batch["labels"], size)}


def attention_layout(theworld, image_start: int = 0):
    """The fast attention path's static bound for training rows (one image each, plus the world block
    when world attention is bidirectional; right padded, so no left padding): one compile whatever the batch.
    image_start: no row's image begins before this fused position (`Dataset.image_starts`)."""
    from theworld_jax.attention import Layout

    blocks = [theworld.gemma_config.mm_tokens_per_image]
    bidirectional = theworld.config.enable_world and theworld.config.world_attention == "bidirectional"
    if bidirectional:
        blocks.append(theworld.num_world_tokens(1))
    return Layout(tuple(sorted((-(-n // 8) * 8 for n in blocks), reverse=True)), left_padding=False,
                  block_start=0 if bidirectional else int(image_start))  # the world block begins after BOS


def extra_tokens(theworld) -> int:
    """Tokens the model adds to a row's text: the world tokens of one image and the two markers."""
    return theworld.num_world_tokens(1) + 2 if theworld.config.enable_world else 0


def image_preparer(theworld):
    """PIL image -> {"pixel_values" (C, S, S) float32, "image": the PIL image for the VAE input}."""
    image_processor = theworld.processor.image_processor

    def prepare(image) -> dict:
        pixels = image_processor(images=[image], return_tensors="np")["pixel_values"][0]
        return {"pixel_values": np.asarray(pixels, np.float32), "image": image}

    return prepare


def prepare(theworld, rows: dict) -> dict[str, np.ndarray]:
    """Padded rows (input_ids, attention_mask, token_type_ids, labels (n, L), pixel_values, images) ->
    the model's inputs through `theworld_jax.inputs.prepare_batch` (world markers injected, VAE input
    built), as host arrays."""
    from theworld_jax.inputs import prepare_batch

    images = rows.get("images") if theworld.config.enable_world else None
    batch = prepare_batch(theworld.input_spec, rows["input_ids"], rows["attention_mask"],
                          pixel_values=rows.get("pixel_values"), token_type_ids=rows["token_type_ids"],
                          labels=rows["labels"], images=images)
    return {k: np.asarray(v) for k, v in batch.model_inputs().items() if v is not None}
