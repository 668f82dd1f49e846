"""Run from the repository root as `python -m tests.scripts.staged_step_on_a_mesh` with
XLA_FLAGS=--xla_force_host_platform_device_count=4: the projector-only training step, staged (each stage
and its backward a program, compiled as called on a mesh of several devices), gives the one-program
step's parameters and metrics with the batch and the model sharded over a (data 2, fsdp 2) mesh; in both
forms the second step compiles nothing (the update keeps the parameters' placement). Prints OK on success."""

import jax
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

jax.config.update("jax_default_matmul_precision", "highest")

from tests.helpers.tiny_training import tiny_training_batches  # noqa: E402
from theworld_jax import sharding  # noqa: E402
from theworld_jax.train import model as model_lib  # noqa: E402
from theworld_jax.train.loop import to_global  # noqa: E402
from theworld_jax.train.step import TrainStep  # noqa: E402

assert len(jax.devices()) == 4, jax.devices()
compiled = []
jax.monitoring.register_event_duration_secs_listener(
    lambda event, duration, **kw: compiled.append(kw.get("fun_name"))
    if event == "/jax/core/compile/backend_compile_duration" else None)
theworld, _, (rows,) = tiny_training_batches(["model.dtype=float32", "model.freeze_gemma_language=true"], (96,),
                                             rows=4)
mesh = sharding.make_mesh(data=2, fsdp=2)
theworld.model = sharding.shard_module(theworld.model, mesh)
split = model_lib.split_trainable(theworld.model, model_lib.trainable_paths(theworld.model, theworld.config))
batch = to_global(mesh, {k: v[None] for k, v in rows.items()})
results = {}
for staged in (True, False):
    step = TrainStep(split, optax.adamw(1e-2), layout=model_lib.attention_layout(theworld))
    assert step.staged
    step.staged = staged
    trainable = split.initial_trainable()
    opt_state = jax.device_put(jax.jit(step.optimizer.init)(trainable), NamedSharding(mesh, PartitionSpec()))
    first_step = None
    for _ in range(2):
        compiled.clear()
        trainable, opt_state, metrics = step.step(trainable, opt_state, split.frozen, batch)
        jax.block_until_ready(metrics)
        first_step = list(compiled) if first_step is None else first_step
    assert compiled == [], (staged, compiled)  # the second step's
    if staged:  # compiled ahead in turn: each program once, the group programs once per group structure
        decoder = theworld.model.gemma.language_model
        structures = len({(tuple(decoder.config.layer_types[i] for i in g), g[-1] == len(decoder.layers) - 1)
                          for g in decoder.layer_groups(split_last=True)})
        counts = {name: first_step.count(name) for name in first_step}
        assert all(n == (structures if "LayerGroup" in name else 1) for name, n in counts.items()), counts
    results[staged] = jax.tree.map(np.asarray, (trainable, metrics))
(params, metrics), (expected, expected_metrics) = results[True], results[False]
for key in expected:
    np.testing.assert_allclose(params[key], expected[key], rtol=1e-5, atol=1e-6, err_msg=key)
for key in expected_metrics:
    np.testing.assert_allclose(metrics[key], expected_metrics[key], rtol=1e-5, err_msg=key)
print("OK")
