"""Key maps as tables, and the two directions through them: load a checkpoint, export a model.

A key map is a tuple of `Row`s, one per parameter (MaxText's conversion tables): our parameter path
("layers.0.self_attn.q_proj.kernel"), the checkpoint key ("layers.0.self_attn.q_proj.weight"), and the
two transforms between the layouts (`load`: theirs -> ours, `export`: ours -> theirs). Transforms use
array methods only (.T, .reshape, .transpose), so the checkpoint shape a parameter expects is the export
transform traced on the parameter's abstract shape.

Loading walks the rows, reads each tensor, checks its shape, transforms it, casts it and places it on
its device or sharding. Every checkpoint tensor must be used and every parameter filled: anything else
is a `CheckpointError` naming the key. Exporting applies the export transforms and writes safetensors.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping

import jax
import numpy as np
from flax import nnx

from theworld_jax import progress
from theworld_jax.sharding import param_path
from theworld_jax.weights.safetensors_io import CheckpointError, SafetensorsReader, write_safetensors

Transform = Callable[[np.ndarray], np.ndarray]


def same(x):
    return x


def transposed(*axes: int) -> tuple[Transform, Transform]:
    """(load, export) for a tensor whose axes are permuted by `axes` (theirs -> ours), e.g. torch Linear."""
    inverse = tuple(int(i) for i in np.argsort(axes))
    return (lambda w: w.transpose(axes)), (lambda k: k.transpose(inverse))


def reshaped(ours: tuple[int, ...], theirs: tuple[int, ...], t: bool = False) -> tuple[Transform, Transform]:
    """(load, export) for a tensor reshaped between `theirs` and `ours`; `t`: torch (out, in) transposed first."""
    if t:
        return (lambda w: w.T.reshape(ours)), (lambda k: k.reshape(theirs[::-1]).T)
    return (lambda w: w.reshape(ours)), (lambda k: k.reshape(theirs))


@dataclasses.dataclass(frozen=True)
class Row:
    """One parameter: our `path`, the checkpoint `key`, and the transforms `load` (theirs -> ours) and
    `export` (ours -> theirs)."""

    path: str
    key: str
    load: Transform = same
    export: Transform = same


KeyMap = tuple[Row, ...]


def prefixed(rows: Iterable[Row], path: str = "", key: str = "") -> KeyMap:
    """The rows with `path` prepended to our paths and `key` to the checkpoint keys."""
    return tuple(dataclasses.replace(r, path=path + r.path, key=key + r.key) for r in rows)


def abstract_params(model: nnx.Module) -> dict[str, jax.ShapeDtypeStruct]:
    """Flat {path: ShapeDtypeStruct (with .sharding when placed)} of a model's nnx.Param leaves."""
    state = nnx.state(model, nnx.Param)
    flat = nnx.to_flat_state(state)
    return {param_path(path): _as_struct(var) for path, var in flat}


def _as_struct(var) -> jax.ShapeDtypeStruct:
    value = var.get_value() if isinstance(var, nnx.Variable) else var
    return jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=getattr(value, "sharding", None))


def checkpoint_shape(row: Row, target: jax.ShapeDtypeStruct) -> tuple[int, ...]:
    """The shape the checkpoint tensor of `row` must have for a parameter of `target`'s shape."""
    return tuple(jax.eval_shape(row.export, jax.ShapeDtypeStruct(target.shape, target.dtype)).shape)


def _by_path(model_params: Mapping[str, object], key_map: KeyMap) -> dict[str, Row]:
    rows = {r.path: r for r in key_map}
    if len(rows) != len(key_map):
        raise CheckpointError("the key map lists a parameter twice")
    unmapped = sorted(set(model_params) - set(rows))
    if unmapped:
        raise CheckpointError(f"the key map has no row for parameters {unmapped[:5]}")
    return rows


def load_params(
    abstract_model: nnx.Module,
    key_map: KeyMap,
    reader: SafetensorsReader,
    *,
    ignore: Callable[[str], bool] = lambda k: False,
    desc: str = "loading weights",
    shardings: Mapping[str, jax.sharding.Sharding] | None = None,
) -> nnx.Module:
    """A concrete copy of `abstract_model` (from nnx.eval_shape) with its params read via `key_map`.

    `ignore` names checkpoint keys that are known and deliberately unused (e.g. a tied lm_head).
    Parameters take the dtype of the abstract model. `shardings` (by param path) places each array
    as it is loaded.
    """
    graphdef, params, rest = nnx.split(abstract_model, nnx.Param, ...)
    targets = abstract_params(abstract_model)
    rows = _by_path(targets, key_map)
    loaded: dict[str, jax.Array] = {}
    for path, target in progress.bar(targets.items(), desc=desc, total=len(targets)):
        row = rows[path]
        if row.key not in reader:
            raise CheckpointError(f"tensor {row.key!r} (for parameter {path!r}, shape {tuple(target.shape)}) is "
                                  "missing from the checkpoint")
        expected, found = checkpoint_shape(row, target), reader.shape(row.key)
        if found != expected:
            raise CheckpointError(
                f"tensor {row.key!r} has shape {found}, which does not fit parameter {path!r} of shape "
                f"{tuple(target.shape)} (the checkpoint should hold {expected})")
        value = np.asarray(row.load(reader.get(row.key))).astype(target.dtype)
        sharding = (shardings or {}).get(path) or target.sharding
        loaded[path] = jax.device_put(value, sharding) if sharding is not None else jax.numpy.asarray(value)

    used = {rows[p].key for p in targets}
    unexpected = sorted(k for k in reader.keys() if k not in used and not ignore(k))
    if unexpected:
        raise CheckpointError(
            f"{len(unexpected)} unexpected tensor(s) in the checkpoint, e.g. {unexpected[:5]}")

    flat = nnx.to_flat_state(params)
    for path, var in flat:
        var.set_value(loaded[param_path(path)])
    return nnx.merge(graphdef, nnx.from_flat_state(flat), rest)


def export_tensors(model: nnx.Module, key_map: KeyMap) -> dict[str, np.ndarray]:
    """{checkpoint key: array} of every parameter of `model` through the export transforms, in memory."""
    return _exporter(model, key_map)[1](None)


def _exporter(model: nnx.Module, key_map: KeyMap):
    """({param path: byte size}, produce(paths or None for all) -> {checkpoint key: array})."""
    values = {param_path(p): v.get_value() for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    rows = _by_path(values, key_map)

    def produce(paths: list[str] | None) -> dict[str, np.ndarray]:
        return {rows[p].key: np.ascontiguousarray(rows[p].export(np.asarray(values[p])))
                for p in (values if paths is None else paths)}

    return {p: v.size * v.dtype.itemsize for p, v in values.items()}, produce


def export_params(model: nnx.Module, key_map: KeyMap, directory: str, *, prefix: str = "model",
                  max_shard_bytes: int = 4 << 30) -> list[str]:
    """Write the model's parameters through `key_map`'s export transforms as `prefix`*.safetensors
    in `directory` (sharded with an index beyond `max_shard_bytes`), in the parameters' dtypes.

    Tensors are produced one shard at a time; returns the written file names.
    """
    sizes, produce = _exporter(model, key_map)
    return write_safetensors(directory, sizes, produce, prefix=prefix, max_shard_bytes=max_shard_bytes)
