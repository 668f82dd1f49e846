"""Orbax save and restore of model parameters (written into directories made by io_safety.atomic_directory).

Parameters are saved as a flat {param path: array} tree. Restoring takes the abstract model (from
nnx.eval_shape, optionally with shardings) and reads every array straight onto its target dtype and
sharding, never through a full host copy.
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp
from flax import nnx

from theworld_jax.io_safety import atomic_directory  # noqa: F401  (re-exported: where writers used to find it)
from theworld_jax.weights.loader import abstract_params, param_path
from theworld_jax.weights.safetensors_io import CheckpointError

PARAMS_DIR = "params"


def save_params(model: nnx.Module, directory: str) -> None:
    """Write the model's nnx.Param arrays under `directory`/params (the directory must not exist)."""
    flat = {param_path(path): var.get_value() for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(os.path.join(os.path.abspath(directory), PARAMS_DIR), flat)
        checkpointer.wait_until_finished()


def restore_params(abstract_model: nnx.Module, directory: str,
                   shardings: dict[str, jax.sharding.Sharding] | None = None) -> nnx.Module:
    """A concrete copy of `abstract_model` with the parameters saved by `save_params` in `directory`,
    each read straight onto `shardings[path]` when given (else the abstract's sharding or device 0)."""
    path = os.path.join(os.path.abspath(directory), PARAMS_DIR)
    if not os.path.isdir(path):
        raise CheckpointError(f"no Orbax parameter checkpoint at {path!r}")
    targets = abstract_params(abstract_model)
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = shardings or {}
    abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shardings.get(k) or v.sharding or default)
                for k, v in targets.items()}
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
        var.set_value(restored[param_path(p)])
    return nnx.merge(graphdef, nnx.from_flat_state(flat), rest)


def _first_line(err: BaseException, limit: int = 200) -> str:
    """The first line of the root cause's message, shortened (TensorStore errors run to pages)."""
    while (err.__cause__ or err.__context__) is not None:
        err = err.__cause__ or err.__context__
    text = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return text if len(text) <= limit else text[:limit] + "..."
