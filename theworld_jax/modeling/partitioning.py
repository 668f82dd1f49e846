"""Logical axis names on parameters, declared where each parameter is created (MaxText's manner).

`param(value, ("embed", "mlp"))` is an nnx.Param whose `out_sharding` metadata names the logical axis
of each dimension; `axes(...)` is the same metadata for flax layers (`kernel_metadata=`). Nothing is
placed at creation: theworld_jax.sharding maps the names to mesh axes through its rules table when a
model is loaded onto a mesh.
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx


def axes(*names: str) -> dict[str, Any]:
    """Param metadata naming the logical axis of each dimension (no eager placement)."""
    return {"out_sharding": names, "eager_sharding": False}


def param(value: jax.Array, names: tuple[str, ...]) -> nnx.Param:
    """An nnx.Param of `value` whose dimensions have the logical axis `names`."""
    if len(names) != len(value.shape):
        raise ValueError(f"logical axes {names} do not fit a parameter of shape {tuple(value.shape)}")
    return nnx.Param(value, **axes(*names))
