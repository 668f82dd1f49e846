"""theworld_jax.inputs: ids, world markers and images -> a prepared Batch, with one-line errors."""

import numpy as np
import pytest
from PIL import Image

from theworld_jax.config.gemma3 import Gemma3Config, Gemma3TextConfig, RopeConfig, SiglipVisionConfig
from theworld_jax.config.theworld import TheWorldConfig
from theworld_jax.config.wan_vae import WanVAEConfig
from theworld_jax.inputs import Batch, InputSpec, as_ids, prepare_batch

VOCAB, BOS, SOW, EOW, IMAGE = 300, 2, 290, 291, 262
TEXT = Gemma3TextConfig(vocab_size=VOCAB, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                        num_attention_heads=1, num_key_value_heads=1, head_dim=8, query_pre_attn_scalar=8,
                        sliding_window=4, rms_norm_eps=1e-6, layer_types=("full_attention",),
                        rope=(("full_attention", RopeConfig(1e4)),), max_position_embeddings=64, bos_token_id=BOS)
VISION = SiglipVisionConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=1,
                            image_size=28, patch_size=14, layer_norm_eps=1e-6)
GEMMA = Gemma3Config(TEXT, VISION, mm_tokens_per_image=4, image_token_id=IMAGE)
WORLD = TheWorldConfig(vae_image_size=(16, 16), sow_token_id=SOW, eow_token_id=EOW)
VAE = WanVAEConfig(base_dim=8, z_dim=4, dim_mult=(1, 2, 2, 2), num_res_blocks=1)
SPEC = InputSpec(GEMMA, WORLD, VAE)


def rgb(seed=0, shape=(12, 10, 3)):
    return np.random.RandomState(seed).randint(0, 256, shape, dtype=np.uint8)


def test_text_batch_is_int32_with_default_mask():
    batch = prepare_batch(SPEC, [BOS, 5, 6])
    assert isinstance(batch, Batch) and batch.world_tokens == 0 and batch.video is None
    assert batch.input_ids.dtype == np.int32 and batch.input_ids.tolist() == [[BOS, 5, 6]]
    assert batch.attention_mask.tolist() == [[1, 1, 1]]


@pytest.mark.parametrize("dtype", [np.int64, np.uint64, np.uint32])
def test_ids_outside_the_vocabulary_are_rejected_whatever_the_dtype(dtype):
    ids = np.array([[BOS, 2**32 + 5 if np.iinfo(dtype).max > 2**32 else 2**31 + 5]], dtype)
    with pytest.raises(ValueError, match=r"input_ids must lie in \[0, 300\)"):
        prepare_batch(SPEC, ids)
    with pytest.raises(ValueError, match=r"labels must lie in"):
        as_ids("labels", np.array([[2**32 - 100]], np.int64))


def test_one_image_or_clip_for_a_batch_of_one_row():
    ids = [[BOS, 7, 8]]
    image = Image.fromarray(rgb())
    one = prepare_batch(SPEC, ids, images=image)
    assert one.video.shape == (1, 1, 16, 16, 3) and one.world_tokens == 4
    assert one.input_ids.tolist() == [[BOS, SOW, EOW, 7, 8]]
    np.testing.assert_array_equal(one.video, prepare_batch(SPEC, ids, images=[image]).video)
    clip = np.stack([rgb(i) for i in range(5)])
    assert prepare_batch(SPEC, ids, images=clip).video.shape == (1, 5, 16, 16, 3)
    with pytest.raises(ValueError, match=r"got 1 images/clips for a batch of 2 row\(s\); pass one per row"):
        prepare_batch(SPEC, [[BOS, 7], [BOS, 8]], images=image)
    with pytest.raises(TypeError, match="got str"):
        prepare_batch(SPEC, ids, images="scene.png")


def test_non_rgb_hint_names_an_option_that_exists():
    image = Image.fromarray(rgb()).convert("RGBA")
    with pytest.raises(ValueError, match=r"got mode 'RGBA'") as err:
        prepare_batch(SPEC, [[BOS, 7]], images=image)
    assert "image.convert('RGB')" in str(err.value) and "convert_rgb" not in str(err.value)
    fixed = prepare_batch(SPEC, [[BOS, 7]], images=image.convert("RGB"))
    assert fixed.video.shape == (1, 1, 16, 16, 3)


def test_pixel_values_must_match_the_image_tokens():
    with pytest.raises(ValueError, match="image tokens"):
        prepare_batch(SPEC, [[BOS, IMAGE, IMAGE]], pixel_values=np.zeros((1, 3, 28, 28), np.float32))
    batch = prepare_batch(SPEC, [[BOS] + [IMAGE] * 4], pixel_values=np.zeros((1, 3, 28, 28), np.float64))
    assert batch.pixel_values.dtype == np.float32


def test_images_need_the_world_branch():
    plain = InputSpec(GEMMA)
    with pytest.raises(ValueError, match="world branch is disabled"):
        prepare_batch(plain, [[BOS, 7]], images=rgb())
    with pytest.raises(ValueError, match="position_ids cannot be given with images"):
        prepare_batch(SPEC, [[BOS, 7]], position_ids=[[0, 1]], images=rgb())


def test_logits_to_keep_follows_the_injected_markers():
    ids = np.array([[0, BOS, 5, 6], [BOS, 5, 6, 7]])
    mask = np.array([[0, 1, 1, 1], [1, 1, 1, 1]])
    keep = np.array([[-1, 1, 3], [0, 2, 3]])
    batch = prepare_batch(SPEC, ids, mask, images=[rgb(0), rgb(1)], logits_to_keep=keep)
    assert batch.logits_to_keep.tolist() == [[-1, 1, 5], [0, 4, 5]]
    kept = np.take_along_axis(batch.input_ids, np.maximum(batch.logits_to_keep, 0), axis=1)
    assert (kept == np.take_along_axis(ids, np.maximum(keep, 0), axis=1))[keep >= 0].all()
    assert prepare_batch(SPEC, ids, mask, logits_to_keep=keep).logits_to_keep.tolist() == keep.tolist()


@pytest.mark.parametrize("keep, message", [(np.array([[4]]), r"logits_to_keep must lie in \[-1, 4\)"),
                                           (np.array([[1], [2]]), "logits_to_keep has 2 rows, expected 1"),
                                           (2, "an int N")])
def test_bad_logits_to_keep_is_one_line(keep, message):
    with pytest.raises(ValueError, match=message):
        prepare_batch(SPEC, [BOS, 5, 6, 7], logits_to_keep=keep)
