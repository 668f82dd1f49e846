"""The decoder scans its layer groups and SigLIP its layers: one group traced per stack, not every layer; the stacked
parameters load, decode and save under per-layer names; the persistent compilation cache serves a
second process."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from safetensors.numpy import load_file
from tests.helpers.full_size import GEMMA3_4B_CONFIG
from tests.helpers.tiny_gemma import build_tiny_gemma3, tiny_gemma3_config
from tests.helpers.tiny_text_decoder import hf_logits, max_logit_error, positions_from_mask, save_language_model

from theworld_jax.attention import make_attention_mask, make_decode_mask
from theworld_jax.checkpoint import PARAMS_DIR, restore_params, save_params
from theworld_jax.config.gemma3 import Gemma3Config, Gemma3TextConfig, LayerStack
from theworld_jax.modeling import gemma3_text, siglip
from theworld_jax.modeling.gemma3_text import Gemma3TextDecoder
from theworld_jax.modeling.kv_cache import KVCache
from theworld_jax.modeling.siglip import SiglipVisionTower
from theworld_jax.weights.gemma3_text_keys import text_key_map
from theworld_jax.weights.loader import export_params, load_params, param_path
from theworld_jax.weights.safetensors_io import SafetensorsReader, find_safetensors

S, F = "sliding_attention", "full_attention"
TYPES = [S, S, F] * 3 + [S]  # three groups of (sliding, sliding, full), then a tail of one sliding layer
PROMPT, TOTAL = 12, 20  # longer than the window (6): the rings wrap


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    hf_config = tiny_gemma3_config(text_config=dict(num_hidden_layers=len(TYPES), layer_types=TYPES,
                                                    sliding_window=6))
    hf = build_tiny_gemma3(hf_config)
    config = Gemma3TextConfig.from_dict(hf_config.text_config.to_dict())
    directory = save_language_model(hf, str(tmp_path_factory.mktemp("scan")))
    abstract = nnx.eval_shape(lambda: Gemma3TextDecoder(config, rngs=nnx.Rngs(0)))
    with SafetensorsReader(find_safetensors(directory)) as reader:
        decoder = load_params(abstract, text_key_map(config), reader)
    rng = np.random.default_rng(3)
    ids = rng.integers(10, 280, (2, TOTAL))
    mask = np.ones((2, TOTAL), np.int64)
    mask[1, :3], ids[1, :3] = 0, 0
    return dict(hf=hf, config=config, directory=directory, decoder=decoder, ids=ids, mask=mask)


def test_layers_are_grouped_by_their_pattern(setup):
    assert setup["config"].layer_stacks() == (LayerStack(0, 3, 3), LayerStack(9, 1, 1))
    q = setup["decoder"].stacks[0].layers[2].self_attn.q_proj.kernel
    assert q.shape[0] == 3 and q.get_metadata()["out_sharding"][0] == "layers"


def _count_layer_traces(monkeypatch) -> list:
    calls = []
    original = gemma3_text.Gemma3DecoderLayer.__call__

    def counted(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(gemma3_text.Gemma3DecoderLayer, "__call__", counted)
    return calls


def test_one_group_per_stack_is_traced(setup, monkeypatch):
    """10 layers, traced as 3 + 1 in the forward, prefill, a decode step and a remat training step."""
    config = setup["config"]
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Gemma3TextDecoder(config, rngs=nnx.Rngs(0))))
    b, t = 2, 8
    embeds = jax.ShapeDtypeStruct((b, t, config.hidden_size), jnp.float32)
    positions = jnp.zeros((b, t), jnp.int32)
    mask = make_attention_mask(jnp.ones((b, t), jnp.int32))
    calls = _count_layer_traces(monkeypatch)

    def forward(state, x, cache=None, mask=mask, positions=positions):
        return nnx.merge(graphdef, state)(x, positions=positions, mask=mask, cache=cache)

    jax.eval_shape(forward, state, embeds)
    assert len(calls) == 4, "the forward traced every layer"
    cache = jax.eval_shape(lambda: KVCache.init(config, b, 16, jnp.float32))
    _, prefilled = jax.eval_shape(forward, state, embeds, cache)
    assert len(calls) == 8
    one = jax.ShapeDtypeStruct((b, 1, config.hidden_size), jnp.float32)
    decode_mask = make_decode_mask(jnp.full((b, 1), t, jnp.int32))
    jax.eval_shape(lambda s, x, c: forward(s, x, c, decode_mask, positions[:, :1]), state, one, prefilled)
    assert len(calls) == 12

    def loss(state, x):
        hidden, _ = nnx.merge(graphdef, state)(x, positions=positions, mask=mask, remat="full")
        return jnp.sum(hidden ** 2)

    jax.eval_shape(jax.value_and_grad(loss), state, embeds)
    assert len(calls) == 16


def test_gemma3_4b_traces_7_layers_not_34(monkeypatch):
    """The released 4B decoder, abstractly: 5 groups of (5 sliding, 1 full), then 4 groups of 1 sliding."""
    text = Gemma3TextConfig.from_dict(GEMMA3_4B_CONFIG["text_config"])
    assert text.layer_stacks() == (LayerStack(0, 6, 5), LayerStack(30, 1, 4))
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Gemma3TextDecoder(text, dtype=jnp.bfloat16,
                                                                          rngs=nnx.Rngs(0))))
    calls = _count_layer_traces(monkeypatch)
    mask = make_attention_mask(jnp.ones((1, 16), jnp.int32))
    jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x, positions=jnp.zeros((1, 16), jnp.int32), mask=mask),
                   state, jax.ShapeDtypeStruct((1, 16, text.hidden_size), jnp.bfloat16))
    assert len(calls) == 7


def test_siglip_traces_one_of_its_27_layers(monkeypatch):
    vision = Gemma3Config.from_dict(GEMMA3_4B_CONFIG).vision
    graphdef, state = nnx.split(nnx.eval_shape(lambda: SiglipVisionTower(vision, dtype=jnp.bfloat16,
                                                                          rngs=nnx.Rngs(0))))
    assert nnx.state(nnx.merge(graphdef, state)).layers.mlp.fc1_kernel.shape == (27, 1152, 4304)
    calls = []
    original = siglip.SiglipEncoderLayer.__call__
    monkeypatch.setattr(siglip.SiglipEncoderLayer, "__call__", lambda self, x: calls.append(1) or original(self, x))
    jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state,
                   jax.ShapeDtypeStruct((1, 3, 896, 896), jnp.bfloat16))
    assert len(calls) == 1


def test_several_groups_match_transformers_and_decode(setup):
    """Float32 logits of the scanned decoder (padded batch) equal transformers'; prefill + one-token
    steps through the stacked ring caches equal the full forward."""
    decoder, ids, mask = setup["decoder"], setup["ids"], setup["mask"]
    ref = hf_logits(setup["hf"], ids, mask)
    positions = positions_from_mask(mask)

    @nnx.jit
    def run(model, ids, positions, mask, cache):
        hidden, cache = model(model.embed(ids), positions=positions, mask=mask, cache=cache)
        return model.logits(hidden), cache

    full, _ = run(decoder, jnp.asarray(ids), jnp.asarray(positions), make_attention_mask(jnp.asarray(mask)), None)
    assert max_logit_error(np.asarray(full), ref, mask) <= 1e-5
    cache = KVCache.init(setup["config"], batch=2, max_length=TOTAL, dtype=jnp.float32)
    logits, cache = run(decoder, jnp.asarray(ids[:, :PROMPT]), jnp.asarray(positions[:, :PROMPT]),
                        make_attention_mask(jnp.asarray(mask[:, :PROMPT])), cache)
    steps = [np.asarray(logits)]
    for i in range(PROMPT, TOTAL):
        logits, cache = run(decoder, jnp.asarray(ids[:, i:i + 1]), jnp.asarray(positions[:, i:i + 1]),
                            make_decode_mask(jnp.full((2, 1), i, jnp.int32)), cache)
        steps.append(np.asarray(logits))
    assert max_logit_error(np.concatenate(steps, axis=1), ref, mask) <= 1e-5


def test_checkpoints_keep_per_layer_names(setup, tmp_path):
    """Orbax saves name every layer as before the scan (layers.{i}.), restore stacks them again; the
    export writes transformers' keys, bitwise the tensors that were loaded."""
    decoder, config = setup["decoder"], setup["config"]
    save_params(decoder, str(tmp_path / "orbax"))
    with ocp.StandardCheckpointer() as checkpointer:
        stored = checkpointer.metadata(str(tmp_path / "orbax" / PARAMS_DIR))
    tree = getattr(getattr(stored, "item_metadata", stored), "tree", stored)
    assert sorted(tree) == sorted(r.path for r in text_key_map(config))  # layers.0. ... layers.9.
    assert tuple(tree["layers.4.mlp.down_proj.kernel"].shape) == (128, 64)
    abstract = nnx.eval_shape(lambda: Gemma3TextDecoder(config, rngs=nnx.Rngs(0)))
    restored = restore_params(abstract, str(tmp_path / "orbax"))
    for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(decoder, nnx.Param)),
                                 nnx.to_flat_state(nnx.state(restored, nnx.Param))):
        np.testing.assert_array_equal(np.asarray(b.get_value()), np.asarray(a.get_value()), err_msg=param_path(path))
    os.makedirs(tmp_path / "hf")
    export_params(restored, text_key_map(config), str(tmp_path / "hf"))
    exported = load_file(str(tmp_path / "hf" / "model.safetensors"))
    original = load_file(os.path.join(setup["directory"], "model.safetensors"))
    assert sorted(exported) == sorted(k for k in original if k != "lm_head.weight")
    for key in exported:
        np.testing.assert_array_equal(exported[key], original[key], err_msg=key)


