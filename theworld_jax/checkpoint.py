"""Orbax save and restore of model parameters (written into directories made by io_safety.atomic_directory).

Parameters are saved as a flat {per-layer name: array} tree (weights.loader.per_layer_params: a layer
stacked for the decoder's scan is saved as its layers, `...layers.7.self_attn.q_proj.kernel`, so the
layout does not depend on the stacking). Restoring takes the abstract model (from nnx.eval_shape,
optionally with shardings) and reads every array straight onto its target dtype and sharding, never
through a full host copy; the slices of a stacked parameter are stacked on the device.
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp
from flax import nnx

from theworld_jax.io_safety import atomic_directory  # noqa: F401  (re-exported: where writers used to find it)
from theworld_jax.weights.loader import abstract_params, layer_members, param_path, per_layer_values, slice_sharding
from theworld_jax.weights.safetensors_io import CheckpointError

PARAMS_DIR = "params"


def save_params(model: nnx.Module, directory: str) -> None:
    """Write the model's nnx.Param arrays under `directory`/params (the directory must not exist)."""
    flat = {name: value() for name, value in per_layer_values(model).items()}
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(os.path.join(os.path.abspath(directory), PARAMS_DIR), flat)
        checkpointer.wait_until_finished()


def restore_params(abstract_model: nnx.Module, directory: str,
                   shardings: dict[str, jax.sharding.Sharding] | None = None) -> nnx.Module:
    """A concrete copy of `abstract_model` with the parameters saved by `save_params` in `directory`,
    each read straight onto `shardings[path]` (by parameter path) when given (else the abstract's sharding
    or device 0)."""
    path = os.path.join(os.path.abspath(directory), PARAMS_DIR)
    if not os.path.isdir(path):
        raise CheckpointError(f"no Orbax parameter checkpoint at {path!r}")
    targets = abstract_params(abstract_model)
    members = layer_members(abstract_model)
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    placed = {}  # {parameter path: its sharding}
    for p, var in nnx.to_flat_state(nnx.state(abstract_model, nnx.Param)):
        p = param_path(p)
        placed[p] = (shardings or {}).get(p) or getattr(var.get_value(), "sharding", None) or default
    abstract = {}
    for p, (names, stacked) in members.items():
        for name in names:
            sharding = slice_sharding(placed[p]) if stacked else placed[p]
            abstract[name] = jax.ShapeDtypeStruct(targets[name].shape, targets[name].dtype, sharding=sharding)
    with ocp.StandardCheckpointer() as checkpointer:
        try:
            stored = checkpointer.metadata(path)
        except Exception as err:
            raise CheckpointError(f"{path}: unreadable Orbax checkpoint metadata ({_first_line(err)}); the "
                                  "checkpoint is incomplete or corrupt, write it again") from err
        stored_tree = getattr(stored, "item_metadata", stored)
        stored_tree = getattr(stored_tree, "tree", stored_tree)
        if not isinstance(stored_tree, dict):
            raise CheckpointError(f"{path}: not a TheWorld-JAX parameter checkpoint (no parameter tree in its "
                                  "metadata); it is incomplete or corrupt, write it again")
        missing = sorted(set(abstract) - set(stored_tree))
        unexpected = sorted(set(stored_tree) - set(abstract))
        if missing or unexpected:
            raise CheckpointError(
                f"checkpoint {path!r} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
        for key, meta in stored_tree.items():
            if tuple(meta.shape) != tuple(abstract[key].shape):
                raise CheckpointError(
                    f"parameter {key!r} has shape {tuple(meta.shape)} in the checkpoint, the model expects "
                    f"{tuple(abstract[key].shape)}")
        try:
            restored = checkpointer.restore(path, abstract)
        except Exception as err:
            raise CheckpointError(f"{path}: cannot read the Orbax checkpoint's arrays ({_first_line(err)}); "
                                  "it is truncated or corrupt, write it again") from err
    graphdef, params, rest = nnx.split(abstract_model, nnx.Param, ...)
    flat = nnx.to_flat_state(params)
    for p, var in flat:
        names, stacked = members[param_path(p)]
        if stacked:  # one parameter at a time: its slices are dropped as it is built
            var.set_value(_stack([restored.pop(n) for n in names], placed[param_path(p)]))
        else:
            var.set_value(restored.pop(names[0]))
    return nnx.merge(graphdef, nnx.from_flat_state(flat), rest)


def _stack(slices: list[jax.Array], sharding) -> jax.Array:
    """The slices stacked on a new leading axis, placed on `sharding`."""
    return jax.device_put(jax.numpy.stack(slices), sharding)


def _first_line(err: BaseException, limit: int = 200) -> str:
    """The first line of the root cause's message, shortened (TensorStore errors run to pages)."""
    while (err.__cause__ or err.__context__) is not None:
        err = err.__cause__ or err.__context__
    text = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return text if len(text) <= limit else text[:limit] + "..."
