"""Read safetensors checkpoints tensor by tensor, without torch.

A checkpoint is one `*.safetensors` file or several shards named by a `*.safetensors.index.json`.
Tensors come back as NumPy arrays (bfloat16 through ml_dtypes), one at a time, so that converting a
model never holds more than the tensor in hand on top of the converted parameters.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

INDEX_SUFFIX = ".safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model: missing, unexpected or mis-shaped tensors."""


def find_safetensors(directory: str, prefix: str = "") -> list[str]:
    """The shard files of the checkpoint in `directory` (the index's shards, or the single file).

    `prefix` selects among several checkpoints in one directory (e.g. "diffusion_pytorch_model").
    """
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"checkpoint directory {directory!r} does not exist")
    names = sorted(os.listdir(directory))
    indexes = [n for n in names if n.endswith(INDEX_SUFFIX) and n.startswith(prefix)]
    if indexes:
        index = os.path.join(directory, indexes[0])
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CheckpointError(f"{index}: not valid JSON ({err}); the index is truncated or corrupt") from None
        except (KeyError, TypeError):
            raise CheckpointError(f"{index}: has no \"weight_map\" object") from None
        shards = [os.path.join(directory, s) for s in sorted(set(weight_map.values()))]
        missing = [s for s in shards if not os.path.isfile(s)]
        if missing:
            raise FileNotFoundError(f"{index} names shard {missing[0]!r}, which does not exist")
        return shards
    files = [n for n in names if n.endswith(".safetensors") and n.startswith(prefix)]
    if not files:
        pickles = [n for n in names if n.endswith((".bin", ".pth", ".pt"))]
        hint = f" (found torch pickles {pickles}; convert them to safetensors)" if pickles else ""
        raise FileNotFoundError(f"no *.safetensors checkpoint in {directory!r}{hint}")
    return [os.path.join(directory, n) for n in files]


class SafetensorsReader:
    """Lazy access to the tensors of a (possibly sharded) safetensors checkpoint.

    Use as a context manager: `with SafetensorsReader(files) as r: r.get("key")`.
    """

    def __init__(self, files: list[str]):
        self._files = list(files)
        self._stack = ExitStack()
        self._where: dict[str, object] = {}
        self._paths: dict[str, str] = {}

    def __enter__(self) -> SafetensorsReader:
        try:
            for path in self._files:
                handle = self._stack.enter_context(_open(path))
                for key in handle.keys():
                    if key in self._where:
                        raise CheckpointError(f"tensor {key!r} appears in more than one shard ({path})")
                    self._where[key] = handle
                    self._paths[key] = path
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()
        self._where.clear()
        self._paths.clear()

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._handle(key).get_slice(key).get_shape())

    def get(self, key: str) -> np.ndarray:
        handle = self._handle(key)
        try:
            return handle.get_tensor(key)
        except SafetensorError as err:
            raise CheckpointError(f"{self._paths[key]}: cannot read tensor {key!r} ({err})") from None

    def items(self) -> Iterator[tuple[str, np.ndarray]]:
        for key in self._where:
            yield key, self.get(key)

    def _handle(self, key: str):
        try:
            return self._where[key]
        except KeyError:
            raise CheckpointError(f"tensor {key!r} is missing from the checkpoint") from None


def _open(path: str):
    """safe_open, with errors that name the file and say what is wrong with it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"safetensors file {path!r} does not exist")
    try:
        return safe_open(path, framework="numpy")
    except SafetensorError as err:
        size = os.path.getsize(path)
        raise CheckpointError(f"{path}: not a readable safetensors file ({size} bytes; {err}); it is truncated "
                              "or corrupt, download or write it again") from None


def write_safetensors(directory: str, sizes: Mapping[str, int],
                      produce: Callable[[list[str]], dict[str, np.ndarray]], *, prefix: str = "model",
                      max_shard_bytes: int = 4 << 30) -> list[str]:
    """Write tensors as `prefix`.safetensors, or as numbered shards plus `prefix`.safetensors.index.json
    (the HuggingFace layout) when they exceed `max_shard_bytes`.

    `sizes` gives each item's byte size in order; `produce(items)` returns {key: array} for one shard,
    so only one shard is in memory at a time. Returns the written file names.
    """
    shards: list[list[str]] = [[]]
    filled = 0
    for item, size in sizes.items():
        if shards[-1] and filled + size > max_shard_bytes:
            shards.append([])
            filled = 0
        shards[-1].append(item)
        filled += size
    n = len(shards)
    names = [f"{prefix}.safetensors"] if n == 1 else [f"{prefix}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map = {}
    for name, items in zip(names, shards):
        tensors = produce(items)
        save_file(tensors, os.path.join(directory, name), metadata={"format": "pt"})
        weight_map.update({key: name for key in tensors})
    if n > 1:
        with open(os.path.join(directory, prefix + INDEX_SUFFIX), "w") as f:
            json.dump({"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}, f, indent=2)
    return names
