"""The public CosmosVAE: the network of theworld_jax.modeling.cosmos_vae, plus loading and export.

`CosmosVAE.from_pretrained` takes a diffusers AutoencoderKLWan directory, a directory with a vae/
subfolder, a hub id, or the output of `python -m convert cosmos-vae`; `save_pretrained` writes the
diffusers layout (config.json + diffusion_pytorch_model.safetensors), which diffusers loads.
"""

from __future__ import annotations

import os

import jax.numpy as jnp
from flax import nnx

from theworld_jax import sources
from theworld_jax.checkpoint import PARAMS_DIR, restore_params
from theworld_jax.config.wan_vae import WanVAEConfig
from theworld_jax.io_safety import atomic_directory
from theworld_jax.modeling import cosmos_vae
from theworld_jax.weights.wan_vae_keys import export_wan_vae, load_wan_vae


class CosmosVAE(cosmos_vae.CosmosVAE):
    """diffusers AutoencoderKLWan in Flax NNX (see theworld_jax.modeling.cosmos_vae for the network)."""

    @classmethod
    def from_pretrained(cls, path_or_id: str, dtype=jnp.float32) -> CosmosVAE:
        """Load a diffusers AutoencoderKLWan: a VAE dir, a dir with a vae/ subfolder, a hub id, or a
        converted (Orbax) VAE."""
        directory = sources.resolve_vae(path_or_id)
        if not os.path.isdir(os.path.join(directory, PARAMS_DIR)):
            return load_wan_vae(directory, dtype=dtype, cls=cls)
        config = WanVAEConfig.from_json_file(os.path.join(directory, "config.json"))
        return restore_params(nnx.eval_shape(lambda: cls(config, dtype=dtype, rngs=nnx.Rngs(0))), directory)

    def save_pretrained(self, directory: str, *, overwrite: bool = False) -> None:
        """Write the diffusers layout into `directory` (atomically), loadable by
        diffusers.AutoencoderKLWan.from_pretrained and by `CosmosVAE.from_pretrained`; an existing
        output is replaced only with `overwrite=True` (the rules of theworld_jax.io_safety)."""
        with atomic_directory(directory, overwrite=overwrite, what="VAE output") as tmp:
            export_wan_vae(self, tmp)
