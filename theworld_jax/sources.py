"""Where a checkpoint comes from: local directories, hub ids, and which kind of checkpoint it is."""

from __future__ import annotations

import os

from theworld_jax.checkpoint import PARAMS_DIR
from theworld_jax.weights.wan_vae_keys import WEIGHTS_PREFIX as VAE_WEIGHTS
from theworld_jax.config import read_json_config

KINDS = {
    "theworld_jax": "a TheWorld-JAX checkpoint (save_pretrained / python -m convert)",
    "the_world": "an upstream PyTorch TheWorld checkpoint",
    "gemma3": "a HuggingFace Gemma 3 checkpoint",
}


def _is_hub_id(path_or_id: str) -> bool:
    return not path_or_id.startswith((".", "/", "~")) and path_or_id.count("/") == 1


def _download(repo_id: str, patterns: list[str] | None) -> str:
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id, allow_patterns=patterns)
    except Exception as err:  # offline, unknown repo, no access: all end the same way for the user
        raise FileNotFoundError(
            f"{repo_id!r} is not a local directory and could not be downloaded from the HuggingFace hub "
            f"({type(err).__name__}: {err}). Offline, pass a local directory.") from err


def resolve(path_or_id: str, subfolder: str | None = None) -> str:
    """A local directory for `path_or_id`: the directory itself, or a hub snapshot when online."""
    if os.path.isdir(path_or_id):
        return path_or_id
    if os.path.exists(path_or_id):
        raise ValueError(f"{path_or_id!r} is a file; pass the checkpoint's directory")
    if not _is_hub_id(path_or_id):
        raise FileNotFoundError(f"checkpoint directory {path_or_id!r} does not exist")
    return _download(path_or_id, None if subfolder is None else [f"{subfolder}/*"])


def _is_vae_dir(path: str) -> bool:
    if not os.path.isfile(os.path.join(path, "config.json")):
        return False
    if os.path.isdir(os.path.join(path, PARAMS_DIR)):  # written by `python -m convert cosmos-vae`
        return True
    return any(n.startswith(VAE_WEIGHTS) and n.endswith((".safetensors", ".safetensors.index.json"))
               for n in os.listdir(path))


def resolve_vae(path_or_id: str) -> str:
    """The directory holding a VAE's config.json + diffusion_pytorch_model*.safetensors (or converted
    params): `path_or_id` itself, its vae/ subfolder, or the snapshot of hub id `path_or_id`."""
    if os.path.isdir(path_or_id):
        for candidate in (path_or_id, os.path.join(path_or_id, "vae")):
            if os.path.isdir(candidate) and _is_vae_dir(candidate):
                return candidate
        raise FileNotFoundError(
            f"{path_or_id!r} is neither a diffusers AutoencoderKLWan directory nor one with a vae/ subfolder "
            f"(expected config.json and {VAE_WEIGHTS}.safetensors)")
    if not _is_hub_id(path_or_id):
        raise FileNotFoundError(f"VAE directory {path_or_id!r} does not exist (and it is not a hub id)")
    patterns = ["config.json", f"{VAE_WEIGHTS}*", "vae/config.json", f"vae/{VAE_WEIGHTS}*"]
    return resolve_vae(_download(path_or_id, patterns))


def read_config(directory: str, name: str = "config.json") -> dict:
    """The JSON object in `directory`/`name` (read by the configs' reader: errors name the file)."""
    path = os.path.join(directory, name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{directory!r} has no {name}")
    return read_json_config(path, dict)


def detect(directory: str) -> str:
    """Which kind of checkpoint `directory` holds (a key of KINDS), from its config.json."""
    model_type = read_config(directory).get("model_type")
    if model_type in ("theworld_jax", "the_world"):
        return model_type
    if model_type in ("gemma3", "gemma3_text"):
        return "gemma3"
    raise ValueError(f"{directory!r} has model_type {model_type!r}; expected one of: "
                     + "; ".join(f"{k} ({v})" for k, v in KINDS.items()))

