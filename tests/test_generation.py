"""Generation: greedy tokens against transformers' generate on tiny models; sampling; stopping; buckets."""

import collections
import functools
import io

import jax
import numpy as np
import pytest
import torch
from PIL import Image

from theworld_jax import generation, sampling
from theworld_jax.inputs import InputSpec, prepare_batch
from theworld_jax.jit import DECODE_LOOP_OPTIONS
from theworld_jax.weights.gemma3_keys import load_gemma3
from tests.helpers.tiny_gemma import build_processor, build_tiny_gemma3, save_tiny_gemma3, tiny_gemma3_config

MAX_NEW = 16  # > the window (8): the sliding layers' ring buffer wraps during decoding
TEXT = "<bos>The robot picks up the blue block and places it on top of the green one. A cat is"
WORLD_SIZE = (32, 32)  # the tiny VAE's spatial factor is 8: 4x4 latents, 16 world tokens
IMAGE_TEXTS = ["<bos>Describe <start_of_image> the scene in one sentence.",
               "<bos>A cat <start_of_image> is sitting on a red chair next to the window and the sun"]


filter_logits = jax.jit(sampling.filter_logits, static_argnames="config")
choose = jax.jit(sampling.choose, static_argnames="config")


def rand_image(seed, shape=(40, 50, 3)):
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, shape, dtype=np.uint8))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(HF model, processor, JAX Gemma3Model float32) on the same weights.

    Larger-than-default layer weights and small embeddings keep greedy decoding from repeating one token.
    """
    processor = build_processor()
    hf = build_tiny_gemma3(tiny_gemma3_config(text_config=dict(initializer_range=0.1)), seed=1,
                           embed_std=0.02)
    path = save_tiny_gemma3(hf, processor, str(tmp_path_factory.mktemp("gemma")))
    _, model = load_gemma3(path, dtype=np.float32)
    return hf, processor, model


def hf_generate(hf, processor, inputs: dict, **kwargs) -> np.ndarray:
    """transformers' greedy generate; ids at or past len(tokenizer) suppressed, as ours never produces them."""
    tensors = {k: torch.as_tensor(np.asarray(v)) for k, v in inputs.items()}
    suppress = list(range(len(processor.tokenizer), hf.config.text_config.vocab_size))
    with torch.no_grad():
        out = hf.generate(**tensors, max_new_tokens=kwargs.pop("max_new_tokens", MAX_NEW), do_sample=False,
                          suppress_tokens=suppress, pad_token_id=0, **kwargs)
    return out.numpy()


def gemma_batch(model, inputs: dict):
    return prepare_batch(InputSpec(model.config, dtype=model.dtype), **inputs)


def jax_generate(model, processor, inputs: dict, **kwargs) -> np.ndarray:
    kwargs.setdefault("max_new_tokens", MAX_NEW)
    return generation.generate(model, gemma_batch(model, inputs), vocab_limit=len(processor.tokenizer), **kwargs)


def assert_varied(new_tokens: np.ndarray):
    """A reference answer that repeats one token would prove little."""
    assert len(set(new_tokens.ravel().tolist())) >= 4, new_tokens


@pytest.fixture(scope="module")
def text_inputs(tiny):
    return dict(tiny[1].tokenizer([TEXT], return_tensors="np"))


@pytest.fixture(scope="module")
def image_batch(tiny):
    """Two rows of different lengths, left padded, with an image each, and token_type_ids."""
    enc = tiny[1](text=IMAGE_TEXTS, images=[[rand_image(0)], [rand_image(1)]], padding=True, return_tensors="np")
    assert enc["attention_mask"][0, 0] == 0 and enc["attention_mask"][1, 0] == 1
    return dict(enc)


def test_greedy_text_matches_transformers(tiny, text_inputs):
    hf, processor, model = tiny
    ref = hf_generate(hf, processor, text_inputs)
    assert_varied(ref[:, text_inputs["input_ids"].shape[1]:])
    np.testing.assert_array_equal(jax_generate(model, processor, text_inputs), ref)


