"""The training step: the frozen encoders as a program of their own, compiled beside the update."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec


@pytest.fixture(scope="module")
def frozen_encoders():
    """A float32 tiny TheWorld on a one-device mesh, split for training (configs/tiny.yaml: the world projector
    and the language model; SigLIP and the VAE frozen), and one step's batch
    (A=1, G=2), placed as the launcher places them."""
    from tests.helpers.tiny_training import tiny_training_batches
    from theworld_jax import sharding
    from theworld_jax.train import model as model_lib
    from theworld_jax.train.loop import to_global

    theworld, _, (rows,) = tiny_training_batches(["model.dtype=float32"], (96,), rows=2)
    mesh = sharding.make_mesh(1, 1)
    theworld.model = sharding.shard_module(theworld.model, mesh)
    split = model_lib.split_trainable(theworld.model, model_lib.trainable_paths(theworld.model, theworld.config))
    return theworld, split, to_global(mesh, {k: v[None] for k, v in rows.items()})


def _compiled_programs():
    """A list that collects the names of the programs XLA compiles from now on."""
    names = []

    def listen(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            names.append(kwargs.get("fun_name", "?"))

    jax.monitoring.register_event_duration_secs_listener(listen)
    return names


def _one_step(theworld, split, batch, *, encode_apart: bool):
    from theworld_jax.train import model as model_lib
    from theworld_jax.train.step import TrainStep

    step = TrainStep(split, optax.adamw(1e-2), layout=model_lib.attention_layout(theworld))
    assert step.encode_apart  # SigLIP, Gemma's projector and the VAE are frozen
    step.encode_apart = encode_apart
    trainable = split.initial_trainable()
    mesh = jax.tree.leaves(batch)[0].sharding.mesh
    opt_state = jax.device_put(jax.jit(step.optimizer.init)(trainable), NamedSharding(mesh, PartitionSpec()))
    return step, step.step(trainable, opt_state, split.frozen, batch)


def test_encoders_apart_give_the_one_program_step(frozen_encoders):
    """The step as two programs (encoders, then the update) against the whole step as one program: the
    same updated parameters and metrics, in float32."""
    theworld, split, batch = frozen_encoders
    _, (apart, _, apart_metrics) = _one_step(theworld, split, batch, encode_apart=True)
    _, (whole, _, whole_metrics) = _one_step(theworld, split, batch, encode_apart=False)
    assert apart.keys() == whole.keys()
    for key in whole:
        np.testing.assert_allclose(np.asarray(apart[key]), np.asarray(whole[key]), rtol=1e-5, atol=1e-6,
                                   err_msg=key)
    for key in whole_metrics:
        np.testing.assert_allclose(np.asarray(apart_metrics[key]), np.asarray(whole_metrics[key]), rtol=1e-5)


def test_both_programs_compile_on_the_first_step_only(frozen_encoders):
    """The first step compiles the encoders' program and the update's (together); the next step of the same
    shape compiles nothing and traces the update no more."""
    theworld, split, batch = frozen_encoders
    compiled = _compiled_programs()
    step, (trainable, opt_state, _) = _one_step(theworld, split, batch, encode_apart=True)
    assert "jit(_encode)" in compiled and "jit(_step)" in compiled, compiled
    compiled.clear()
    trainable, opt_state, metrics = step.step(trainable, opt_state, split.frozen, batch)
    jax.block_until_ready(metrics)
    assert compiled == [] and step.compiles == 1


def test_a_step_leaves_the_models_own_parameters_alive(frozen_encoders):
    """The step donates the trained parameters it takes; those of a float32 model's `initial_trainable` are
    copies, so the model's own arrays survive the step."""
    theworld, split, batch = frozen_encoders
    _one_step(theworld, split, batch, encode_apart=True)
    for path, value in jax.tree_util.tree_leaves_with_path(split.template):
        assert not value.is_deleted(), jax.tree_util.keystr(path)


