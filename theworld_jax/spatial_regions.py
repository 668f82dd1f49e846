"""SpatialRGPT regions: boxes drawn on the image and `<mask>` references rewritten to `Region [i]`.

Upstream TheWorld (kasohrab/theworld, `datasets/bbox_utils.py` and `datasets/spatial_rgpt.py`) feeds
SpatialRGPT data (OpenSpatialDataset for training, SpatialRGPT-Bench for evaluation) as an image with
the regions drawn on it and text that names them `Region [i]`. This module does both, the same way:

* `bbox[k]` belongs to the k-th `<mask>` of the whole conversation. Identical boxes are one region; a
  region's global id is its index among the unique boxes, in order of first appearance.
* User turns: each `<mask> <depth>` / `<mask>` becomes `Region [global id]`, the counter running across
  turns; a leftover `<depth>` is removed, `<image>` is stripped from the first message.
  (Upstream replaces all `<mask> <depth>` of a turn before any bare `<mask>`; here a turn is rewritten
  left to right, which is the same on every published row, where the two forms are never mixed.)
* Assistant turns: `Region [n]` is turn-local (n-th region of the previous user turn) and is remapped to
  that region's global id; numbers the previous user turn does not have are kept.
* Drawing (one box per unique region, in id order): the box is clamped to the image, un-inverted, made
  at least 1 px wide and high and cast to int; a 3 px outline is drawn inward in the colour palette
  below (cycling); a white `Region [i]` label sits on a box filled with the outline colour, placed in the
  first spot that does not overlap an earlier label, trying top-outside, bottom-outside, top-inside,
  right-outside, left-outside, bottom-inside (2 px padding, clamped to the image), else the top-outside
  spot shifted by (i mod 10) * 8 px on both axes.
* Font: DejaVuSans-Bold at 16 px when PIL finds it (upstream hard-codes that font); otherwise PIL's
  default font scaled to 16 px (Pillow's bundled Aileron through FreeType), where upstream would fall
  back to PIL's tiny bitmap font. The glyphs then differ from upstream's; boxes and placement rules do not.
"""

from __future__ import annotations

import ast
import functools
import json
import re
from dataclasses import dataclass
from typing import Any, Sequence

from PIL import Image, ImageDraw, ImageFont

COLORS = ("#FF0000", "#00FF00", "#0000FF", "#FFFF00", "#FF00FF", "#00FFFF", "#FF8000", "#8000FF")
THICKNESS = 3
PADDING = 2
FONT_NAME = "DejaVuSans-Bold.ttf"
FONT_SIZE = 16
PLACEMENTS = ("top-outside", "bottom-outside", "top-inside", "right-outside", "left-outside", "bottom-inside")

_MASK = re.compile(r"<mask>(?: <depth>)?")
_REGION = re.compile(r"Region \[(\d+)\]")


@dataclass(frozen=True)
class SpatialExample:
    """A rewritten conversation: `messages` ({"role": "user"|"assistant", "content": str}) and the unique
    `boxes` ([x1, y1, x2, y2] in pixels, as given); `Region [i]` in the text is `boxes[i]`."""

    messages: tuple[dict, ...]
    boxes: tuple[tuple[float, float, float, float], ...]


def parse_serialised(value: Any) -> Any:
    """`value` itself, or the object a JSON / Python-literal string spells (HF datasets serialise both);
    ValueError for a string that is neither."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        try:
            return ast.literal_eval(value)
        except (ValueError, SyntaxError) as e:
            raise ValueError(f"not a JSON or Python literal: {value[:60]!r}") from e


def parse_listlike(value: Any, what: str) -> list:
    """A list given as a list, a JSON string or a Python-literal string (HF datasets serialise both)."""
    if isinstance(value, str):
        try:
            value = parse_serialised(value)
        except ValueError as e:
            raise ValueError(f"{what} is a string that is not a list: {value[:60]!r}") from e
    if value is None:
        return []
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{what} must be a list, got {type(value).__name__}")
    return list(value)


def unique_boxes(bboxes: Sequence[Sequence[float]]) -> tuple[list[tuple[float, ...]], list[int]]:
    """Merge identical boxes: (unique boxes in first-appearance order, global id of each input box)."""
    unique: list[tuple[float, ...]] = []
    ids: list[int] = []
    for k, box in enumerate(bboxes):
        if len(box) != 4:
            raise ValueError(f"bbox[{k}] must have 4 numbers [x1, y1, x2, y2], got {list(box)}")
        key = tuple(float(v) for v in box)
        if key not in unique:
            unique.append(key)
        ids.append(unique.index(key))
    return unique, ids


def rewrite_conversation(conversations: Any, bboxes: Any) -> SpatialExample:
    """SpatialRGPT `conversations` ([{"from": "human"|"gpt", "value": str}]) and `bbox` -> SpatialExample.

    Raises ValueError when the conversation has more `<mask>` than boxes (naming both counts)."""
    turns = parse_listlike(conversations, "conversations")
    unique, ids = unique_boxes(parse_listlike(bboxes, "bbox"))
    n_masks = sum(str(t.get("value", "")).count("<mask>") for t in turns if t.get("from") == "human")
    if n_masks > len(ids):
        raise ValueError(f"conversation has {n_masks} <mask> but bbox has only {len(ids)} boxes")
    counter = 0
    local_to_global: dict[int, int] = {}
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or "value" not in turn:
            raise ValueError(f"conversations[{i}] must be a dict with 'from' and 'value', got {turn!r}")
        text = str(turn["value"])
        if i == 0:
            text = text.replace("<image>", "").strip()
        if turn.get("from") == "human":
            local_to_global = {}

            def to_global(_match):
                nonlocal counter
                local_to_global[len(local_to_global)] = ids[counter]
                counter += 1
                return f"Region [{local_to_global[len(local_to_global) - 1]}]"

            text = _MASK.sub(to_global, text).replace("<depth>", "")
            messages.append({"role": "user", "content": text})
        else:
            mapping = dict(local_to_global)
            text = _REGION.sub(lambda m: f"Region [{mapping.get(int(m.group(1)), int(m.group(1)))}]", text)
            messages.append({"role": "assistant", "content": text})
    return SpatialExample(messages=tuple(messages), boxes=tuple(unique))


def clamp_box(box: Sequence[float], width: int, height: int) -> tuple[int, int, int, int]:
    """Clamp to the image, un-invert, at least 1 px on each axis (where the image allows), then int."""
    x1, y1, x2, y2 = (float(v) for v in box)
    x1, x2 = (max(0.0, min(float(width), v)) for v in (x1, x2))
    y1, y2 = (max(0.0, min(float(height), v)) for v in (y1, y2))
    x1, x2 = min(x1, x2), max(x1, x2)
    y1, y2 = min(y1, y2), max(y1, y2)
    if x2 == x1:
        x2 = min(x1 + 1, float(width))
    if y2 == y1:
        y2 = min(y1 + 1, float(height))
    return int(x1), int(y1), int(x2), int(y2)


@functools.lru_cache(maxsize=None)
def load_font() -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """DejaVuSans-Bold 16 when PIL finds it, else PIL's default font at 16 px (see module docstring)."""
    try:
        return ImageFont.truetype(FONT_NAME, FONT_SIZE)
    except OSError:
        return ImageFont.load_default(size=FONT_SIZE)


