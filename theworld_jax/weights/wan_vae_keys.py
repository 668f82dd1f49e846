"""diffusers AutoencoderKLWan checkpoint -> CosmosVAE parameters, and where such a checkpoint lives.

Our parameter paths mirror diffusers' names: `.kernel` is `.weight` transposed to channels-last
((O, I, kt, kh, kw) -> (kt, kh, kw, I, O); (O, I, kh, kw) -> (kh, kw, I, O); the attention's 1x1 convs
(O, I, 1, 1) -> (I, O)), norm `gamma` (C, 1, 1[, 1]) -> (C,), and the resample conv `resample` is
diffusers' `resample.1` (index 0 is its ZeroPad2d / Upsample).
"""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np
from flax import nnx

from theworld_jax.checkpoint import PARAMS_DIR, restore_params
from theworld_jax.weights.loader import Source, abstract_params, load_params
from theworld_jax.weights.safetensors_io import SafetensorsReader, find_safetensors

WEIGHTS_PREFIX = "diffusion_pytorch_model"


def _kernel_transform(ndim: int):
    if ndim == 5:
        return lambda w: np.transpose(w, (2, 3, 4, 1, 0))
    if ndim == 4:
        return lambda w: np.transpose(w, (2, 3, 1, 0))
    if ndim == 2:
        return lambda w: np.transpose(w.reshape(w.shape[0], w.shape[1]))
    raise ValueError(f"no kernel layout for rank {ndim}")


def _flat(w: np.ndarray) -> np.ndarray:
    return w.reshape(-1)


def hf_key(path: str) -> str:
    """The diffusers key of parameter `path` ('encoder.down_blocks.2.resample.kernel' ->
    'encoder.down_blocks.2.resample.1.weight')."""
    module, _, leaf = path.rpartition(".")
    if module.endswith(".resample"):
        module += ".1"
    return f"{module}.{'weight' if leaf == 'kernel' else leaf}"


def wan_vae_key_map(abstract_model: nnx.Module) -> dict[str, Source]:
    """{param path: Source} for every parameter of a (possibly abstract) CosmosVAE."""
    key_map = {}
    for path, struct in abstract_params(abstract_model).items():
        leaf = path.rpartition(".")[2]
        if leaf == "kernel":
            key_map[path] = Source.of(hf_key(path), _kernel_transform(len(struct.shape)))
        elif leaf == "gamma":
            key_map[path] = Source.of(hf_key(path), _flat)
        elif leaf == "bias":
            key_map[path] = Source.of(hf_key(path))
        else:
            raise ValueError(f"parameter {path!r} has no diffusers counterpart")
    return key_map


def _is_vae_dir(path: str) -> bool:
    if not os.path.isfile(os.path.join(path, "config.json")):
        return False
    if os.path.isdir(os.path.join(path, PARAMS_DIR)):  # written by `python -m convert cosmos-vae`
        return True
    return any(n.startswith(WEIGHTS_PREFIX) and n.endswith((".safetensors", ".safetensors.index.json"))
               for n in os.listdir(path))


def resolve_vae_dir(path_or_id: str) -> str:
    """The directory holding config.json + diffusion_pytorch_model*.safetensors: `path_or_id` itself,
    its vae/ subfolder, or the snapshot of hub id `path_or_id`."""
    if os.path.isdir(path_or_id):
        for candidate in (path_or_id, os.path.join(path_or_id, "vae")):
            if os.path.isdir(candidate) and _is_vae_dir(candidate):
                return candidate
        raise FileNotFoundError(
            f"{path_or_id!r} is neither a diffusers AutoencoderKLWan directory nor one with a vae/ subfolder "
            f"(expected config.json and {WEIGHTS_PREFIX}.safetensors)")
    if os.path.isabs(path_or_id) or path_or_id.startswith(".") or path_or_id.count("/") != 1:
        raise FileNotFoundError(f"VAE directory {path_or_id!r} does not exist (and it is not a hub id)")
    from huggingface_hub import snapshot_download
    patterns = ["config.json", f"{WEIGHTS_PREFIX}*", "vae/config.json", f"vae/{WEIGHTS_PREFIX}*"]
    try:
        local = snapshot_download(path_or_id, allow_patterns=patterns)
    except Exception as err:
        raise OSError(f"could not download the VAE {path_or_id!r} from the HuggingFace hub "
                      f"({type(err).__name__}: {err}); pass a local directory instead") from err
    return resolve_vae_dir(local)


def load_wan_vae(cls, path_or_id: str, dtype=jnp.float32):
    """A `cls` (CosmosVAE) with config and weights read from a diffusers AutoencoderKLWan checkpoint."""
    from theworld_jax.config.wan_vae import WanVAEConfig
    directory = resolve_vae_dir(path_or_id)
    config = WanVAEConfig.from_json_file(os.path.join(directory, "config.json"))
    abstract = nnx.eval_shape(lambda: cls(config, dtype=dtype, rngs=nnx.Rngs(0)))
    if os.path.isdir(os.path.join(directory, PARAMS_DIR)):
        return restore_params(abstract, directory)
    with SafetensorsReader(find_safetensors(directory, prefix=WEIGHTS_PREFIX)) as reader:
        return load_params(abstract, wan_vae_key_map(abstract), reader, desc="loading Wan VAE")
