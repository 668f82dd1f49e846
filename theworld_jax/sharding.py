"""Meshes, the rules table from logical axis names to mesh axes, and activation constraints.

Every parameter declares the logical axis of each dimension where it is created
(theworld_jax.modeling.partitioning); `RULES` maps each logical axis to a mesh axis, several mesh axes,
or None (replicated). A dimension that its mesh axes do not divide is replicated instead, so every
config places on every mesh. Activations are constrained at the decoder-layer boundary when a mesh is
active (`activate`).
"""

from __future__ import annotations

import contextlib
import math

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axis, mesh axes, or None (replicated).
RULES: dict[str, str | tuple[str, ...] | None] = {
    # activations
    "activation_batch": ("data", "fsdp"), "activation_length": None, "activation_embed": None,
    # parameters
    "vocab": "tensor", "embed": "fsdp", "mlp": "tensor", "heads": "tensor", "kv_heads": "tensor",
    "head_dim": None, "norm": None, "vit_embed": "fsdp", "vit_mlp": "tensor", "vit_heads": "tensor",
    "patch": None, "positions": None, "world_in": None,
    "vae": None,  # the VAE (~127M parameters) stays replicated
}

# The logical axes of the hidden states (B, L, D) between decoder layers.
HIDDEN = ("activation_batch", "activation_length", "activation_embed")


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all); one size may be -1 = the rest."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got data={data}, fsdp={fsdp}, tensor={tensor}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices do not divide into data*fsdp*tensor with {known} fixed")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
                         f"there are {len(devices)}")
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def spec_for(shape: tuple[int, ...], axes: tuple[str, ...], mesh, rules=RULES) -> PartitionSpec:
    """PartitionSpec of an array with logical `axes`; undivisible or repeated mesh axes are replicated."""
    if len(axes) != len(shape):
        raise ValueError(f"logical axes {axes} do not fit shape {shape}")
    used, spec = set(), []
    for dim, name in zip(shape, axes):
        if name not in rules:
            raise ValueError(f"logical axis {name!r} has no rule in theworld_jax.sharding.RULES")
        wanted = rules[name]
        mesh_axes = tuple(a for a in ((wanted,) if isinstance(wanted, str) else wanted or ()) if a not in used)
        if not mesh_axes or dim % math.prod(mesh.shape[a] for a in mesh_axes):
            spec.append(None)
        else:
            spec.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
            used.update(mesh_axes)
    return PartitionSpec(*spec)


def param_path(path: tuple) -> str:
    """'a.b.0.kernel' for the NNX state path ('a', 'b', 0, 'kernel')."""
    return ".".join(str(p) for p in path)


def param_specs(model: nnx.Module, mesh, rules=RULES) -> dict[str, PartitionSpec]:
    """{param path: PartitionSpec} of a (possibly abstract) model, from each parameter's logical axes."""
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        names = var.get_metadata().get("out_sharding")
        if names is None:
            raise ValueError(f"parameter {param_path(path)!r} declares no logical axes "
                             "(create it with theworld_jax.modeling.partitioning.param)")
        out[param_path(path)] = spec_for(tuple(var.shape), tuple(names), mesh, rules)
    return out


def param_shardings(model: nnx.Module, mesh: Mesh, rules=RULES) -> dict[str, NamedSharding]:
    """{param path: NamedSharding} of a (possibly abstract) model on `mesh`."""
    return {path: NamedSharding(mesh, spec) for path, spec in param_specs(model, mesh, rules).items()}


def batch_sharding(mesh: Mesh, shape: tuple[int, ...]) -> NamedSharding:
    """Inputs: the batch dimension on its activation rule (data and fsdp) when it divides, else replicated."""
    return NamedSharding(mesh, spec_for(shape, ("activation_batch",) + (None,) * (len(shape) - 1), mesh,
                                        {**RULES, None: None}))


def shard_module(module: nnx.Module, mesh: Mesh, rules=RULES) -> nnx.Module:
    """`module` with every parameter moved onto its mesh sharding (for small, already loaded modules)."""
    shardings = param_shardings(module, mesh, rules)
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    flat = nnx.to_flat_state(params)
    for path, var in flat:
        var.set_value(jax.device_put(var.get_value(), shardings[param_path(path)]))
    return nnx.merge(graphdef, nnx.from_flat_state(flat), rest)


def activate(mesh: Mesh | None):
    """A context in which traced code constrains its activations to `mesh` (nothing when None)."""
    return contextlib.nullcontext() if mesh is None else jax.sharding.set_mesh(mesh)


def constrain(x: jax.Array, axes: tuple[str, ...], rules=RULES) -> jax.Array:
    """`x` constrained to the sharding of its logical `axes` on the active mesh (unchanged without one)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(MESH_AXES) <= set(mesh.axis_names):
        return x
    return jax.lax.with_sharding_constraint(x, spec_for(tuple(x.shape), axes, mesh, rules))