def test_evaluate_runs_the_steps_encoders(frozen_encoders):
    """The evaluation (no gradients) with the encoders apart equals it as one program, and after a step of
    the same image shapes it compiles only its own program (the encoders' is the step's)."""
    from theworld_jax.train import model as model_lib
    from theworld_jax.train.step import TrainStep

    theworld, split, batch = frozen_encoders
    step, (trainable, _, _) = _one_step(theworld, split, batch, encode_apart=True)
    compiled = _compiled_programs()
    apart = step.evaluate(trainable, split.frozen, batch)
    assert compiled == ["jit(_eval_terms)"], compiled
    whole = TrainStep(split, optax.adamw(1e-2), layout=model_lib.attention_layout(theworld))
    whole.encode_apart = False
    expected = whole.evaluate(trainable, split.frozen, batch)
    np.testing.assert_allclose(float(apart[0]), float(expected[0]), rtol=1e-5)
    assert int(apart[1]) == int(expected[1]) > 0


def test_a_trained_encoder_keeps_the_step_one_program():
    """With SigLIP trained (freeze_gemma_vision=false) the encoders are part of the differentiated program."""
    from tests.helpers.tiny_training import tiny_training_batches
    from theworld_jax.train import model as model_lib
    from theworld_jax.train.step import TrainStep

    theworld, _, _ = tiny_training_batches(["model.freeze_gemma_vision=false"], (96,), rows=1)
    split = model_lib.split_trainable(theworld.model, model_lib.trainable_paths(theworld.model, theworld.config))
    assert not TrainStep(split, optax.adamw(1e-2)).encode_apart


@pytest.mark.parametrize("world_attention", ["causal", "bidirectional"])
def test_forward_with_media_equals_forward_from_pixels(world_attention):
    """TheWorldModel.forward(media=encode_media(...)) without pixels or video gives the logits and loss of the
    forward from them (with bidirectional world attention its layout counts the world tokens from the
    latents)."""
    from tests.helpers.tiny_training import tiny_training_batches

    theworld, _, (rows,) = tiny_training_batches([f"model.world_attention={world_attention}", "model.dtype=float32"],
                                                 (96,), rows=2)
    rows = {k: jnp.asarray(v) for k, v in rows.items()}
    model = theworld.model
    common = dict(token_type_ids=rows["token_type_ids"], labels=rows["labels"])
    direct = model.forward(rows["input_ids"], rows["attention_mask"], pixel_values=rows["pixel_values"],
                           video=rows["video"], **common)
    media = model.encode_media(rows["pixel_values"], rows["video"])
    assert model._world_token_count(None, media) == model._world_token_count(rows["video"], None) > 0
    encoded = model.forward(rows["input_ids"], rows["attention_mask"], media=media, **common)
    np.testing.assert_allclose(np.asarray(encoded.logits), np.asarray(direct.logits), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(encoded.loss), float(direct.loss), rtol=1e-6)


@pytest.fixture(scope="module")
def projector_only():
    """frozen_encoders' setting with the language model frozen too (the default recipe: only the world
    projector trains), float32, and one step's batch of two accumulation micro-batches (A=2, G=1)."""
    from tests.helpers.tiny_training import tiny_training_batches
    from theworld_jax import sharding
    from theworld_jax.train import model as model_lib
    from theworld_jax.train.loop import to_global

    theworld, _, (rows,) = tiny_training_batches(["model.dtype=float32", "model.freeze_gemma_language=true"],
                                                 (96,), rows=2)
    mesh = sharding.make_mesh(1, 1)
    theworld.model = sharding.shard_module(theworld.model, mesh)
    split = model_lib.split_trainable(theworld.model, model_lib.trainable_paths(theworld.model, theworld.config))
    return theworld, split, to_global(mesh, {k: np.stack([v[:1], v[1:]]) for k, v in rows.items()})


