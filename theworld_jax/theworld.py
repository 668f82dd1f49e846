"""The public, HuggingFace-style TheWorld: from_pretrained, __call__, generate, save_pretrained."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from theworld_jax import sharding, sources
from theworld_jax.checkpoint import restore_params, save_params
from theworld_jax.config import Gemma3Config, TheWorldConfig, WanVAEConfig, read_json_config
from theworld_jax.generation import BucketPolicy, Decoding, start, stream_text
from theworld_jax.inputs import Batch, InputSpec, prepare_batch
from theworld_jax.io_safety import atomic_directory
from theworld_jax.jit import LARGE_PROGRAM_OPTIONS, compiler_options
from theworld_jax.modeling.theworld import batch_layout
from theworld_jax.modeling.theworld import ForwardOutput, TheWorldModel, make_world_projector
from theworld_jax.processing import add_world_tokens, load_processor, original_vocab_size

GEMMA_CONFIG_FILE = "gemma_config.json"
VAE_CONFIG_FILE = "vae_config.json"


class TheWorld:
    """Gemma 3 fused with Cosmos world latents. Build it with `TheWorld.from_pretrained`.

    Attributes: `config` (TheWorldConfig), `gemma_config`, `vae_config`, `processor` (a transformers
    Gemma3Processor with the world tokens, or None), `model` (the TheWorldModel NNX module), `input_spec`
    (what `theworld_jax.inputs.prepare_batch` needs to prepare this model's batches).
    """

    def __init__(self, model: TheWorldModel, config: TheWorldConfig, gemma_config: Gemma3Config,
                 vae_config: WanVAEConfig | None, processor=None, *, raw_configs: dict[str, dict], mesh=None,
                 sources: tuple[str, ...] = ()):
        self.model = model
        self.mesh = mesh
        self.config = config
        self.gemma_config = gemma_config
        self.vae_config = vae_config
        self.processor = processor
        self._raw_configs = raw_configs
        self.input_spec = InputSpec(gemma_config, config, vae_config, dtype=model.gemma.dtype)
        self.sources = tuple(sources)  # the local directories read: save_pretrained never replaces them

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
        from theworld_jax.cosmos_vae import CosmosVAE
        from theworld_jax.modeling.gemma3 import Gemma3Model
        from theworld_jax.weights.gemma3_keys import load_gemma3, read_gemma3_config

        gemma_config = read_gemma3_config(gemma_dir)
        shardings = None
        if mesh is not None:
            abstract = nnx.eval_shape(lambda: Gemma3Model(gemma_config, dtype=dtype, rngs=nnx.Rngs(0)))
            shardings = sharding.param_shardings(abstract, mesh)
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
            vae = sharding.shard_module(vae, mesh)
            projector = sharding.shard_module(projector, mesh)
        model = TheWorldModel(config, gemma, vae, projector)
        read_from = (gemma_dir, projector_ckpt, config.cosmos_model_name if vae is not None else None)
        return cls(model, config, gemma_config, vae_config, processor, raw_configs=raw, mesh=mesh,
                   sources=tuple(s for s in read_from if s is not None))

    @classmethod
    def _from_upstream(cls, directory: str, *, dtype, overrides: dict, mesh=None) -> TheWorld:
        config = read_json_config(directory, TheWorldConfig.from_upstream_dict)
        config = dataclasses.replace(config, **overrides)
        gemma_dir = sources.resolve(config.gemma_model_name)
        return cls._assemble(gemma_dir, config, dtype=dtype, seed=0, projector_ckpt=directory, mesh=mesh)

    @classmethod
    def _from_saved(cls, directory: str, *, dtype, overrides: dict, mesh=None) -> TheWorld:
        config = read_json_config(directory, TheWorldConfig.from_dict)
        unsupported = sorted(k for k, v in overrides.items() if getattr(config, k) != v
                             and k in ("enable_world", "world_projection_mode", "projection_architecture"))
        if unsupported:
            raise ValueError(f"{directory!r} was saved with other {unsupported}; these shape its parameters")
        config = dataclasses.replace(config, **overrides)
        raw = {name: sources.read_config(directory, name) for name in (GEMMA_CONFIG_FILE, VAE_CONFIG_FILE)
               if os.path.exists(os.path.join(directory, name))}
        gemma_config = Gemma3Config.from_json_file(os.path.join(directory, GEMMA_CONFIG_FILE))
        vae_config = (WanVAEConfig.from_json_file(os.path.join(directory, VAE_CONFIG_FILE)) if config.enable_world
                      else None)
        abstract = nnx.eval_shape(lambda: TheWorldModel.create(config, gemma_config, vae_config, dtype=dtype,
                                                               rngs=nnx.Rngs(0)))
        shardings = None if mesh is None else sharding.param_shardings(abstract, mesh)
        model = restore_params(abstract, directory, shardings=shardings)
        processor = load_processor(directory)
        return cls(model, config, gemma_config, vae_config, processor, raw_configs=raw, mesh=mesh,
                   sources=(directory,))

    def save_pretrained(self, directory: str, *, overwrite: bool = False) -> None:
        """Write an Orbax checkpoint loadable by `TheWorld.from_pretrained(directory)`, atomically.

        An existing file or non-empty directory is replaced only with `overwrite=True`, and never one the
        model was read from (nor the current directory): the rules of theworld_jax.io_safety.
        """
        with atomic_directory(directory, overwrite=overwrite, sources=self.sources) as tmp:
            self.save_configs(tmp)
            save_params(self.model, tmp)

    def save_configs(self, directory: str) -> None:
        """Write what save_pretrained writes beside the parameters into the existing `directory`:
        config.json, the base models' configs and the processor files."""
        self.config.to_json_file(os.path.join(directory, "config.json"))
        for name, raw in self._raw_configs.items():
            with open(os.path.join(directory, name), "w") as f:
                json.dump(raw, f, indent=2)
        if self.processor is not None:
            self.processor.save_pretrained(directory)

    # ------------------------------------------------------------------ forward
    def __call__(self, input_ids, attention_mask=None, pixel_values=None, token_type_ids=None,
                 images=None, labels=None, position_ids=None, *, logits_to_keep=None,
                 remat: str = "none") -> ForwardOutput:
        """Logits (B, L_out, V) of the (fused) sequence; `.loss` when labels are given.

        `images`: one per row, PIL images, (H, W, 3) uint8 arrays or (T, H, W, 3) clips, for the world
        branch (a single image or clip for a batch of one row). Without them (or with enable_world=False)
        this is exactly Gemma 3. The inputs are checked and converted by `theworld_jax.inputs.prepare_batch`.
        logits_to_keep: None (all positions), an int N (the last N) or (B, K) positions of input_ids
        (-1 = none; e.g. `fusion.labelled_positions(labels)`): logits (B, K, V) there, and the loss from
        them alone. remat: a decoder remat policy name (modeling.gemma3_text.REMAT_POLICIES).
        """
        static = isinstance(logits_to_keep, (int, np.integer))
        last = int(logits_to_keep) if static else None  # static: it fixes the logits' shape
        batch = prepare_batch(self.input_spec, input_ids, attention_mask, pixel_values=pixel_values,
                              token_type_ids=token_type_ids, labels=labels, position_ids=position_ids, images=images,
                              logits_to_keep=None if static else logits_to_keep)
        layout = batch_layout(batch, self.config.world_attention)
        if self.mesh is not None:
            batch = jax.tree.map(lambda v: jax.device_put(v, sharding.batch_sharding(self.mesh, v.shape)), batch)
        # Outside jit: the forward's stages run as programs of their own (jit.shared_call), the decoder's
        # identical layer groups one program for all, so a first call compiles a fraction of the whole
        # (bench/results/compile_gpu.md, tenth session: 12 s against 18 s for one program on an H200)
        with sharding.activate(self.mesh), compiler_options(LARGE_PROGRAM_OPTIONS):
            return _forward(self.model, batch, last=last, layout=layout, remat=remat)

    # ------------------------------------------------------------------ generation
    def generate(self, input_ids, attention_mask=None, pixel_values=None, token_type_ids=None, images=None, *,
                 max_new_tokens: int = 32, do_sample: bool = False, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int = 0,
                 eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None,
                 vocab_limit: int | None = None, buckets: BucketPolicy = BucketPolicy()) -> np.ndarray:
        """Prompt (with the world tokens when injected) + new tokens (B, L + n), like transformers'
        generate. eos_token_id: an id, ids, or () for none (default: the config's); pad_token_id (default:
        the config's); vocab_limit: ids >= it are never produced (default: the tokenizer's length before
        the world tokens); buckets: the padding policy (theworld_jax.generation.BucketPolicy)."""
        decoding = self._start(input_ids, attention_mask, pixel_values, token_type_ids, images,
                               max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                               top_k=top_k, top_p=top_p, seed=seed, eos_token_id=eos_token_id,
                               pad_token_id=pad_token_id, vocab_limit=vocab_limit, buckets=buckets)
        with sharding.activate(self.mesh):
            decoding.advance()
        return decoding.sequences()

    def generate_stream(self, input_ids, attention_mask=None, pixel_values=None, token_type_ids=None,
                        images=None, *, chunk: int = 1, **options) -> Iterator[str]:
        """An iterator of text pieces of a one-row prompt's answer as it is produced (`chunk` tokens per
        device call); `options` as for `generate`."""
        decoding = self._start(input_ids, attention_mask, pixel_values, token_type_ids, images, **options)
        return stream_text(decoding, self.processor.tokenizer, chunk=chunk)

    def _start(self, input_ids, attention_mask, pixel_values, token_type_ids, images, *, vocab_limit=None,
               **options) -> Decoding:
        batch = prepare_batch(self.input_spec, input_ids, attention_mask, pixel_values=pixel_values,
                              token_type_ids=token_type_ids, images=images)
        if vocab_limit is None:
            vocab_limit = original_vocab_size(self.processor, self.gemma_config.text.vocab_size)
        with sharding.activate(self.mesh):
            return start(self.model, batch, vocab_limit=vocab_limit, **options)

    def num_world_tokens(self, frames: int = 1) -> int:
        """World tokens per row for a clip of `frames` frames (1 for an image)."""
        return self.input_spec.world_tokens(frames)


def _forward(model: TheWorldModel, batch: Batch, *, last, layout, remat) -> ForwardOutput:
    inputs = batch.model_inputs()
    if last is not None:
        inputs["logits_to_keep"] = last
    return model.forward(**inputs, layout=layout, remat=remat)
