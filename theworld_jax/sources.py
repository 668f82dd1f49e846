"""Where a checkpoint comes from: local directories, hub ids, and which kind of checkpoint it is."""

from __future__ import annotations

import os

from theworld_jax.config import read_json_config

KINDS = {
    "theworld_jax": "a TheWorld-JAX checkpoint (save_pretrained / python -m convert)",
    "the_world": "an upstream PyTorch TheWorld checkpoint",
    "gemma3": "a HuggingFace Gemma 3 checkpoint",
}


def resolve(path_or_id: str, subfolder: str | None = None) -> str:
    """A local directory for `path_or_id`: the directory itself, or a hub snapshot when online."""
    if os.path.isdir(path_or_id):
        return path_or_id
    if os.path.exists(path_or_id):
        raise ValueError(f"{path_or_id!r} is a file; pass the checkpoint's directory")
    if path_or_id.startswith((".", "/", "~")) or path_or_id.count("/") != 1:
        raise FileNotFoundError(f"checkpoint directory {path_or_id!r} does not exist")
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(path_or_id, allow_patterns=None if subfolder is None else [f"{subfolder}/*"])
    except Exception as err:  # offline, unknown repo, no access: all end the same way for the user
        raise FileNotFoundError(
            f"{path_or_id!r} is not a local directory and could not be downloaded from the HuggingFace hub "
            f"({type(err).__name__}: {err}). Offline, pass a local directory.") from err


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

