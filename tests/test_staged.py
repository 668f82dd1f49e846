"""Staged execution: a model's stages run as programs of their own outside jit (theworld_jax.jit.shared_call),
with the same values as one whole program, and the decoder's identical layer groups compiled once."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx


@pytest.fixture(scope="module")
def setup():
    from tests.helpers.tiny_training import tiny_training_batches

    theworld, _, (rows,) = tiny_training_batches(["model.freeze_gemma_language=false", "model.dtype=float32"],
                                                 (96,), rows=2)
    return theworld, {k: jnp.asarray(v) for k, v in rows.items()}


def test_staged_forward_equals_the_whole_program(setup):
    """The forward outside jit (each stage a program, compiled with LARGE_PROGRAM_OPTIONS as TheWorld runs
    it) against the same forward as one jitted program, and under an outer jit with the options set."""
    from theworld_jax.jit import LARGE_PROGRAM_OPTIONS, compiler_options
    from theworld_jax.train import model as model_lib

    theworld, inputs = setup
    layout = model_lib.attention_layout(theworld)
    graphdef, state = nnx.split(theworld.model)

    def forward(model):
        out = model.forward(inputs["input_ids"], inputs["attention_mask"], pixel_values=inputs["pixel_values"],
                            token_type_ids=inputs["token_type_ids"], video=inputs["video"], labels=inputs["labels"],
                            layout=layout)
        return out.logits, out.loss

    whole = jax.jit(lambda state: forward(nnx.merge(graphdef, state)))(state)
    with compiler_options(LARGE_PROGRAM_OPTIONS):
        staged = forward(theworld.model)
        nested = jax.jit(lambda state: forward(nnx.merge(graphdef, state)))(state)
    for a, b, c in zip(staged, whole, nested):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(np.asarray(c), np.asarray(b))


def test_staged_forward_compiles_one_program_per_group_structure():
    """34 layers of Gemma 3 4B's pattern run outside jit: the decoder compiles the group of six layers
    once for its five runs, the last four layers once, and its prologue, norm and epilogue."""
    from tests.helpers.tiny_gemma import tiny_gemma3_config
    from theworld_jax.attention import make_attention_mask
    from theworld_jax.config.gemma3 import Gemma3TextConfig
    from theworld_jax.modeling.gemma3_text import Gemma3TextDecoder

    layer_types = (["sliding_attention"] * 5 + ["full_attention"]) * 6
    hf_config = tiny_gemma3_config(text_config=dict(num_hidden_layers=34, layer_types=layer_types[:34]))
    decoder = Gemma3TextDecoder(Gemma3TextConfig.from_dict(hf_config.text_config.to_dict()), rngs=nnx.Rngs(0))
    assert [(g.start, g.stop) for g in decoder.layer_groups()] == [(0, 6), (6, 12), (12, 18), (18, 24), (24, 30),
                                                                    (30, 34)]
    assert decoder.layer_groups(split_last=True)[-2:] == [range(30, 33), range(33, 34)]
    embeds = jnp.asarray(np.random.default_rng(0).normal(size=(1, 7, decoder.config.hidden_size)), jnp.float32)
    mask = make_attention_mask(jnp.ones((1, 7), jnp.int32))
    positions = jnp.arange(7)[None]
    compiled = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, duration, **kw: compiled.append(kw.get("fun_name"))
        if event == "/jax/core/compile/backend_compile_duration" else None)
    hidden, _ = decoder(embeds, positions=positions, mask=mask)
    assert sorted(compiled) == ["jit(LayerGroup)", "jit(LayerGroup)", "jit(RMSNorm)", "jit(_epilogue)",
                                "jit(_prologue)"]
    traced = jax.jit(lambda e: decoder(e, positions=positions, mask=mask)[0])(embeds)
    np.testing.assert_allclose(np.asarray(hidden), np.asarray(traced), rtol=1e-5, atol=1e-5)
