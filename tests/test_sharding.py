"""Logical axes and the rules table; sharded TheWorld equals unsharded on 8 simulated CPU devices."""

import os
import subprocess
import sys

import jax
import pytest
from jax.sharding import PartitionSpec

from theworld_jax.sharding import logical_axes, make_mesh, spec_for


def test_every_rule_maps_dimensions_and_skips_what_does_not_divide():
    mesh = make_mesh(devices=jax.devices()[:1])
    assert spec_for((300, 64), ("vocab", "embed"), mesh) == PartitionSpec("tensor", "fsdp")
    assert logical_axes("gemma.language_model.layers.3.self_attn.o_proj.kernel", 3) == ("heads", "head_dim", "embed")
    assert logical_axes("vae.encoder.conv_in.kernel", 5) == ("vae",) * 5
    with pytest.raises(ValueError, match="no logical axes"):
        logical_axes("something.new", 2)


def test_mesh_sizes_are_checked():
    with pytest.raises(ValueError, match="at most one"):
        make_mesh(data=-1, fsdp=-1)
    with pytest.raises(ValueError, match="needs 4 devices"):
        make_mesh(data=2, fsdp=2, devices=jax.devices()[:1])


def test_sharded_model_equals_unsharded_on_eight_devices():
    script = os.path.join(os.path.dirname(__file__), "scripts", "sharded_equals_unsharded.py")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    run = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0 and "OK" in run.stdout, run.stdout[-2000:] + run.stderr[-4000:]
