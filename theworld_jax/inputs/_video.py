"""Images and clips -> VAE input (B, T, H, W, 3) float32, resized with PIL's bilinear filter.

A batch is a list of samples; a sample is one image (a PIL image or an (H, W, 3) uint8 array) or one
clip (a (T, H, W, 3) uint8 array, or a list of frames, each a PIL image or an (H, W, 3) array). A single
sample may be passed without the list; a (B, T, H, W, 3) uint8 array is a batch of clips. An image is a
clip of one frame. All clips of a batch must have the same length.

Colour: PIL images must already be RGB. Other modes ("L", "RGBA", "P", ...) are an error (the message
says to call `image.convert("RGB")`) unless `convert_rgb=True`, which converts them with
`Image.convert("RGB")` as upstream TheWorld did (for RGBA that drops the alpha channel). Arrays must be
uint8 with 3 channels.

Values: "minus_one_one" (default, what the VAE was trained on) gives x / 127.5 - 1; "zero_255" gives
the raw 0..255 values as float, which is what upstream TheWorld fed its VAE.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from theworld_jax.config.theworld import VaeInputRange


def prepare_video(images_or_clips, size: int | tuple[int, int] | None = (512, 512),
                  value_range: str = VaeInputRange.MINUS_ONE_ONE, convert_rgb: bool = False) -> np.ndarray:
    """Images or clips -> (B, T, H, W, 3) float32; `size` is (height, width), an int for a square,
    or None to keep the inputs' size (which must then agree)."""
    value_range = VaeInputRange.parse(value_range, "value_range")
    size = _check_size(size)
    samples = as_samples(images_or_clips)
    if not samples:
        raise ValueError("the batch is empty: expected at least one image or clip")
    clips = [_prepare_clip(sample, i, size, convert_rgb) for i, sample in enumerate(samples)]
    lengths = sorted({len(c) for c in clips})
    if len(lengths) > 1:
        raise ValueError(f"all clips of a batch must have the same number of frames; got lengths {lengths}")
    shapes = sorted({c.shape[1:] for c in clips})
    if len(shapes) > 1:
        raise ValueError(f"with size=None all frames must have the same size; got {shapes}")
    video = np.stack(clips).astype(np.float32)
    return video / 127.5 - 1.0 if value_range == VaeInputRange.MINUS_ONE_ONE else video


def _check_size(size) -> tuple[int, int] | None:
    if size is None:
        return None
    if isinstance(size, (int, np.integer)):
        size = (size, size)
    if len(size) != 2 or any(not isinstance(s, (int, np.integer)) or s <= 0 for s in size):
        raise ValueError(f"size must be a positive int or (height, width); got {size!r}")
    return int(size[0]), int(size[1])


def as_samples(data) -> list:
    if isinstance(data, Image.Image):
        return [data]
    if isinstance(data, np.ndarray):
        if data.ndim == 5:
            return list(data)
        if data.ndim in (3, 4):
            return [data]
        raise ValueError(f"an array input must be (H, W, 3), (T, H, W, 3) or (B, T, H, W, 3); "
                         f"got shape {data.shape}")
    if isinstance(data, Sequence) and not isinstance(data, (str, bytes)):
        return list(data)
    raise TypeError(f"expected PIL images, uint8 arrays or lists of them; got {type(data).__name__}")


def _prepare_clip(sample, index: int, size, convert_rgb: bool) -> np.ndarray:
    """One sample -> (T, H, W, 3) uint8."""
    if isinstance(sample, Image.Image):
        frames = [sample]
    elif isinstance(sample, np.ndarray) and sample.ndim == 4:
        frames = list(sample)
    elif isinstance(sample, np.ndarray):
        frames = [sample]
    elif isinstance(sample, Sequence) and not isinstance(sample, (str, bytes)):
        frames = list(sample)
    else:
        raise TypeError(f"sample {index}: expected a PIL image, a uint8 array or a list of frames; "
                        f"got {type(sample).__name__}")
    if not frames:
        raise ValueError(f"sample {index} is an empty clip: expected at least one frame")
    return np.stack([_prepare_frame(f, f"sample {index}, frame {t}", size, convert_rgb)
                     for t, f in enumerate(frames)])


def _prepare_frame(frame, where: str, size, convert_rgb: bool) -> np.ndarray:
    """One frame -> (H, W, 3) uint8 at `size`."""
    if isinstance(frame, Image.Image):
        if frame.mode != "RGB":
            if not convert_rgb:
                raise ValueError(f"{where}: expected an RGB image; got mode {frame.mode!r} "
                                 "(convert it first with image.convert('RGB'))")
            frame = frame.convert("RGB")
        image = frame
    elif isinstance(frame, np.ndarray):
        if frame.ndim != 3 or frame.shape[-1] != 3:
            raise ValueError(f"{where}: expected an (H, W, 3) RGB array; got shape {frame.shape}")
        if frame.dtype != np.uint8:
            raise ValueError(f"{where}: expected a uint8 array (values 0..255); got dtype {frame.dtype}")
        if 0 in frame.shape:
            raise ValueError(f"{where}: the image is empty (shape {frame.shape})")
        image = Image.fromarray(np.ascontiguousarray(frame))
    else:
        raise TypeError(f"{where}: expected a PIL image or an (H, W, 3) uint8 array; got {type(frame).__name__}")
    if size is not None and image.size != (size[1], size[0]):
        image = image.resize((size[1], size[0]), Image.BILINEAR)
    return np.asarray(image, dtype=np.uint8)
