"""Read safetensors checkpoints tensor by tensor, without torch.

A checkpoint is one `*.safetensors` file or several shards named by a `*.safetensors.index.json`.
Tensors come back as NumPy arrays (bfloat16 through ml_dtypes), one at a time, so that converting a
model never holds more than the tensor in hand on top of the converted parameters.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import ExitStack

import numpy as np
from safetensors import safe_open

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
        with open(os.path.join(directory, indexes[0])) as f:
            weight_map = json.load(f)["weight_map"]
        return [os.path.join(directory, s) for s in sorted(set(weight_map.values()))]
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

    def __enter__(self) -> SafetensorsReader:
        for path in self._files:
            handle = self._stack.enter_context(safe_open(path, framework="numpy"))
            for key in handle.keys():
                if key in self._where:
                    raise CheckpointError(f"tensor {key!r} appears in more than one shard")
                self._where[key] = handle
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()
        self._where.clear()

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._handle(key).get_slice(key).get_shape())

    def get(self, key: str) -> np.ndarray:
        return self._handle(key).get_tensor(key)

    def items(self) -> Iterator[tuple[str, np.ndarray]]:
        for key in self._where:
            yield key, self.get(key)

    def _handle(self, key: str):
        try:
            return self._where[key]
        except KeyError:
            raise CheckpointError(f"tensor {key!r} is missing from the checkpoint") from None
