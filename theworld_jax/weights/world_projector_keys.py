"""Key map between upstream TheWorld's world projector and `WorldProjector`, both ways.

Upstream keys are `[prefix]world_projector.projection.{i}.{weight,bias}` (real checkpoints use the prefix
"cosmos_encoder."): a torch.nn.Sequential whose Linear layers sit at indices 0 and 2 ("mlp",
"mlp_no_final_gelu") or 0 ("linear"), weight (out, in). Ours are `layers.{j}.{kernel (in, out), bias}`.
An upstream checkpoint holds all trainable parameters, so tensors outside the projector are left alone.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import numpy as np

from theworld_jax.config.theworld import TheWorldConfig
from theworld_jax.modeling.world_projector import WorldProjector
from theworld_jax.weights.loader import KeyMap, Row, export_tensors, load_params, transposed
from theworld_jax.weights.safetensors_io import CheckpointError, SafetensorsReader, find_safetensors

EXPORT_PREFIX = "cosmos_encoder.world_projector."
_KEY = re.compile(r"^(.*world_projector\.)projection\.(\d+)\.(weight|bias)$")


def torch_indices(architecture: str) -> tuple[int, ...]:
    """Indices of the Linear layers in upstream's `projection` Sequential."""
    return (0,) if architecture == "linear" else (0, 2)


def world_projector_key_map(architecture: str, prefix: str = EXPORT_PREFIX) -> KeyMap:
    """Rows of a projector of `architecture` whose upstream keys start with `prefix`."""
    rows = []
    for j, i in enumerate(torch_indices(architecture)):
        rows += [Row(f"layers.{j}.kernel", f"{prefix}projection.{i}.weight", *transposed(1, 0)),
                 Row(f"layers.{j}.bias", f"{prefix}projection.{i}.bias")]
    return tuple(rows)


def find_projector_prefix(keys: Iterable[str]) -> str:
    """The prefix ending in "world_projector." of the projector keys; an error if none or several."""
    prefixes = sorted({m.group(1) for k in keys if (m := _KEY.match(k))})
    if not prefixes:
        raise CheckpointError("the checkpoint has no world projector tensors "
                              "('...world_projector.projection.{i}.weight/bias')")
    if len(prefixes) > 1:
        raise CheckpointError(f"the checkpoint has world projector tensors under several prefixes {prefixes}; "
                              "expected one")
    return prefixes[0]


def _check_against_config(reader: SafetensorsReader, prefix: str, projector: WorldProjector,
                          in_features_reason: str) -> None:
    """Clear errors for a projector checkpoint that was trained with another architecture or mode."""
    arch = projector.architecture
    expected = torch_indices(arch)
    found = sorted({int(m.group(2)) for k in reader.keys() if (m := _KEY.match(k)) and m.group(1) == prefix})
    wanted = ", ".join(f"projection.{i}" for i in expected)
    for i in found:
        if i not in expected:
            raise CheckpointError(
                f"checkpoint tensor {prefix}projection.{i}.* does not fit projection_architecture={arch!r}, "
                f"which has Linear layers {wanted} only (checkpoint has projection indices {found})")
    shapes = {0: (projector.out_features, projector.in_features), 2: (projector.out_features,) * 2}
    for i in expected:
        for name, shape in (("weight", shapes[i]), ("bias", shapes[i][:1])):
            key = f"{prefix}projection.{i}.{name}"
            if key not in reader:
                raise CheckpointError(f"tensor {key!r} is missing: projection_architecture={arch!r} expects "
                                      f"Linear layers {wanted} (checkpoint has projection indices {found})")
            if reader.shape(key) != shape:
                why = f"; in_features {projector.in_features} comes from {in_features_reason}" \
                    if in_features_reason and i == 0 and name == "weight" else ""
                raise CheckpointError(f"tensor {key!r} has shape {reader.shape(key)}, the config expects "
                                      f"{shape} (out_features, in_features){why}")


def load_projector_params(abstract: WorldProjector, reader: SafetensorsReader, *,
                          in_features_reason: str = "") -> WorldProjector:
    """Fill an abstract WorldProjector (nnx.eval_shape) from an upstream-layout checkpoint."""
    prefix = find_projector_prefix(reader.keys())
    _check_against_config(reader, prefix, abstract, in_features_reason)
    return load_params(abstract, world_projector_key_map(abstract.architecture, prefix), reader,
                       ignore=lambda k: not k.startswith(prefix), desc="loading the world projector")


def load_upstream_projector(abstract: WorldProjector, source: str | SafetensorsReader,
                            config: TheWorldConfig | None = None) -> WorldProjector:
    """Fill an abstract WorldProjector from an upstream TheWorld checkpoint (a directory or an open reader).

    `config`, when given, only makes the error for a mis-sized projector name what set in_features.
    """
    reason = ""
    if config is not None and config.world_projection_mode == "spatial":
        reason = "world_projection_mode='spatial' (the VAE's z_dim)"
    elif config is not None:
        reason = (f"world_projection_mode='channel' (H'*W' of the latents of an image of vae_image_size "
                  f"{config.vae_image_size})")
    if isinstance(source, SafetensorsReader):
        return load_projector_params(abstract, source, in_features_reason=reason)
    with SafetensorsReader(find_safetensors(source)) as reader:
        return load_projector_params(abstract, reader, in_features_reason=reason)


def export_world_projector(projector: WorldProjector, prefix: str = EXPORT_PREFIX) -> dict[str, np.ndarray]:
    """{upstream key: array} of the projector, torch layout (weight (out, in)), in the params' dtype."""
    return export_tensors(projector, world_projector_key_map(projector.architecture, prefix))
