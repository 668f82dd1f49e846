"""Fill an abstract Flax NNX model from a checkpoint through a key map.

A key map says, for every parameter path of the model ("layers.0.attn.q.kernel"), which checkpoint
tensor(s) it comes from and how to reshape them (`Source`). Loading walks the model's parameters one
by one, reads each tensor, transforms it, checks the shape, casts it and places it on its device or
sharding. Every checkpoint tensor must be used and every parameter filled: anything else is a
`CheckpointError` naming the key.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import jax
import numpy as np
from flax import nnx
from theworld_jax import progress
from theworld_jax.weights.safetensors_io import CheckpointError, SafetensorsReader


def _identity(x: np.ndarray) -> np.ndarray:
    return x


@dataclasses.dataclass(frozen=True)
class Source:
    """Where one parameter comes from: checkpoint `keys` combined by `transform(*tensors)`."""

    keys: tuple[str, ...]
    transform: Callable[..., np.ndarray] = _identity

    @classmethod
    def of(cls, key: str, transform: Callable[..., np.ndarray] = _identity) -> Source:
        return cls((key,), transform)


def param_path(path: tuple) -> str:
    """'a.b.0.kernel' for the NNX state path ('a', 'b', 0, 'kernel')."""
    return ".".join(str(p) for p in path)


def abstract_params(model: nnx.Module) -> dict[str, jax.ShapeDtypeStruct]:
    """Flat {path: ShapeDtypeStruct (with .sharding when placed)} of a model's nnx.Param leaves."""
    state = nnx.state(model, nnx.Param)
    flat = nnx.to_flat_state(state)
    return {param_path(path): _as_struct(var) for path, var in flat}


def _as_struct(var) -> jax.ShapeDtypeStruct:
    value = var.get_value() if isinstance(var, nnx.Variable) else var
    return jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=getattr(value, "sharding", None))


def load_params(
    abstract_model: nnx.Module,
    key_map: Mapping[str, Source],
    reader: SafetensorsReader,
    *,
    rename: Callable[[str], str] = lambda k: k,
    ignore: Callable[[str], bool] = lambda k: False,
    desc: str = "loading weights",
    shardings: Mapping[str, jax.sharding.Sharding] | None = None,
) -> nnx.Module:
    """A concrete copy of `abstract_model` (from nnx.eval_shape) with its params read via `key_map`.

    `rename` normalises checkpoint keys (layout differences) before they are matched; `ignore` names
    checkpoint keys that are known and deliberately unused (e.g. a tied lm_head). Parameters take the
    dtype of the abstract model. `shardings` (by param path) places each array as it is loaded.
    """
    graphdef, params, rest = nnx.split(abstract_model, nnx.Param, ...)
    targets = abstract_params(abstract_model)
    by_name: dict[str, str] = {}
    for key in reader.keys():
        name = rename(key)
        if name in by_name:
            raise CheckpointError(f"checkpoint keys {by_name[name]!r} and {key!r} both map to {name!r}")
        by_name[name] = key

    unmapped = sorted(set(targets) - set(key_map))
    if unmapped:
        raise CheckpointError(f"the key map has no source for parameters {unmapped[:5]}")
    used: set[str] = set()
    loaded: dict[str, jax.Array] = {}
    for path, target in progress.bar(targets.items(), desc=desc, total=len(targets)):
        source = key_map[path]
        tensors = []
        for name in source.keys:
            if name not in by_name:
                raise CheckpointError(
                    f"tensor {name!r} (for parameter {path!r}, shape {tuple(target.shape)}) is missing "
                    "from the checkpoint")
            tensors.append(reader.get(by_name[name]))
            used.add(name)
        value = np.asarray(source.transform(*tensors))
        if tuple(value.shape) != tuple(target.shape):
            found = [tuple(t.shape) for t in tensors]
            raise CheckpointError(
                f"tensor {source.keys[0]!r} has shape {found[0] if len(found) == 1 else found}, which does "
                f"not fit parameter {path!r} of shape {tuple(target.shape)} (after the key map's transform: "
                f"{tuple(value.shape)})")
        sharding = (shardings or {}).get(path) or target.sharding
        value = value.astype(target.dtype)
        loaded[path] = jax.device_put(value, sharding) if sharding is not None else jax.numpy.asarray(value)

    unexpected = sorted(k for name, k in by_name.items() if name not in used and not ignore(k))
    if unexpected:
        raise CheckpointError(
            f"{len(unexpected)} unexpected tensor(s) in the checkpoint, e.g. {unexpected[:5]}")

    flat = nnx.to_flat_state(params)
    for path, var in flat:
        var.set_value(loaded[param_path(path)])
    return nnx.merge(graphdef, nnx.from_flat_state(flat), rest)
