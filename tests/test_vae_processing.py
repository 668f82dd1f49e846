"""prepare_video: images and clips -> (B, T, H, W, 3) float32 VAE input."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from theworld_jax.inputs import prepare_video


def rgb_array(h=20, w=30, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def pil_bilinear(array, h, w):
    """What upstream did: PIL bilinear resize of an RGB image, (w, h) order."""
    return np.asarray(Image.fromarray(array).resize((w, h), Image.BILINEAR), dtype=np.float32)


def test_pil_image_resized_bilinear_to_minus_one_one():
    array = rgb_array()
    out = prepare_video(Image.fromarray(array), size=(16, 24))
    assert out.shape == (1, 1, 16, 24, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out[0, 0], pil_bilinear(array, 16, 24) / 127.5 - 1, atol=1e-6)


def test_uint8_array_and_zero_255_range():
    array = rgb_array()
    out = prepare_video(array, size=(8, 8), value_range="zero_255")
    np.testing.assert_array_equal(out[0, 0], pil_bilinear(array, 8, 8))
    assert prepare_video(array, size=None, value_range="zero_255")[0, 0].tolist() == array.tolist()


def test_batches_of_images_and_clips():
    frames = [rgb_array(seed=i) for i in range(3)]
    assert prepare_video(frames, size=16).shape == (3, 1, 16, 16, 3)  # a list = a batch of images
    clip = np.stack(frames)
    by_array = prepare_video(clip, size=16)  # one (T, H, W, 3) clip
    by_frames = prepare_video([[Image.fromarray(f) for f in frames]], size=16)  # one clip of PIL frames
    assert by_array.shape == (1, 3, 16, 16, 3)
    np.testing.assert_array_equal(by_array, by_frames)
    batch = prepare_video(np.stack([clip, clip[::-1]]), size=16)  # (B, T, H, W, 3)
    np.testing.assert_array_equal(batch[1], by_array[0, ::-1])
    assert prepare_video([clip, clip], size=(8, 16)).shape == (2, 3, 8, 16, 3)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
def test_non_rgb_image_is_rejected_unless_converted(mode):
    image = Image.fromarray(rgb_array()).convert(mode)
    with pytest.raises(ValueError, match=f"expected an RGB image; got mode '{mode}'"):
        prepare_video(image, size=8)
    converted = prepare_video(image, size=8, convert_rgb=True)
    np.testing.assert_array_equal(converted, prepare_video(image.convert("RGB"), size=8))


@pytest.mark.parametrize("data, error, message", [
    (np.zeros((4, 4), np.uint8), ValueError, r"\(H, W, 3\).*shape \(4, 4\)"),
    (np.zeros((4, 4, 4), np.uint8), ValueError, r"\(H, W, 3\).*shape \(4, 4, 4\)"),
    (np.zeros((4, 4, 3), np.float32), ValueError, "uint8.*float32"),
    (np.zeros((1, 1, 1, 1, 1, 3), np.uint8), ValueError, "shape"),
    (np.zeros((0, 4, 4, 3), np.uint8), ValueError, "empty clip"),
    ([], ValueError, "batch is empty"),
    ([[]], ValueError, "empty clip"),
    ([np.zeros((2, 4, 4, 3), np.uint8), np.zeros((3, 4, 4, 3), np.uint8)], ValueError, r"lengths \[2, 3\]"),
    ("image.png", TypeError, "str"),
    ([42], TypeError, "sample 0.*int"),
])
def test_bad_input_is_rejected(data, error, message):
    with pytest.raises(error, match=message):
        prepare_video(data, size=8)


def test_bad_options_are_rejected():
    with pytest.raises(ValueError, match="value_range"):
        prepare_video(rgb_array(), value_range="zero_one")
    with pytest.raises(ValueError, match="size"):
        prepare_video(rgb_array(), size=(0, 8))
    with pytest.raises(ValueError, match="same size"):
        prepare_video([rgb_array(4, 4), rgb_array(4, 8)], size=None)
