"""TheWorldModel: Gemma 3 + the Cosmos VAE encoder + the world projector, as one NNX module.

`forward` is traceable (no host work): the caller prepares the VAE input and injects the world tokens
on the host (`theworld_jax.inputs.prepare_batch`), then runs this under jit.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from theworld_jax.attention import AttentionMask, Layout, block_layout
from theworld_jax.config.gemma3 import Gemma3Config
from theworld_jax.config.theworld import TheWorldConfig
from theworld_jax.config.wan_vae import WanVAEConfig
from theworld_jax.modeling.cosmos_vae import CosmosVAE
from theworld_jax.modeling.fusion import FusedBatch, causal_lm_loss, causal_lm_loss_at, splice_world
from theworld_jax.jit import shared_call
from theworld_jax.modeling.gemma3 import Gemma3Model, decoder_inputs
from theworld_jax.modeling.world_projector import (WorldProjector, latents_to_tokens, num_world_tokens,
                                                   projector_in_features)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ForwardOutput:
    """logits (B, L_out, V) float32 (B, K, V with logits_to_keep); loss () when labels were given; the fused
    attention_mask (B, L_out)."""

    logits: jax.Array
    loss: jax.Array | None = None
    attention_mask: jax.Array | None = None


class TheWorldModel(nnx.Module):
    """The fused network, owning its `config`. `vae` and `world_projector` are None when the world branch
    is disabled."""

    def __init__(self, config: TheWorldConfig, gemma: Gemma3Model, vae: CosmosVAE | None,
                 world_projector: WorldProjector | None):
        self.config = config
        self.gemma = gemma
        self.vae = vae
        self.world_projector = world_projector

    @classmethod
    def create(cls, config: TheWorldConfig, gemma_config: Gemma3Config, vae_config: WanVAEConfig | None, *,
               dtype, rngs: nnx.Rngs) -> TheWorldModel:
        """A randomly initialised model of the given configs (use under nnx.eval_shape for loading)."""
        gemma = Gemma3Model(gemma_config, dtype=dtype, rngs=rngs)
        if not config.enable_world:
            return cls(config, gemma, None, None)
        vae = CosmosVAE(vae_config, dtype=dtype, rngs=rngs)
        projector = make_world_projector(config, gemma_config, vae_config, dtype=dtype, rngs=rngs)
        return cls(config, gemma, vae, projector)

    @property
    def gemma_config(self) -> Gemma3Config:
        return self.gemma.config

    @property
    def language_model(self):
        return self.gemma.language_model

    def world_embeddings(self, video: jax.Array) -> jax.Array:
        """video (B, T, H, W, 3) as the VAE expects it -> world tokens (B, N, D) in the LM dtype."""
        return self.project_world(self.encode_media(video=video).world_latents)

    def project_world(self, latents: jax.Array) -> jax.Array:
        """The VAE's latent means (B, T', H', W', z) -> world tokens (B, N, D) in the LM dtype."""
        return self.world_projector(latents_to_tokens(latents, self.config.world_projection_mode))

    def encode_media(self, pixel_values=None, video=None) -> Media:
        """The frozen encoders' part of the forward, which a caller may run apart (the training step does,
        as its own program): SigLIP + Gemma's projector on pixel_values (N_img, C, S, S), the VAE encoder
        on video (B, T, H, W, 3)."""
        if pixel_values is not None and self.gemma.vision_tower is None:
            raise ValueError("pixel_values were given, but this is a text-only Gemma 3 (no vision_config)")
        if video is not None and self.vae is None:
            raise ValueError("a video was given, but this TheWorld has no world branch (enable_world=False)")
        if pixel_values is not None:
            self.gemma.vision_tower.check_pixels(pixel_values)
        image = None if pixel_values is None else self.gemma.image_features(pixel_values)
        world = None if video is None else self.vae.encode_mean(video.astype(self.vae.dtype))
        return Media(image, world)

    def lm_inputs(self, input_ids, attention_mask, *, pixel_values=None, token_type_ids=None, labels=None,
                  video=None, media: Media | None = None) -> FusedBatch:
        """The decoder's inputs (B, L_out): Gemma embeddings with image features, and the world tokens
        spliced in after each row's <start_of_world> when `video` is given. media: `encode_media`'s output
        computed apart (pixel_values and video are then not read)."""
        media = self.encode_media(pixel_values, video) if media is None else media
        if media.world_latents is None:
            return self.gemma.lm_inputs(input_ids, attention_mask, token_type_ids=token_type_ids, labels=labels,
                                        image_features=media.image_features)
        embeds = self.gemma.embed_inputs(input_ids, image_features=media.image_features)
        world = self.project_world(media.world_latents).astype(embeds.dtype)
        return splice_world(embeds, input_ids, attention_mask, token_type_ids, labels, world,
                            sow_id=self.config.sow_token_id, world_attention=self.config.world_attention)

    def forward(self, input_ids, attention_mask, *, pixel_values=None, token_type_ids=None, labels=None,
                video=None, position_ids=None, logits_to_keep=None, layout: Layout | None = None,
                remat: str = "none", implementation: str | None = None, media: Media | None = None) -> ForwardOutput:
        """input_ids/attention_mask (B, L) (world tokens already injected on the host when video is given).

        logits_to_keep: None (all), an int N (the last N fused positions) or (B, K) positions of input_ids
        (-1 = none), mapped past the world tokens; the loss then uses those logits only (each predicts the
        next label). layout: the fast attention path's static block bound of the fused sequence (default:
        from host token_type_ids plus the world block when world_attention="bidirectional"); remat: a
        decoder remat policy name; implementation: the attention kernel (None picks); media: `encode_media`'s
        output computed apart (pixel_values and video are then not read).
        """
        inputs = self.fused_inputs(input_ids, attention_mask, pixel_values=pixel_values,
                                   token_type_ids=token_type_ids, labels=labels, video=video,
                                   position_ids=position_ids, logits_to_keep=logits_to_keep, layout=layout,
                                   media=media)
        hidden, _ = self.language_model(inputs.embeds, positions=inputs.positions, mask=inputs.mask, remat=remat,
                                        implementation=implementation, keep=inputs.keep)
        logits = shared_call(self.language_model, hidden, method="logits")
        loss = None if labels is None else _loss(logits, inputs.labels, inputs.keep)
        return ForwardOutput(logits=logits, loss=loss, attention_mask=inputs.attention_mask)

    def fused_inputs(self, input_ids, attention_mask, *, pixel_values=None, token_type_ids=None, labels=None,
                     video=None, position_ids=None, logits_to_keep=None, layout: Layout | None = None,
                     media: Media | None = None) -> DecoderInputs:
        """`forward`'s first stage (its arguments as there): the decoder's inputs, as one program
        (`decoder_inputs`)."""
        encoded_world = media is not None and media.world_latents is not None
        world = self.config.enable_world and (video is not None or encoded_world)
        if layout is None:
            bidirectional = world and self.config.world_attention == "bidirectional"
            extra = (self._world_token_count(video, media),) if bidirectional else ()
            layout = block_layout(token_type_ids, attention_mask, extra_blocks=extra)
        last = logits_to_keep if isinstance(logits_to_keep, (int, np.integer)) else None
        keep = None if last is not None else logits_to_keep
        if media is not None:
            pixel_values = video = None
        return shared_call(self, input_ids, attention_mask, pixel_values, token_type_ids, labels, video, position_ids,
                           keep, media, method="decoder_inputs", last=None if last is None else int(last), layout=layout)

    def _world_token_count(self, video, media: Media | None) -> int:
        """N of the world tokens of one row, from the video's shape or else the encoded latents'."""
        mode = self.config.world_projection_mode
        if video is not None:
            return num_world_tokens(mode, self.vae.config, tuple(video.shape[2:4]), video.shape[1])
        return jax.eval_shape(lambda latents: latents_to_tokens(latents, mode), media.world_latents).shape[1]

    def decoder_inputs(self, input_ids, attention_mask, pixel_values, token_type_ids, labels, video, position_ids,
                       logits_to_keep, media, *, last: int | None, layout: Layout) -> DecoderInputs:
        """Everything `forward` computes before the decoder layers (the fused embeddings, the mask, the
        positions and the kept positions mapped past the world tokens), as one program."""
        fused = self.lm_inputs(input_ids, attention_mask, pixel_values=pixel_values, token_type_ids=token_type_ids,
                               labels=labels, video=video, media=media)
        b, length = fused.attention_mask.shape
        world = length - input_ids.shape[1]
        keep = last if logits_to_keep is None else jnp.asarray(logits_to_keep)
        if logits_to_keep is not None and world:
            sow = jnp.argmax(input_ids == self.config.sow_token_id, axis=1)[:, None]
            keep = jnp.where(keep > sow, keep + world, keep)
        positions = fused.positions if position_ids is None else position_ids
        mask, positions, keep = decoder_inputs(self.gemma_config, fused.embeds, fused.attention_mask,
                                               fused.token_type_ids, positions, logits_to_keep=keep, layout=layout)
        return DecoderInputs(fused.embeds, positions, mask, keep, fused.labels, fused.attention_mask)


class Media(NamedTuple):
    """The frozen encoders' outputs (`TheWorldModel.encode_media`): image_features (N_img, T_img, D) from
    SigLIP and Gemma's projector, world_latents (B, T', H', W', z) the VAE's latent means; None where the
    batch has no such input."""

    image_features: jax.Array | None = None
    world_latents: jax.Array | None = None


class DecoderInputs(NamedTuple):
    """What TheWorldModel.forward feeds its decoder: embeds (B, L, D), positions (B, L), the mask, keep
    (B, K) or None, and the fused labels and attention_mask (B, L) (labels None without labels)."""

    embeds: jax.Array
    positions: jax.Array
    mask: AttentionMask
    keep: jax.Array | None
    labels: jax.Array | None
    attention_mask: jax.Array


@jax.jit
def _loss(logits, labels, keep):
    return causal_lm_loss(logits, labels) if keep is None else causal_lm_loss_at(logits, labels, keep)


def make_world_projector(config: TheWorldConfig, gemma_config: Gemma3Config, vae_config: WanVAEConfig, *,
                         dtype, rngs: nnx.Rngs) -> WorldProjector:
    """The projector from VAE latent tokens to the LM width, sized by the projection mode."""
    in_features = projector_in_features(config.world_projection_mode, vae_config.z_dim,
                                        config.vae_image_size, vae_config.spatial_factor)
    return WorldProjector(in_features, gemma_config.text.hidden_size, config.projection_architecture,
                          dtype=dtype, rngs=rngs)


def batch_layout(batch, world_attention: str) -> Layout | None:
    """The fast attention path's static block bound (attention.Layout) for a prepared `inputs.Batch`: the
    runs of its host token_type_ids, plus the world block when world_attention is "bidirectional"."""
    extra = (batch.world_tokens,) if batch.world_tokens and world_attention == "bidirectional" else ()
    return block_layout(batch.token_type_ids, batch.attention_mask, extra_blocks=extra)
