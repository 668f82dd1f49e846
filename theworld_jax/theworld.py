"""The public, HuggingFace-style TheWorld: from_pretrained, __call__, generate, save_pretrained."""

from __future__ import annotations

import dataclasses
import json
import os
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from theworld_jax import sharding, sources
from theworld_jax.checkpoint import atomic_directory, restore_params, save_params
from theworld_jax.config.gemma3 import Gemma3Config
from theworld_jax.config.theworld import TheWorldConfig
from theworld_jax.config.wan_vae import WanVAEConfig
from theworld_jax.modeling.fusion import check_fused_length, inject_world_tokens
from theworld_jax.modeling.theworld import ForwardOutput, TheWorldModel, make_world_projector
from theworld_jax.processing import add_world_tokens, load_processor
from theworld_jax.vae_processing import prepare_video
from theworld_jax.weights.loader import abstract_params

GEMMA_CONFIG_FILE = "gemma_config.json"
VAE_CONFIG_FILE = "vae_config.json"


class TheWorld:
    """Gemma 3 fused with Cosmos world latents. Build it with `TheWorld.from_pretrained`.

    Attributes: `config` (TheWorldConfig), `gemma_config`, `vae_config`, `processor` (a transformers
    Gemma3Processor with the world tokens, or None), `model` (the TheWorldModel NNX module).
    """

    def __init__(self, model: TheWorldModel, config: TheWorldConfig, gemma_config: Gemma3Config,
                 vae_config: WanVAEConfig | None, processor=None, *, raw_configs: dict[str, dict], mesh=None):
        self.model = model
        self.mesh = mesh
        self.config = config
        self.gemma_config = gemma_config
        self.vae_config = vae_config
        self.processor = processor
        self._raw_configs = raw_configs
        self._graphdef, self._state = nnx.split(model)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, path_or_id: str, *, enable_world: bool | None = None,
                        cosmos_model_name: str | None = None, dtype=jnp.bfloat16, mesh=None,
                        seed: int = 0, **settings: Any) -> TheWorld:
        """Load from a HF Gemma 3 dir, a TheWorld-JAX checkpoint, an upstream PyTorch TheWorld
        checkpoint, or a hub id (docs/design.md, section 5). `settings` are TheWorldConfig fields
        (world_projection_mode, projection_architecture, freeze_*, world_attention, vae_input_range, ...).
        """
        directory = sources.resolve(path_or_id)
        kind = sources.detect(directory)
        overrides = dict(settings)
        if enable_world is not None:
            overrides["enable_world"] = enable_world
        if cosmos_model_name is not None:
            overrides["cosmos_model_name"] = cosmos_model_name
        if kind == "theworld_jax":
            return cls._from_saved(directory, dtype=dtype, overrides=overrides, mesh=mesh)
        if kind == "the_world":
            return cls._from_upstream(directory, dtype=dtype, overrides=overrides, mesh=mesh)
        overrides.setdefault("enable_world", True)
        config = TheWorldConfig(gemma_model_name=path_or_id, **overrides)
        return cls._assemble(directory, config, dtype=dtype, seed=seed, projector_ckpt=None, mesh=mesh)

    @classmethod
    def _assemble(cls, gemma_dir: str, config: TheWorldConfig, *, dtype, seed: int,
                  projector_ckpt: str | None, mesh=None) -> TheWorld:
        """Gemma from `gemma_dir`; when the world is on, the VAE from config.cosmos_model_name and the
        projector from `projector_ckpt` (an upstream checkpoint dir) or initialised from `seed`."""
        from theworld_jax.modeling.cosmos_vae import CosmosVAE
        from theworld_jax.modeling.gemma3 import Gemma3Model
        from theworld_jax.weights.gemma3_keys import load_gemma3, read_gemma3_config

        gemma_config = read_gemma3_config(gemma_dir)
        shardings = None
        if mesh is not None:
            abstract = nnx.eval_shape(lambda: Gemma3Model(gemma_config, dtype=dtype, rngs=nnx.Rngs(0)))
            shardings = sharding.param_shardings(abstract_params(abstract), mesh)
        gemma_config, gemma = load_gemma3(gemma_dir, dtype=dtype, config=gemma_config, shardings=shardings)
        raw = {GEMMA_CONFIG_FILE: sources.read_config(gemma_dir)}
        processor = load_processor(gemma_dir)
        vae, vae_config, projector = None, None, None
        if config.enable_world:
            if processor is None:
                raise ValueError(f"{gemma_dir!r} holds no processor/tokenizer files; the world branch needs "
                                 "one to add <start_of_world>/<end_of_world>")
            sow, eow = add_world_tokens(processor, gemma_config.text.vocab_size)
            config = dataclasses.replace(config, sow_token_id=sow, eow_token_id=eow)
            if not config.cosmos_model_name:
                raise ValueError("the world branch needs cosmos_model_name: a diffusers VAE directory or hub id")
            vae = CosmosVAE.from_pretrained(config.cosmos_model_name, dtype=dtype)
            vae_config = vae.config
            raw[VAE_CONFIG_FILE] = vae_config.to_dict()
            if projector_ckpt is None:
                projector = make_world_projector(config, gemma_config, vae_config, dtype=dtype,
                                                 rngs=nnx.Rngs(seed))
            else:
                from theworld_jax.weights.world_projector_keys import load_upstream_projector

                abstract = nnx.eval_shape(lambda: make_world_projector(
                    config, gemma_config, vae_config, dtype=dtype, rngs=nnx.Rngs(0)))
                projector = load_upstream_projector(abstract, projector_ckpt, config)
        if mesh is not None and vae is not None:  # small: loaded, then moved onto the mesh
            vae = sharding.shard_module(vae, mesh, prefix="vae.")
            projector = sharding.shard_module(projector, mesh, prefix="world_projector.")
        model = TheWorldModel(gemma, vae, projector)
        return cls(model, config, gemma_config, vae_config, processor, raw_configs=raw, mesh=mesh)

    @classmethod
    def _from_upstream(cls, directory: str, *, dtype, overrides: dict, mesh=None) -> TheWorld:
        config = TheWorldConfig.from_upstream_dict(sources.read_config(directory))
        config = dataclasses.replace(config, **overrides)
        gemma_dir = sources.resolve(config.gemma_model_name)
        return cls._assemble(gemma_dir, config, dtype=dtype, seed=0, projector_ckpt=directory, mesh=mesh)

    @classmethod
    def _from_saved(cls, directory: str, *, dtype, overrides: dict, mesh=None) -> TheWorld:
        config = TheWorldConfig.from_dict(sources.read_config(directory))
        unsupported = sorted(k for k, v in overrides.items() if getattr(config, k) != v
                             and k in ("enable_world", "world_projection_mode", "projection_architecture"))
        if unsupported:
            raise ValueError(f"{directory!r} was saved with other {unsupported}; these shape its parameters")
        config = dataclasses.replace(config, **overrides)
        raw = {name: sources.read_config(directory, name) for name in (GEMMA_CONFIG_FILE, VAE_CONFIG_FILE)
               if os.path.exists(os.path.join(directory, name))}
        gemma_config = Gemma3Config.from_dict(raw[GEMMA_CONFIG_FILE])
        vae_config = WanVAEConfig.from_dict(raw[VAE_CONFIG_FILE]) if config.enable_world else None
        abstract = nnx.eval_shape(lambda: TheWorldModel.create(config, gemma_config, vae_config, dtype=dtype,
                                                               rngs=nnx.Rngs(0)))
        shardings = None if mesh is None else sharding.param_shardings(abstract_params(abstract), mesh)
        model = restore_params(abstract, directory, shardings=shardings)
        processor = load_processor(directory)
        return cls(model, config, gemma_config, vae_config, processor, raw_configs=raw, mesh=mesh)

    def save_pretrained(self, directory: str) -> None:
        """Write an Orbax checkpoint loadable by `TheWorld.from_pretrained(directory)` (atomically)."""
        with atomic_directory(directory) as tmp:
            self.config.to_json_file(os.path.join(tmp, "config.json"))
            for name, raw in self._raw_configs.items():
                with open(os.path.join(tmp, name), "w") as f:
                    json.dump(raw, f, indent=2)
            if self.processor is not None:
                self.processor.save_pretrained(tmp)
            save_params(self.model, tmp)

    # ------------------------------------------------------------------ forward
    def __call__(self, input_ids, attention_mask=None, pixel_values=None, token_type_ids=None,
                 images=None, labels=None, position_ids=None) -> ForwardOutput:
        """Logits (B, L_out, V) of the (fused) sequence; `.loss` when labels are given.

        `images`: one per row, PIL images, (H, W, 3) uint8 arrays or (T, H, W, 3) clips, for the world
        branch. Without them (or with enable_world=False) this is exactly Gemma 3.
        """
        batch = self._prepare(input_ids, attention_mask, pixel_values, token_type_ids, images, labels,
                              position_ids)
        if self.mesh is not None:
            batch = {k: None if v is None else jax.device_put(v, sharding.batch_sharding(self.mesh, v.shape))
                     for k, v in batch.items()}
        return _forward_jit(self._graphdef, self._state, config=self.config, **batch)

    def _prepare(self, input_ids, attention_mask, pixel_values, token_type_ids, images, labels,
                 position_ids) -> dict:
        """Host-side checks and conversion; world tokens injected and the VAE input built."""
        input_ids = _as_ids("input_ids", input_ids)
        b, length = input_ids.shape
        vocab = self.gemma_config.text.vocab_size
        if input_ids.min() < 0 or input_ids.max() >= vocab:
            raise ValueError(f"input_ids must lie in [0, {vocab}); got values from {input_ids.min()} to "
                             f"{input_ids.max()}")
        attention_mask = (np.ones_like(input_ids) if attention_mask is None
                          else _as_ids("attention_mask", attention_mask, (b, length)))
        token_type_ids = None if token_type_ids is None else _as_ids("token_type_ids", token_type_ids, (b, length))
        labels = None if labels is None else _as_ids("labels", labels, (b, length))
        position_ids = None if position_ids is None else _as_ids("position_ids", position_ids, (b, length))
        video = None
        if images is not None:
            if not self.config.enable_world:
                raise ValueError("images were given but the world branch is disabled (enable_world=False)")
            if position_ids is not None:
                raise ValueError("position_ids cannot be given with images: the world tokens change positions")
            if len(images) != b:
                raise ValueError(f"got {len(images)} images/clips for a batch of {b} rows; pass one per row")
            c = self.config
            input_ids, attention_mask, token_type_ids, labels = inject_world_tokens(
                input_ids, attention_mask, token_type_ids, labels, bos_id=self.gemma_config.text.bos_token_id,
                sow_id=c.sow_token_id, eow_id=c.eow_token_id)
            video = prepare_video(images, size=c.vae_image_size, value_range=c.vae_input_range)
            check_fused_length(input_ids.shape[1], self.num_world_tokens(video.shape[1]),
                               self.gemma_config.text.max_position_embeddings)
        if pixel_values is not None:
            pixel_values = jnp.asarray(np.asarray(pixel_values), self.model.gemma.dtype)
        return dict(input_ids=jnp.asarray(input_ids), attention_mask=jnp.asarray(attention_mask),
                    pixel_values=pixel_values,
                    token_type_ids=None if token_type_ids is None else jnp.asarray(token_type_ids),
                    labels=None if labels is None else jnp.asarray(labels),
                    position_ids=None if position_ids is None else jnp.asarray(position_ids),
                    video=None if video is None else jnp.asarray(video))

    # ------------------------------------------------------------------ generation
    def generate(self, input_ids, attention_mask=None, pixel_values=None, token_type_ids=None, images=None, *,
                 max_new_tokens: int = 32, do_sample: bool = False, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int = 0, **kwargs) -> np.ndarray:
        """Prompt (with the world tokens when injected) + new tokens (B, L + n), like transformers'
        generate; `kwargs`: eos_token_id, pad_token_id, vocab_limit, buckets (theworld_jax.generation)."""
        from theworld_jax.generation import start_theworld

        decoding = start_theworld(self, input_ids, attention_mask, pixel_values, token_type_ids, images,
                                  max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                                  top_k=top_k, top_p=top_p, seed=seed, **kwargs)
        decoding.advance()
        return decoding.sequences()

    def generate_stream(self, input_ids, attention_mask=None, pixel_values=None, token_type_ids=None,
                        images=None, *, chunk: int = 1, **kwargs):
        """An iterator of text pieces of a one-row prompt's answer as it is produced (`chunk` tokens per
        device call); `kwargs` as for `generate`."""
        from theworld_jax.generation import start_theworld, stream_text

        decoding = start_theworld(self, input_ids, attention_mask, pixel_values, token_type_ids, images, **kwargs)
        return stream_text(decoding, self.processor.tokenizer, chunk=chunk)

    def num_world_tokens(self, frames: int = 1) -> int:
        """World tokens per row for a clip of `frames` frames (1 for an image)."""
        from theworld_jax.modeling.world_projector import num_world_tokens

        return num_world_tokens(self.config.world_projection_mode, self.vae_config, self.config.vae_image_size,
                                frames)


@partial(jax.jit, static_argnames=("graphdef", "config"))
def _forward_jit(graphdef, state, *, config, **batch) -> ForwardOutput:
    model = nnx.merge(graphdef, state)
    return model.forward(**batch, config=config)


def _as_ids(name: str, value, shape: tuple[int, int] | None = None) -> np.ndarray:
    """An int32 (B, L) array from a list / NumPy / JAX / torch value, with a clear error otherwise."""
    array = np.asarray(value.numpy() if hasattr(value, "numpy") and not isinstance(value, np.ndarray) else value)
    if array.ndim == 1:
        array = array[None]
    if array.ndim != 2 or 0 in array.shape:
        raise ValueError(f"{name} must be a non-empty (batch, length) array; got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.integer) and not np.issubdtype(array.dtype, np.bool_):
        raise ValueError(f"{name} must hold integers; got dtype {array.dtype}")
    if shape is not None and array.shape != shape:
        raise ValueError(f"{name} has shape {array.shape}, expected {shape} like input_ids")
    return array.astype(np.int32)
