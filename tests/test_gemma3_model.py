"""Gemma3Model logits against transformers' Gemma3ForConditionalGeneration on the same tiny weights.

The model is saved in HF format and loaded through `load_gemma3`; the inputs are the Gemma3Processor's
(input_ids, attention_mask, pixel_values, token_type_ids). float32: max |diff| <= 1e-5 * max(1, max|ref|)
over valid positions; bfloat16: ||diff|| / ||ref|| <= 2e-2 against float32 transformers.
"""

from types import SimpleNamespace

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from PIL import Image

from theworld_jax.weights.gemma3_keys import load_gemma3
from tests.helpers.tiny_gemma import build_processor, build_tiny_gemma3, save_tiny_gemma3, tiny_gemma3_config

_forward = nnx.jit(lambda model, ids, mask, pixels, types, positions: model(
    ids, attention_mask=mask, pixel_values=pixels, token_type_ids=types, position_ids=positions))

LONG_TEXT = ("The robot picks up the blue block and places it on top of the green one, then it walks to the "
             "window and looks at the cat sitting on the red chair while the sun is shining. ") * 2


def _image(seed: int, size=(64, 80)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8))


def _messages(text: str, n_images: int) -> list[dict]:
    content = [{"type": "image"}] * n_images + [{"type": "text", "text": text}]
    return [{"role": "user", "content": content}]


def _inputs(processor, texts: list[str], images: list[list[Image.Image]] | None) -> dict:
    prompts = [processor.apply_chat_template(_messages(t, len(images[i]) if images else 0),
                                             add_generation_prompt=True, tokenize=False)
               for i, t in enumerate(texts)]
    return dict(processor(text=prompts, images=images, padding=True, return_tensors="np"))


def _ours(model, inputs: dict, *, types=True, positions=None) -> np.ndarray:
    get = lambda k: None if inputs.get(k) is None else jnp.asarray(inputs[k])  # noqa: E731
    out = _forward(model, get("input_ids"), get("attention_mask"), get("pixel_values"),
                   get("token_type_ids") if types else None, positions)
    return np.asarray(out)


def _reference(hf, inputs: dict, *, types=True, **extra) -> np.ndarray:
    kwargs = {k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()
              if k != "token_type_ids" or types}
    with torch.no_grad():
        return hf(**kwargs, **extra).logits.float().numpy()


def _assert_close(ours: np.ndarray, ref: np.ndarray, valid: np.ndarray | None = None):
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    valid = np.ones(ref.shape[:2], bool) if valid is None else valid.astype(bool)
    err = np.abs(ours - ref)[valid].max()
    bound = 1e-5 * max(1.0, np.abs(ref[valid]).max())
    assert err <= bound, f"max |logit diff| {err:.3g} > {bound:.3g}"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    processor = build_processor()
    hf = build_tiny_gemma3(seed=0)
    directory = save_tiny_gemma3(hf, processor, str(tmp_path_factory.mktemp("gemma3")))
    config, model = load_gemma3(directory)
    return SimpleNamespace(processor=processor, hf=hf, config=config, model=model, dir=directory)


@pytest.fixture(scope="module")
def image_inputs(tiny):
    return _inputs(tiny.processor, ["What is in this image?"], [[_image(0)]])


def test_text_only(tiny):
    inputs = _inputs(tiny.processor, ["Hello, how are you?"], None)
    _assert_close(_ours(tiny.model, inputs), _reference(tiny.hf, inputs))


def test_image_and_text_with_token_type_ids(tiny, image_inputs):
    assert image_inputs["pixel_values"].shape == (1, 3, 56, 56)
    assert image_inputs["token_type_ids"].sum() == tiny.config.mm_tokens_per_image
    ref = _reference(tiny.hf, image_inputs)
    assert np.abs(ref - _reference(tiny.hf, image_inputs, types=False)).max() > 1e-3  # the blocks matter
    _assert_close(_ours(tiny.model, image_inputs), ref)


def test_image_and_text_without_token_type_ids_is_causal(tiny, image_inputs):
    _assert_close(_ours(tiny.model, image_inputs, types=False), _reference(tiny.hf, image_inputs, types=False))