def test_greedy_with_image_matches_transformers(tiny, image_batch):
    hf, processor, model = tiny
    row = {k: v[1:] for k, v in image_batch.items()}  # the unpadded row, alone
    ref = hf_generate(hf, processor, row)
    assert_varied(ref[:, row["input_ids"].shape[1]:])
    np.testing.assert_array_equal(jax_generate(model, processor, row), ref)


def test_greedy_left_padded_batch_matches_transformers(tiny, image_batch):
    hf, processor, model = tiny
    ref = hf_generate(hf, processor, image_batch)
    assert_varied(ref[0, image_batch["input_ids"].shape[1]:])
    np.testing.assert_array_equal(jax_generate(model, processor, image_batch), ref)


def test_rows_stop_independently_at_eos(tiny, image_batch):
    hf, processor, model = tiny
    length = image_batch["input_ids"].shape[1]
    free = jax_generate(model, processor, image_batch, eos_token_id=())[:, length:]
    # row 0 stops at step k (its first use of that id); row 1 runs on at least two steps longer
    k = next(k for k in range(1, MAX_NEW - 2) if free[0, k] not in free[0, :k] and free[0, k] not in free[1, :k + 2])
    eos = int(free[0, k])
    out = jax_generate(model, processor, image_batch, eos_token_id=eos)
    np.testing.assert_array_equal(out, hf_generate(hf, processor, image_batch, eos_token_id=eos))
    new = out[:, length:]
    np.testing.assert_array_equal(new[0, :k + 1], free[0, :k + 1])
    assert (new[0, k + 1:] == 0).all()  # pad after eos
    stop1 = np.flatnonzero(free[1] == eos)
    end1 = stop1[0] + 1 if len(stop1) else free.shape[1]
    np.testing.assert_array_equal(new[1, :end1], free[1, :end1])
    assert new.shape[1] == end1  # the loop ends when the last row stopped


@pytest.fixture(scope="module")
def world(tiny, tmp_path_factory):
    """(JAX TheWorld float32, PyTorch reference composition) on the same Gemma, VAE and projector."""
    import jax.numpy as jnp

    from tests.helpers import theworld_reference as ref
    from theworld_jax import TheWorld
    from theworld_jax.weights.world_projector_keys import export_world_projector
    from tests.helpers.tiny_vae import make_tiny_vae

    hf, processor, _ = tiny
    root = tmp_path_factory.mktemp("world")
    save_tiny_gemma3(hf, processor, str(root / "gemma"))
    vae = make_tiny_vae(str(root / "vae"), "cosmos_like").float().eval()
    model = TheWorld.from_pretrained(str(root / "gemma"), enable_world=True, cosmos_model_name=str(root / "vae"),
                                     dtype=jnp.float32, vae_image_size=WORLD_SIZE)
    exported = export_world_projector(model.model.world_projector, prefix="")
    first = exported["projection.0.weight"]
    projector = ref.TorchWorldProjector(first.shape[1], first.shape[0], model.config.projection_architecture)
    projector.load_state_dict({k: torch.from_numpy(np.array(v, np.float32)) for k, v in exported.items()})
    c = model.config
    reference = ref.TheWorldReference(hf, vae, projector.eval(), c.sow_token_id, c.eow_token_id,
                                      mode=c.world_projection_mode, vae_size=WORLD_SIZE)
    return model, reference, root


def reference_greedy(reference, inputs: dict, images, steps: int, vocab_limit: int) -> np.ndarray:
    """No-cache greedy loop over the PyTorch composition: (B, steps) new tokens, never an id >= vocab_limit."""
    t = {k: torch.as_tensor(np.asarray(v)) for k, v in inputs.items()}
    new = []
    with torch.no_grad():
        for _ in range(steps):
            logits, _ = reference(t["input_ids"], t["attention_mask"], t["pixel_values"], t["token_type_ids"],
                                  images=images)
            token = logits[:, -1, :vocab_limit].argmax(-1, keepdim=True)
            new.append(token)
            for key, value in (("input_ids", token), ("attention_mask", torch.ones_like(token)),
                               ("token_type_ids", torch.zeros_like(token))):
                t[key] = torch.cat([t[key], value], dim=1)
    return torch.cat(new, dim=1).numpy()


