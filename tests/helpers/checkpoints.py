"""What a checkpoint directory holds, read without the model: Orbax parameter metadata."""

from __future__ import annotations

import os

import numpy as np
import orbax.checkpoint as ocp


def orbax_params(directory: str) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """{param path: (shape, dtype)} of the parameters saved under directory/params."""
    with ocp.StandardCheckpointer() as checkpointer:
        meta = checkpointer.metadata(os.path.join(os.path.abspath(directory), "params"))
    tree = getattr(meta, "item_metadata", meta)
    tree = getattr(tree, "tree", tree)
    return {key: (tuple(m.shape), np.dtype(m.dtype)) for key, m in tree.items()}