def _two_steps(theworld, split, batch, *, staged: bool, remat: str = "none", compiled=()):
    """Two steps from the split's parameters: (step, [(trainable, metrics) after each] as host copies, the
    length of `compiled` (_compiled_programs) after the first step)."""
    from theworld_jax.train import model as model_lib
    from theworld_jax.train.step import TrainStep

    step = TrainStep(split, optax.adamw(1e-2), layout=model_lib.attention_layout(theworld), remat=remat)
    assert step.staged  # only the world projector trains
    step.staged = staged
    trainable = split.initial_trainable()
    mesh = jax.tree.leaves(batch)[0].sharding.mesh
    opt_state = jax.device_put(jax.jit(step.optimizer.init)(trainable), NamedSharding(mesh, PartitionSpec()))
    after = []
    for _ in range(2):
        trainable, opt_state, metrics = step.step(trainable, opt_state, split.frozen, batch)
        after.append(jax.tree.map(np.asarray, (trainable, metrics)))
        first_step = len(compiled) if len(after) == 1 else first_step
    return step, after, first_step


@pytest.mark.parametrize("remat", ["none", "dots_saveable"])
def test_staged_update_gives_the_one_program_step(projector_only, remat):
    """The update as stage programs with their backward programs against the update as one program: the
    same parameters and metrics after two steps of two accumulated micro-batches, in float32."""
    theworld, split, batch = projector_only
    _, staged, _ = _two_steps(theworld, split, batch, staged=True, remat=remat)
    _, whole, _ = _two_steps(theworld, split, batch, staged=False, remat=remat)
    for (params, metrics), (expected, expected_metrics) in zip(staged, whole):
        assert params.keys() == expected.keys()
        for key in expected:
            np.testing.assert_allclose(params[key], expected[key], rtol=1e-5, atol=1e-6, err_msg=key)
        for key in expected_metrics:
            np.testing.assert_allclose(metrics[key], expected_metrics[key], rtol=1e-5, err_msg=key)


def test_staged_programs_compile_on_the_first_step_only(projector_only):
    """The staged step's first step compiles the encoders' and each stage's programs (not the one-program
    update; the group programs once per group structure); the second compiles nothing. (remat "full": a
    policy no other test compiles the group programs for.)"""
    theworld, split, batch = projector_only
    compiled = _compiled_programs()
    step, _, first_step = _two_steps(theworld, split, batch, staged=True, remat="full", compiled=compiled)
    names = set(compiled[:first_step])
    assert {"jit(_encode)", "jit(inputs.forward)", "jit(inputs.backward)", "jit(LayerGroup.forward)",
            "jit(LayerGroup.backward)", "jit(_head)", "jit(_apply_terms)"} <= names, names
    assert "jit(_step)" not in names
    decoder = theworld.model.gemma.language_model
    last = len(decoder.layers) - 1
    structures = {(tuple(decoder.config.layer_types[i] for i in g), g[-1] == last)
                  for g in decoder.layer_groups(split_last=True)}
    first = compiled[:first_step]
    assert first.count("jit(LayerGroup.forward)") == first.count("jit(LayerGroup.backward)") == len(structures)
    assert compiled[first_step:] == [] and step.compiles == 1, compiled[first_step:]


def test_staged_residuals_leave_out_the_arguments(monkeypatch):
    """A stage's forward saves the activations its backward needs, not the (frozen) weights it read: those
    are arguments of the backward program already; its backward gives jax.vjp's cotangent."""
    from theworld_jax.train import staged
    from theworld_jax.train.staged import Staged

    monkeypatch.setattr(staged, "SMALL_RESIDUAL", 0)  # each residual returned as it is
    w, v = jnp.arange(24.0).reshape(4, 6) / 24, jnp.arange(18.0).reshape(6, 3) / 18
    x = jnp.linspace(-1, 1, 8).reshape(2, 4)
    stage = Staged(lambda w, v, x: (jnp.tanh(x @ w) @ v, None), (2,), "toy")
    (y, _), saved = stage.forward(w, v, x)
    assert saved and all(s.shape == (2, 6) for s in saved), [s.shape for s in saved]  # activations, not w or v
    dy = jnp.ones_like(y)
    (dx,) = stage.backward((w, v, x), saved, dy)
    expected = jax.vjp(lambda x: jnp.tanh(x @ w) @ v, x)[1](dy)[0]
    np.testing.assert_allclose(np.asarray(dx), np.asarray(expected), rtol=1e-6)


