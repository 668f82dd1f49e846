"""Orbax parameter checkpoints, atomic directories, and how from_pretrained finds and names sources."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from theworld_jax import TheWorld, sources
from theworld_jax.checkpoint import atomic_directory, restore_params, save_params
from theworld_jax.weights.safetensors_io import CheckpointError


class Tiny(nnx.Module):
    def __init__(self, width: int, rngs: nnx.Rngs):
        self.first = nnx.Linear(3, width, rngs=rngs, param_dtype=jnp.bfloat16)
        self.layers = nnx.List([nnx.Linear(width, width, use_bias=False, rngs=rngs) for _ in range(2)])


def test_params_round_trip_with_dtypes(tmp_path):
    model = Tiny(4, nnx.Rngs(1))
    with atomic_directory(str(tmp_path / "ckpt")) as tmp:
        save_params(model, tmp)
    restored = restore_params(nnx.eval_shape(lambda: Tiny(4, nnx.Rngs(0))), str(tmp_path / "ckpt"))
    assert restored.first.kernel[...].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(restored.layers[1].kernel[...]), np.asarray(model.layers[1].kernel[...]))


def test_restore_into_a_differently_shaped_model_names_the_parameter(tmp_path):
    with atomic_directory(str(tmp_path / "ckpt")) as tmp:
        save_params(Tiny(4, nnx.Rngs(1)), tmp)
    with pytest.raises(CheckpointError, match=r"first\.(kernel|bias).*expects"):
        restore_params(nnx.eval_shape(lambda: Tiny(5, nnx.Rngs(0))), str(tmp_path / "ckpt"))


def test_failed_save_leaves_the_old_directory_untouched(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_directory(str(target), overwrite=True) as tmp:
            (open(os.path.join(tmp, "half.txt"), "w")).close()
            raise RuntimeError("disk full")
    assert sorted(os.listdir(target)) == ["keep.txt"]
    assert [p for p in os.listdir(tmp_path) if p != "out"] == []  # no temporary left behind


def test_unknown_checkpoint_kind_is_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="llama"):
        TheWorld.from_pretrained(str(tmp_path))


def test_missing_directory_and_offline_hub_id_are_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sources.resolve(str(tmp_path / "nowhere"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="some-org/some-model"):
        sources.resolve("some-org/some-model")
