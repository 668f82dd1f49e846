"""A diffusers AutoencoderKLWan checkpoint (config.json + diffusion_pytorch_model*.safetensors) <->
a `CosmosVAE`, both directions.

Our parameter paths mirror diffusers' names, so the rows follow from the model's parameters: `.kernel`
is `.weight` transposed to channels-last ((O, I, kt, kh, kw) -> (kt, kh, kw, I, O); (O, I, kh, kw) ->
(kh, kw, I, O); the attention's 1x1 convs (O, I, 1, 1) -> (I, O)), norm `gamma` (C, 1, 1[, 1]) -> (C,),
and the resample conv `resample` is diffusers' `resample.1` (index 0 is its ZeroPad2d / Upsample).
"""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
from flax import nnx

from theworld_jax.config.wan_vae import WanVAEConfig
from theworld_jax.modeling.cosmos_vae import CosmosVAE
from theworld_jax.weights.loader import KeyMap, Row, abstract_params, export_params, load_params, reshaped, transposed
from theworld_jax.weights.safetensors_io import SafetensorsReader, find_safetensors

WEIGHTS_PREFIX = "diffusion_pytorch_model"


def hf_key(path: str) -> str:
    """The diffusers key of parameter `path` ('encoder.down_blocks.2.resample.kernel' ->
    'encoder.down_blocks.2.resample.1.weight')."""
    module, _, leaf = path.rpartition(".")
    if module.endswith(".resample"):
        module += ".1"
    return f"{module}.{'weight' if leaf == 'kernel' else leaf}"


def _row(path: str, shape: tuple[int, ...]) -> Row:
    leaf = path.rpartition(".")[2]
    if leaf == "bias":
        return Row(path, hf_key(path))
    if leaf == "gamma":  # diffusers (C, 1, 1[, 1]): the 3D norms carry one more singleton than the 2D ones
        return Row(path, hf_key(path), *reshaped(shape, (shape[0], 1, 1, 1) if "attentions" not in path
                                                 else (shape[0], 1, 1)))
    if leaf == "kernel" and len(shape) == 2:  # a Linear over channels: diffusers' 1x1 Conv2d
        return Row(path, hf_key(path), lambda w: w.reshape(w.shape[:2]).T, lambda k: k.T.reshape(*k.T.shape, 1, 1))
    if leaf == "kernel":
        return Row(path, hf_key(path), *transposed(*range(2, len(shape)), 1, 0))
    raise ValueError(f"parameter {path!r} has no diffusers counterpart")


def wan_vae_key_map(abstract_model: nnx.Module) -> KeyMap:
    """Rows for every parameter of a (possibly abstract) CosmosVAE."""
    return tuple(_row(path, tuple(s.shape)) for path, s in abstract_params(abstract_model).items())


def load_wan_vae(directory: str, dtype=jnp.float32, cls=CosmosVAE) -> CosmosVAE:
    """A `cls` with config and weights read from a local diffusers AutoencoderKLWan directory."""
    config = WanVAEConfig.from_json_file(os.path.join(directory, "config.json"))
    abstract = nnx.eval_shape(lambda: cls(config, dtype=dtype, rngs=nnx.Rngs(0)))
    with SafetensorsReader(find_safetensors(directory, prefix=WEIGHTS_PREFIX)) as reader:
        return load_params(abstract, wan_vae_key_map(abstract), reader, desc="loading Wan VAE")


def export_wan_vae(vae: CosmosVAE, directory: str) -> None:
    """Write `vae` into `directory` (which must exist) as a diffusers AutoencoderKLWan checkpoint:
    config.json and diffusion_pytorch_model.safetensors, in the parameters' dtype."""
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(vae.config.to_dict(), f, indent=2)
    export_params(vae, wan_vae_key_map(vae), directory, prefix=WEIGHTS_PREFIX)