def test_greedy_with_world_tokens_matches_reference(world, tiny, image_batch):
    model, reference, _ = world
    images = [np.asarray(rand_image(5)), np.asarray(rand_image(6, (30, 20, 3)))]
    limit = len(tiny[1].tokenizer)
    expected = reference_greedy(reference, image_batch, images, MAX_NEW, limit)
    assert_varied(expected[0])
    out = model.generate(**image_batch, images=images, max_new_tokens=MAX_NEW, eos_token_id=())
    length = image_batch["input_ids"].shape[1] + 2  # <start_of_world><end_of_world> injected
    assert (out[:, 1:length] == model.config.sow_token_id).any(axis=1).all()
    np.testing.assert_array_equal(out[:, length:], expected)


def test_sampling_is_seeded(tiny, text_inputs):
    _, processor, model = tiny
    kw = dict(do_sample=True, temperature=1.5, top_k=50, top_p=0.95)
    first = jax_generate(model, processor, text_inputs, seed=0, **kw)
    np.testing.assert_array_equal(jax_generate(model, processor, text_inputs, seed=0, **kw), first)
    other = jax_generate(model, processor, text_inputs, seed=1, **kw)
    length = text_inputs["input_ids"].shape[1]
    assert not np.array_equal(other[:, length:], first[:, length:])


def test_filters_match_transformers_warpers():
    from transformers.generation.logits_process import (SuppressTokensLogitsProcessor, TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)

    vocab, limit = 300, 280
    logits = np.random.RandomState(0).randn(6, vocab).astype(np.float32) * 3
    for temperature, top_k, top_p in ((0.7, 20, None), (1.3, None, 0.8), (1.0, 40, 0.5), (0.5, 1, None)):
        config = sampling.SamplingConfig.make(vocab_limit=limit, vocab_size=vocab, do_sample=True,
                                              temperature=temperature, top_k=top_k, top_p=top_p)
        ours = np.asarray(filter_logits(logits, config, np.float32(temperature),
                                                 np.float32(1.0 if top_p is None else top_p)))
        ref = torch.from_numpy(logits)
        ids = torch.zeros((6, 1), dtype=torch.long)
        processors = [SuppressTokensLogitsProcessor(list(range(limit, vocab))), TemperatureLogitsWarper(temperature)]
        processors += [TopKLogitsWarper(top_k)] if top_k else []
        processors += [TopPLogitsWarper(top_p)] if top_p else []
        for p in processors:
            ref = p(ids, ref)
        ref = ref.numpy()
        np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(ref))
        np.testing.assert_allclose(ours[np.isfinite(ours)], ref[np.isfinite(ref)], rtol=1e-6)


def test_choose_never_picks_ids_past_the_limit():
    logits = np.zeros((4, 10), np.float32)
    logits[:, 8] = 5.0  # the best id is past the limit
    logits[:, 3] = 1.0
    greedy = sampling.SamplingConfig.make(vocab_limit=8, vocab_size=10)
    key = jax.random.key(0)
    assert (np.asarray(choose(logits, key, greedy, 1.0, 1.0)) == 3).all()
    sample = sampling.SamplingConfig.make(vocab_limit=8, vocab_size=10, do_sample=True, temperature=5.0)
    drawn = np.asarray(choose(np.tile(logits, (500, 1)), key, sample, np.float32(5.0), np.float32(1.0)))
    assert drawn.max() < 8 and len(set(drawn.tolist())) == 8


def test_samples_follow_the_filtered_distribution():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]], np.float32))
    config = sampling.SamplingConfig.make(vocab_limit=4, vocab_size=4, do_sample=True, top_p=0.7)
    draws = np.asarray(choose(np.tile(logits, (20000, 1)), jax.random.key(3), config,
                                       np.float32(1.0), np.float32(0.7)))
    freq = np.bincount(draws, minlength=4) / len(draws)
    np.testing.assert_allclose(freq, [0.5 / 0.8, 0.3 / 0.8, 0, 0], atol=0.015)  # nucleus {0, 1}, renormalised


