"""SpatialRGPT regions: `<mask>` -> `Region [i]` rewriting and the drawing rules of upstream's bbox_utils."""

import numpy as np
import pytest
from PIL import Image

from theworld_jax.spatial_regions import (COLORS, clamp_box, draw_regions, label_positions, load_font,
                                          rewrite_conversation, spatial_example)

CONV = [
    {"from": "human", "value": "<image>\nIs <mask> <depth> wider than <mask> <depth>?"},
    {"from": "gpt", "value": "Region [0] is wider than Region [1]."},
    {"from": "human", "value": "How tall is <mask> <depth>?"},
    {"from": "gpt", "value": "Region [0] is 1.2 meters tall."},
]
BOXES = [[10, 20, 110, 220], [300, 40, 380, 200], [300, 40, 380, 200]]


def test_global_ids_across_turns_merged_boxes_and_assistant_remap():
    ex = rewrite_conversation(CONV, BOXES)
    assert [m["role"] for m in ex.messages] == ["user", "assistant", "user", "assistant"]
    assert [m["content"] for m in ex.messages] == [
        "Is Region [0] wider than Region [1]?", "Region [0] is wider than Region [1].",
        "How tall is Region [1]?", "Region [1] is 1.2 meters tall."]
    assert ex.boxes == ((10, 20, 110, 220), (300, 40, 380, 200))


def test_bare_mask_leftover_depth_string_fields_and_unknown_local_ids():
    conv = [{"from": "human", "value": "Compare <mask> and <mask> <depth>. <depth>"},
            {"from": "gpt", "value": "Region [1] is left of Region [0]; Region [5] is unknown."}]
    ex = rewrite_conversation(str(conv), "[[0, 0, 5, 5], [1, 1, 6, 6]]")
    assert ex.messages[0]["content"] == "Compare Region [0] and Region [1]. "
    assert ex.messages[1]["content"] == "Region [1] is left of Region [0]; Region [5] is unknown."
    ex = rewrite_conversation(conv, [[1, 1, 6, 6], [0, 0, 5, 5]])
    assert ex.messages[1]["content"] == "Region [1] is left of Region [0]; Region [5] is unknown."


def test_too_few_boxes_and_bad_boxes_are_clear_errors():
    with pytest.raises(ValueError, match="3 <mask> but bbox has only 2"):
        rewrite_conversation(CONV, BOXES[:2])
    with pytest.raises(ValueError, match=r"bbox\[0\] must have 4 numbers"):
        rewrite_conversation(CONV, [[1, 2, 3]] * 3)
    with pytest.raises(ValueError, match="conversations must be a list"):
        rewrite_conversation({"from": "human"}, BOXES)


def test_clamp_box():
    assert clamp_box([-10, -5, 200, 300], 100, 80) == (0, 0, 100, 80)
    assert clamp_box([50, 60, 30, 20], 100, 80) == (30, 20, 50, 60)
    assert clamp_box([40, 80, 40, 90], 100, 80) == (40, 80, 41, 80)   # 1 px wide; no room below the edge
    assert clamp_box([10.7, 5.2, 20.9, 30.99], 100, 80) == (10, 5, 20, 30)


def test_label_placement_order_and_fallback():
    box = (100, 100, 300, 300)
    got = label_positions([box] * 8, [(50, 16)] * 8, (400, 400))
    assert got[:6] == [(100, 82), (100, 302), (102, 102), (302, 100), (48, 100), (102, 282)]
    assert got[6] == (100 + 48, 82 + 48)       # all six spots taken: shifted by (6 mod 10) * 8
    assert got[7] == (100 + 56, 82 + 56)
    # Clamped to the image: a box at the top-left corner puts its label at (0, 0), the next one below.
    assert label_positions([(0, 0, 30, 30)] * 2, [(50, 16)] * 2, (60, 60)) == [(0, 0), (0, 32)]


def test_draw_regions_outline_colours_labels_and_copy():
    pixels = np.full((120, 160, 3), 128, np.uint8)
    image = Image.fromarray(pixels)
    out = np.asarray(draw_regions(image, [(20, 40, 100, 110), (110, 50, 150, 100)]))
    assert np.array_equal(np.asarray(image), pixels)     # the input is not modified
    red, green = (255, 0, 0), (0, 255, 0)
    for x in (20, 21, 22, 98, 99, 100):
        assert tuple(out[80, x]) == red                   # 3 px outline, drawn inward
    assert tuple(out[80, 23]) == (128, 128, 128) and tuple(out[80, 19]) == (128, 128, 128)
    assert tuple(out[75, 110]) == green
    # The first label sits above its box (top-outside) on a red background with white text.
    label = out[:40, 20:100].reshape(-1, 3)
    assert (label == red).all(axis=1).sum() > 50 and (label == 255).all(axis=1).sum() > 10
    assert load_font() is load_font()
    assert len(COLORS) == 8


def test_spatial_example_draws_the_unique_boxes():
    image = Image.new("RGB", (400, 300), (10, 10, 10))
    drawn, ex = spatial_example(image, CONV, BOXES)
    assert len(ex.boxes) == 2 and drawn.size == (400, 300)
    arr = np.asarray(drawn)
    assert tuple(arr[120, 10]) == (255, 0, 0) and tuple(arr[120, 300]) == (0, 255, 0)
    assert not (arr == (0, 0, 255)).all(axis=-1).any()     # no third (blue) region for the duplicate box


def test_default_font_when_dejavu_is_missing(monkeypatch):
    from PIL import ImageFont

    from theworld_jax import spatial_regions

    truetype = ImageFont.truetype

    def missing(font, *args, **kwargs):
        if font == spatial_regions.FONT_NAME:
            raise OSError("cannot open resource")
        return truetype(font, *args, **kwargs)

    monkeypatch.setattr(ImageFont, "truetype", missing)
    spatial_regions.load_font.cache_clear()
    try:
        font = spatial_regions.load_font()
        assert font.getbbox("Region [0]")[3] >= 16            # scaled to 16 px, not the 11 px bitmap font
        assert "DejaVu" not in str(getattr(font, "path", ""))
        arr = np.asarray(draw_regions(Image.new("RGB", (100, 100)), [(10, 40, 60, 90)]))
        assert tuple(arr[60, 10]) == (255, 0, 0)
    finally:
        spatial_regions.load_font.cache_clear()