def test_prompt_longer_than_sliding_window(tiny):
    inputs = _inputs(tiny.processor, [LONG_TEXT], [[_image(1)]])
    assert inputs["input_ids"].shape[1] > 8 * tiny.config.text.sliding_window
    _assert_close(_ours(tiny.model, inputs), _reference(tiny.hf, inputs))


def test_two_images_in_one_prompt(tiny):
    inputs = _inputs(tiny.processor, ["Compare the two images."], [[_image(2), _image(3, (40, 40))]])
    assert inputs["pixel_values"].shape[0] == 2
    _assert_close(_ours(tiny.model, inputs), _reference(tiny.hf, inputs))


def test_left_padded_batch_matches_each_row_alone(tiny):
    texts, images = ["What is in this image?", LONG_TEXT], [[_image(4)], [_image(5)]]
    batch = _inputs(tiny.processor, texts, images)
    assert (batch["attention_mask"][0] == 0).any(), "row 0 should be left-padded"
    ours = _ours(tiny.model, batch)
    for row in range(2):
        alone = _inputs(tiny.processor, texts[row:row + 1], images[row:row + 1])
        valid = batch["attention_mask"][row].astype(bool)
        _assert_close(ours[row:row + 1, valid], _reference(tiny.hf, alone))


def test_explicit_position_ids(tiny, image_inputs):
    length = image_inputs["input_ids"].shape[1]
    positions = np.arange(length)[None] + 7 * (np.arange(length)[None] >= length // 2)  # a gap: not a shift
    ours = _ours(tiny.model, image_inputs, positions=jnp.asarray(positions))
    _assert_close(ours, _reference(tiny.hf, image_inputs, position_ids=torch.from_numpy(positions)))


def test_image_block_longer_than_window(tmp_path):
    """Sliding layers: (k > q - W) and (causal or same block); a 4-token block with W = 3."""
    processor = build_processor()
    hf = build_tiny_gemma3(tiny_gemma3_config(text_config={"sliding_window": 3}), seed=1)
    _, model = load_gemma3(save_tiny_gemma3(hf, processor, str(tmp_path)))
    inputs = _inputs(processor, ["What is in this image?"], [[_image(6)]])
    _assert_close(_ours(model, inputs), _reference(hf, inputs))


def test_bfloat16_close_to_float32_reference(tiny, image_inputs):
    _, model = load_gemma3(tiny.dir, dtype=jnp.bfloat16)
    assert model.language_model.embed_tokens.embedding[...].dtype == jnp.bfloat16
    ours, ref = _ours(model, image_inputs), _reference(tiny.hf, image_inputs)
    rel = np.linalg.norm(ours - ref) / np.linalg.norm(ref)
    assert rel <= 2e-2, f"||diff|| / ||ref|| = {rel:.3g}"


def test_pixel_values_of_wrong_size_are_rejected(tiny, image_inputs):
    pixels = np.zeros((1, 3, 64, 64), np.float32)
    with pytest.raises(ValueError, match=r"pixel_values must have shape \(num_images, 3, 56, 56\).*64, 64"):
        tiny.model(jnp.asarray(image_inputs["input_ids"]), pixel_values=jnp.asarray(pixels))


def test_image_token_count_must_match_images(tiny, image_inputs):
    pixels = np.concatenate([image_inputs["pixel_values"]] * 2)
    with pytest.raises(ValueError, match="4 image tokens .* 2 image.* 8 features"):
        tiny.model(jnp.asarray(image_inputs["input_ids"]), pixel_values=jnp.asarray(pixels))


def test_token_type_ids_of_wrong_length_are_rejected(tiny, image_inputs):
    ids = jnp.asarray(image_inputs["input_ids"])
    with pytest.raises(ValueError, match="token_type_ids must have the shape of input_ids"):
        tiny.model(ids, token_type_ids=ids[:, :-5])


def test_token_ids_outside_the_vocabulary_are_rejected(tiny):
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 300\)"):
        tiny.model(jnp.asarray([[2, 4, 300]]))


def test_sequence_longer_than_the_model_allows_is_rejected(tiny):
    ids = jnp.full((1, tiny.config.text.max_position_embeddings + 1), 9)
    with pytest.raises(ValueError, match="513 tokens; this model allows at most 512"):
        tiny.model(ids)