@pytest.mark.parametrize("spread", [2.0, 0.3])  # a nucleus of a few ids, then of most of the vocabulary
def test_top_p_draws_stay_in_the_nucleus(spread):
    vocab = 512
    logits = np.random.RandomState(1).randn(1, vocab).astype(np.float32) * spread
    config = sampling.SamplingConfig.make(vocab_limit=vocab, vocab_size=vocab, do_sample=True, top_p=0.9)
    kept = np.isfinite(np.asarray(filter_logits(logits, config, np.float32(1.0), np.float32(0.9))))[0]
    probs = np.exp(logits[0] - logits[0].max()) / np.exp(logits[0] - logits[0].max()).sum()
    order = np.argsort(-probs)
    nucleus = order[:np.searchsorted(np.cumsum(probs[order]), 0.9) + 1]
    assert set(np.flatnonzero(kept)) == set(nucleus.tolist()) and (len(nucleus) > 256) == (spread < 1)
    draws = np.asarray(jax.jit(jax.vmap(lambda key: choose(logits, key, config, np.float32(1.0), np.float32(0.9))))(
        jax.random.split(jax.random.key(0), 4000)))[:, 0]
    assert kept[draws].all() and len(set(draws.tolist())) > 0.8 * kept.sum()


def test_top_k_keeps_ties_as_transformers():
    from transformers.generation.logits_process import TopKLogitsWarper

    logits = np.round(np.random.RandomState(2).randn(3, 200) * 2).astype(np.float32)  # many ties
    for k in (1, 5, 37):
        config = sampling.SamplingConfig.make(vocab_limit=200, vocab_size=200, do_sample=True, top_k=k)
        ours = np.isfinite(np.asarray(filter_logits(logits, config, np.float32(1.0), np.float32(1.0))))
        ref = np.isfinite(TopKLogitsWarper(k)(torch.zeros((3, 1), dtype=torch.long), torch.from_numpy(logits)).numpy())
        np.testing.assert_array_equal(ours, ref)
        assert (ours.sum(axis=1) >= k).all()


def count_traces(fn, counts):
    """fn, counting its traces (a trace precedes every compilation) in counts[fn.__name__]."""

    @functools.wraps(fn)
    def traced(*args, **kwargs):
        counts[fn.__name__] += 1
        return fn(*args, **kwargs)

    return traced


def test_ten_prompt_lengths_compile_a_few_programs(tiny, monkeypatch):
    _, processor, model = tiny
    traces = collections.Counter()
    for name in ("_prefill", "_decode"):
        monkeypatch.setattr(generation, name, count_traces(getattr(generation, name), traces))
    ids = processor.tokenizer([TEXT], return_tensors="np")["input_ids"][0]
    lengths = [10, 13, 17, 21, 26, 31, 37, 44, 51, 58]
    assert len(ids) >= max(lengths)
    policy = generation.BucketPolicy()
    for n in lengths:
        out = jax_generate(model, processor, dict(input_ids=ids[None, :n]))
        assert out.shape[0] == 1 and out.shape[1] > n
    buckets = {policy.length(n) for n in lengths}
    assert buckets == {32, 64}
    for program in ("_prefill", "_decode"):
        assert 1 <= traces[program] <= len(buckets)


def test_the_decode_loop_compiles_as_one_graph(tiny, text_inputs, monkeypatch):
    """The decode program asks XLA for command buffers that take the while loop and its condition (on a GPU
    the loop runs as one CUDA graph; other backends ignore the option)."""
    _, processor, model = tiny
    built = []
    jit_module = generation.jit_module
    monkeypatch.setattr(generation, "jit_module",
                        lambda fn, *args, **kw: built.append((fn, kw)) or jit_module(fn, *args, **kw))
    generation.start(model, gemma_batch(model, text_inputs), max_new_tokens=2, vocab_limit=len(processor.tokenizer))
    options = [kw.get("compiler_options") for fn, kw in built if fn is generation._decode]
    assert options == [DECODE_LOOP_OPTIONS]
    assert {"WHILE", "CONDITIONAL"} <= set(options[0]["xla_gpu_enable_command_buffer"].split(","))


