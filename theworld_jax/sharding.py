"""Meshes, logical axis names for every parameter, and the rules table that maps them to mesh axes.

A parameter's logical axes come from `PARAM_AXES` (a pattern on its path); `RULES` maps each logical
axis to a mesh axis (or None = replicated). A dimension that the mesh axis does not divide is
replicated instead, so every config places on every mesh.
"""

from __future__ import annotations

import math
import re

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axis (None: replicated).
RULES: dict[str, str | None] = {
    "batch": "data", "vocab": "tensor", "embed": "fsdp", "mlp": "tensor", "heads": "tensor",
    "kv_heads": "tensor", "head_dim": None, "norm": None, "vit_embed": "fsdp", "vit_mlp": "tensor",
    "vit_heads": "tensor", "patch": None, "positions": None, "world_in": None, "vae": None,
}

# (pattern on the parameter path, logical axes of its dimensions); the first match wins.
PARAM_AXES: tuple[tuple[str, tuple[str, ...]], ...] = (
    (r"language_model\.embed_tokens\.embedding$", ("vocab", "embed")),
    (r"self_attn\.q_proj\.kernel$", ("embed", "heads", "head_dim")),
    (r"self_attn\.[kv]_proj\.kernel$", ("embed", "kv_heads", "head_dim")),
    (r"self_attn\.o_proj\.kernel$", ("heads", "head_dim", "embed")),
    (r"self_attn\.[qk]_norm\.weight$", ("head_dim",)),
    (r"mlp\.(gate|up)_proj\.kernel$", ("embed", "mlp")),
    (r"mlp\.down_proj\.kernel$", ("mlp", "embed")),
    (r"language_model\..*(layernorm|norm)\.weight$", ("norm",)),
    (r"vision_tower\.patch_kernel$", ("patch", "patch", "patch", "vit_embed")),
    (r"vision_tower\.position_embedding$", ("positions", "vit_embed")),
    (r"vision_tower\..*self_attn\.[qkv]_kernel$", ("vit_embed", "vit_heads", "head_dim")),
    (r"vision_tower\..*self_attn\.[qkv]_bias$", ("vit_heads", "head_dim")),
    (r"vision_tower\..*self_attn\.out_kernel$", ("vit_heads", "head_dim", "vit_embed")),
    (r"vision_tower\..*mlp\.fc1_kernel$", ("vit_embed", "vit_mlp")),
    (r"vision_tower\..*mlp\.fc1_bias$", ("vit_mlp",)),
    (r"vision_tower\..*mlp\.fc2_kernel$", ("vit_mlp", "vit_embed")),
    (r"vision_tower\..*(bias|scale)$", ("norm",)),
    (r"multi_modal_projector\.norm_scale$", ("norm",)),
    (r"multi_modal_projector\.projection$", ("vit_embed", "embed")),
    (r"world_projector\.layers\.0\.kernel$", ("world_in", "embed")),
    (r"world_projector\.layers\.\d+\.kernel$", ("embed", "embed")),
    (r"world_projector\.layers\.\d+\.bias$", ("embed",)),
    (r"(^|\.)vae\.", ("vae",)),  # the VAE (~127M parameters) stays replicated
)


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


def logical_axes(path: str, ndim: int) -> tuple[str, ...]:
    """The logical axis names of parameter `path` (an error names a parameter no rule covers)."""
    for pattern, axes in PARAM_AXES:
        if re.search(pattern, path):
            return axes if axes != ("vae",) else ("vae",) * ndim
    raise ValueError(f"no logical axes for parameter {path!r}; add a rule to theworld_jax.sharding.PARAM_AXES")


def spec_for(shape: tuple[int, ...], axes: tuple[str, ...], mesh: Mesh, rules=RULES) -> PartitionSpec:
    """PartitionSpec of an array with logical `axes`; undivisible or repeated mesh axes are replicated."""
    if len(axes) != len(shape):
        raise ValueError(f"logical axes {axes} do not fit shape {shape}")
    used, spec = set(), []
    for dim, name in zip(shape, axes):
        mesh_axis = rules.get(name)
        if mesh_axis is None or mesh_axis in used or dim % mesh.shape[mesh_axis]:
            spec.append(None)
        else:
            spec.append(mesh_axis)
            used.add(mesh_axis)
    return PartitionSpec(*spec)


def param_shardings(params: dict[str, jax.ShapeDtypeStruct], mesh: Mesh, rules=RULES) -> dict[str, NamedSharding]:
    """{param path: NamedSharding} for a model's flat abstract params (weights.loader.abstract_params)."""
    return {path: NamedSharding(mesh, spec_for(tuple(p.shape), logical_axes(path, len(p.shape)), mesh, rules))
            for path, p in params.items()}


def batch_sharding(mesh: Mesh, shape: tuple[int, ...]) -> NamedSharding:
    """Inputs: the batch dimension over (data, fsdp) when it divides, else replicated."""
    axes = tuple(a for a in ("data", "fsdp") if mesh.shape[a] > 1)
    size = math.prod(mesh.shape[a] for a in axes)
    first = axes if axes and shape and shape[0] % size == 0 else None
    return NamedSharding(mesh, PartitionSpec(first, *([None] * (len(shape) - 1))))


def shard_module(module, mesh: Mesh, prefix: str = "", rules=RULES):
    """`module` with every parameter moved onto its mesh sharding (for small, already loaded modules);
    `prefix` is the module's path in the whole model ("vae.", "world_projector."), which the rules match."""
    from flax import nnx

    from theworld_jax.weights.loader import abstract_params, param_path

    shardings = param_shardings({prefix + k: v for k, v in abstract_params(module).items()}, mesh, rules)
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    flat = nnx.to_flat_state(params)
    for path, var in flat:
        var.set_value(jax.device_put(var.get_value(), shardings[prefix + param_path(path)]))
    return nnx.merge(graphdef, nnx.from_flat_state(flat), rest)