_CACHED_RUN = """
import sys, jax, jax.numpy as jnp
from theworld_jax.jit import enable_compilation_cache
hits = []
jax.monitoring.register_event_listener(lambda event, **kw: hits.append(event) if "cache_hits" in event else None)
print("DIR", enable_compilation_cache(sys.argv[1]))
jax.jit(lambda x: jnp.tanh(x) @ x.T)(jnp.ones((8, 8))).block_until_ready()
print("HITS", len(hits))
"""


def test_persistent_compilation_cache_serves_a_second_process(tmp_path):
    cache = str(tmp_path / "jit-cache")
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_COMPILATION_CACHE_DIR",)}
    runs = [subprocess.run([sys.executable, "-c", _CACHED_RUN, cache], capture_output=True, text=True, env=env,
                           cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), timeout=120)
            for _ in range(2)]
    for run in runs:
        assert run.returncode == 0, run.stderr[-2000:]
    assert f"DIR {cache}" in runs[0].stdout and os.listdir(cache)
    hits = [int(run.stdout.split("HITS")[1]) for run in runs]
    assert hits[0] == 0 and hits[1] >= 1, hits  # every program of the first process, the matmul's included


def test_an_unusable_cache_dir_is_a_warning_and_no_cache_flag_leaves_jax_alone(tmp_path, capsys):
    from theworld_jax import cli

    parser = cli.Parser(prog="x")
    cli.add_compile_cache(parser)
    before = jax.config.jax_compilation_cache_dir
    blocker = tmp_path / "file"
    blocker.write_text("")
    cli.use_compile_cache(parser.parse_args(["--compile-cache", str(blocker / "cache")]))
    assert "warning: no persistent compilation cache" in capsys.readouterr().err
    cli.use_compile_cache(parser.parse_args(["--no-compile-cache"]))
    assert jax.config.jax_compilation_cache_dir == before