class IdText:
    """A tokenizer stand-in whose text is always complete: one word per id."""

    @staticmethod
    def decode(ids, skip_special_tokens=True):
        return "".join(f" {i}" for i in ids)


def test_stream_text_yields_pieces_as_tokens_come(tiny, text_inputs):
    _, processor, model = tiny
    decoding = generation.start(model, gemma_batch(model, text_inputs), max_new_tokens=MAX_NEW,
                                vocab_limit=len(processor.tokenizer), eos_token_id=())
    pieces = list(generation.stream_text(decoding, IdText, chunk=3))
    new = decoding.new_tokens()[0].tolist()
    assert len(new) == MAX_NEW
    assert int(decoding.state.step) == MAX_NEW and decoding.state.tokens[0, :MAX_NEW].tolist() == new
    assert pieces == [IdText.decode(new[:1])] + [IdText.decode(new[i:i + 3]) for i in range(1, MAX_NEW, 3)]


def test_stream_text_adds_up_to_the_decoded_answer(tiny, text_inputs):
    _, processor, model = tiny
    tokenizer = processor.tokenizer
    decoding = generation.start(model, gemma_batch(model, text_inputs), max_new_tokens=MAX_NEW,
                                vocab_limit=len(tokenizer))
    text = "".join(generation.stream_text(decoding, tokenizer, chunk=4))
    assert text == tokenizer.decode(decoding.new_tokens()[0].tolist(), skip_special_tokens=True)
    np.testing.assert_array_equal(decoding.sequences(), jax_generate(model, processor, text_inputs))


def test_chat_prints_the_greedy_answer(world, tmp_path):
    from theworld_jax import chat

    model, _, root = world
    image = rand_image(7)
    image.save(tmp_path / "scene.png")
    out = io.StringIO()
    argv = ["--model", str(root / "gemma"), "--cosmos", str(root / "vae"), "--image", str(tmp_path / "scene.png"),
            "--prompt", "What is in this image?", "--max-new-tokens", "6", "--dtype", "float32",
            "--vae-image-size", *map(str, WORLD_SIZE)]
    assert chat.main(argv, out=out) == 0
    inputs = chat.chat_inputs(model.processor, "What is in this image?", image)
    assert "pixel_values" in inputs and "token_type_ids" in inputs
    tokens = model.generate(**inputs, images=[image], max_new_tokens=6)
    answer = model.processor.tokenizer.decode(tokens[0, inputs["input_ids"].shape[1] + 2:].tolist(),
                                              skip_special_tokens=True)
    assert answer and out.getvalue() == answer + "\n"


@pytest.mark.parametrize("change, message", [
    (dict(max_new_tokens=0), "max_new_tokens must be a positive integer"),
    (dict(do_sample=True, temperature=0.0), "temperature must be > 0"),
    (dict(do_sample=True, top_p=1.5), "top_p must be in"),
    (dict(do_sample=True, top_k=0), "top_k must be a positive integer"),
    (dict(max_new_tokens=600), "more than max_position_embeddings"),
    (dict(attention_mask=np.zeros((1, 5), np.int32)), "row 0 is all padding"),
    (dict(attention_mask=np.ones((1, 4), np.int32)), "attention_mask has shape"),
    (dict(input_ids=np.zeros((1, 0), np.int32)), "input_ids must be a non-empty"),
    (dict(vocab_limit=400), "vocab_limit must be in"),
    (dict(pixel_values=np.zeros((1, 3, 56, 56), np.float32)), "image tokens"),
])
def test_bad_input_is_a_clear_error(tiny, change, message):
    _, _, model = tiny
    kwargs = dict(input_ids=np.array([[2, 40, 41, 42, 43]], np.int32), max_new_tokens=4)
    kwargs.update(change)
    inputs = {k: kwargs.pop(k) for k in ("input_ids", "attention_mask", "pixel_values") if k in kwargs}
    with pytest.raises(ValueError, match=message):
        generation.generate(model, gemma_batch(model, inputs), **kwargs)
