"""Generation: greedy tokens against transformers' generate on tiny models; sampling; stopping; buckets."""

import numpy as np
import pytest
import torch
from PIL import Image

from theworld_jax import generation, sampling
from theworld_jax.weights.gemma3_keys import load_gemma3
from tiny_gemma import build_processor, build_tiny_gemma3, save_tiny_gemma3, tiny_gemma3_config

MAX_NEW = 16  # > the window (8): the sliding layers' ring buffer wraps during decoding
TEXT = "<bos>The robot picks up the blue block and places it on top of the green one. A cat is"
IMAGE_TEXTS = ["<bos>Describe <start_of_image> the scene in one sentence.",
               "<bos>A cat <start_of_image> is sitting on a red chair next to the window and the sun"]


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


def jax_generate(model, processor, inputs: dict, **kwargs) -> np.ndarray:
    kwargs.setdefault("max_new_tokens", MAX_NEW)
    return generation.generate(model, vocab_limit=len(processor.tokenizer), **inputs, **kwargs)


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