def _overlaps(a: Sequence[int], b: Sequence[int]) -> bool:
    return not (a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1])


def _spot(placement: str, box: Sequence[int], w: int, h: int, size: tuple[int, int]) -> tuple[int, int]:
    x1, y1, x2, y2 = box
    width, height = size
    return _clamp_label(*{
        "top-outside": (x1, max(0, y1 - h - PADDING)),
        "bottom-outside": (x1, min(height - h, y2 + PADDING)),
        "top-inside": (x1 + PADDING, y1 + PADDING),
        "right-outside": (min(width - w, x2 + PADDING), y1),
        "left-outside": (max(0, x1 - w - PADDING), y1),
        "bottom-inside": (x1 + PADDING, max(y1, y2 - h - PADDING)),
    }[placement], w, h, size)


def _clamp_label(x: int, y: int, w: int, h: int, size: tuple[int, int]) -> tuple[int, int]:
    return max(0, min(size[0] - w, x)), max(0, min(size[1] - h, y))


def label_positions(boxes: Sequence[Sequence[int]], label_sizes: Sequence[tuple[int, int]],
                    image_size: tuple[int, int]) -> list[tuple[int, int]]:
    """Top-left (x, y) of each label: the first PLACEMENTS spot clear of earlier labels, else the fallback.

    boxes: clamped int boxes; label_sizes: (w, h) of each label's text box; image_size: (width, height)."""
    placed: list[tuple[int, int, int, int]] = []
    out = []
    for i, (box, (w, h)) in enumerate(zip(boxes, label_sizes)):
        for placement in PLACEMENTS:
            x, y = _spot(placement, box, w, h, image_size)
            if not any(_overlaps((x, y, x + w, y + h), p) for p in placed):
                break
        else:
            shift = (i % 10) * 8
            x, y = _clamp_label(box[0] + shift, max(0, box[1] - h - PADDING) + shift, w, h, image_size)
        placed.append((x, y, x + w, y + h))
        out.append((x, y))
    return out


def draw_regions(image: Image.Image, boxes: Sequence[Sequence[float]]) -> Image.Image:
    """A copy of `image` (RGB) with boxes[i] drawn and labelled `Region [i]`."""
    out = image.convert("RGB") if image.mode != "RGB" else image.copy()
    draw = ImageDraw.Draw(out)
    font = load_font()
    clamped = [clamp_box(b, *out.size) for b in boxes]
    labels = [f"Region [{i}]" for i in range(len(clamped))]
    sizes = []
    for label in labels:
        l, t, r, b = draw.textbbox((0, 0), label, font=font)
        sizes.append((r - l, b - t))
    for i, ((x1, y1, x2, y2), label, (lx, ly)) in enumerate(
            zip(clamped, labels, label_positions(clamped, sizes, out.size))):
        color = COLORS[i % len(COLORS)]
        for k in range(THICKNESS):
            if x2 - k <= x1 + k or y2 - k <= y1 + k:
                break
            draw.rectangle([x1 + k, y1 + k, x2 - k, y2 - k], outline=color, width=1)
        draw.rectangle(draw.textbbox((lx, ly), label, font=font), fill=color)
        draw.text((lx, ly), label, fill="white", font=font)
    return out


def spatial_example(image: Image.Image, conversations: Any, bboxes: Any) -> tuple[Image.Image, SpatialExample]:
    """One SpatialRGPT row -> (the image with its regions drawn, the rewritten conversation)."""
    example = rewrite_conversation(conversations, bboxes)
    return draw_regions(image, example.boxes), example