def test_staged_packs_small_residuals_one_array_per_dtype():
    """Residuals of at most SMALL_RESIDUAL values (slice offsets, small activations) come back as one
    array per dtype, not one output each; the backward unpacks them and gives jax.vjp's cotangent."""
    from theworld_jax.train.staged import Staged

    def fn(x):
        y = jnp.zeros(())
        for i in range(3):  # three "layers", each with its own offset and activation residuals
            start = (jnp.argmax(x) + i) % 8
            y = y + jnp.sum(jnp.tanh(jax.lax.dynamic_slice(x, (start,), (4,))) * (i + 1))
        return y, None

    x = jnp.linspace(-1, 1, 16) ** 3
    stage = Staged(fn, (0,), "toy")
    (y, _), saved = stage.forward(x)
    assert sorted(str(s.dtype) for s in saved) == ["float32", "int32"], [(s.shape, s.dtype) for s in saved]
    assert all(s.ndim == 1 for s in saved)
    (dx,) = stage.backward((x,), saved, jnp.ones_like(y))
    expected = jax.vjp(lambda x: fn(x)[0], x)[1](jnp.ones_like(y))[0]
    np.testing.assert_allclose(np.asarray(dx), np.asarray(expected), rtol=1e-6)


def test_only_a_projector_only_step_is_staged(frozen_encoders, projector_only):
    from theworld_jax.train.step import TrainStep

    assert not TrainStep(frozen_encoders[1], optax.adamw(1e-2)).staged  # the language model trains too
    assert TrainStep(projector_only[1], optax.adamw(1e-2)).staged


@pytest.mark.slow
def test_staged_update_on_a_mesh_of_four_devices():
    """The staged step with the batch and model sharded over (data 2, fsdp 2) CPU devices gives the
    one-program step (tests/scripts/staged_step_on_a_mesh.py, in a process of its own)."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    run = subprocess.run([sys.executable, "-m", "tests.scripts.staged_step_on_a_mesh"], cwd=root, env=env,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0 and "OK" in run.stdout, run.stdout[-2000:] + run.stderr[-4000:]


def test_staged_layer_groups_save_activations_not_weights(projector_only):
    """No layer group's forward returns a weight (or a reshaped copy of one) among its residuals: its
    backward program reads the frozen weights themselves."""
    from theworld_jax.train import model as model_lib
    from theworld_jax.train.step import TrainStep

    theworld, split, batch = projector_only
    step = TrainStep(split, optax.adamw(1e-2), layout=model_lib.attention_layout(theworld))
    trainable = split.initial_trainable()
    inputs = {k: batch[k] for k in ("pixel_values", "video")}
    rest = {k: v for k, v in batch.items() if k not in inputs}
    media = step._encoder(None)(trainable, split.frozen, inputs)
    (x, (ropes, mask, rows, _)), _ = step._staged.inputs.forward(trainable, split.frozen, rest, media, np.int32(0))
    groups = step._staged._groups(trainable, split.frozen)
    for stage, values, last in groups:
        (x_next, _), saved = stage.forward(values, x, ropes, mask, rows if last else None)
        weight_sizes = {v.size for v in values if v.ndim >= 2}
        assert saved and not [s.shape for s in saved if s.size in weight_sizes], [s.shape for s in saved]
        x = x_next
