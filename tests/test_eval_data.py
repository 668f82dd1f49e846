"""The benchmark format, bad rows, and the converters on small files in each published layout."""

import base64
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from theworld_jax.evaluate import convert
from theworld_jax.evaluate.data import load_items, open_images
from theworld_jax.evaluate.runner import Generator


def _png(color, size=(64, 48)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, format="PNG")
    return out.getvalue()


def _jsonl(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


def test_rows_bad_rows_and_image_sources(tmp_path):
    Image.new("RGB", (8, 8), "red").save(tmp_path / "a.png")
    rows = [
        {"id": "ok", "task": "t", "image": "a.png", "question": "q?", "choices": ["x", "y"], "answer": "y"},
        {"id": "b64", "image_bytes": base64.b64encode(_png("blue")).decode(), "question": "q?", "answer": "Two"},
        {"id": "nochoice", "image": "a.png", "question": "q?", "choices": "not a list", "answer": "A"},
        {"id": "onechoice", "image": "a.png", "question": "q?", "choices": ["x"], "answer": "A"},
        {"id": "noname", "image": "a.png", "question": "q?", "choices": ["x", "y"], "answer": "(C)"},
        {"id": "noimage", "image": "gone.png", "question": "q?", "answer": "x"},
        {"id": "binary", "kind": "binary", "image": "a.png", "question": "s", "answer": "yes"},
        {"id": "noq", "image": "a.png", "answer": "x"},
        {"id": "kind", "kind": "essay", "image": "a.png", "question": "q?", "answer": "x"},
        {"id": "dist", "kind": "quantity", "image": "a.png", "question": "q?", "answer": "quite far"},
    ]
    items, bad = load_items(_jsonl(tmp_path / "d.jsonl", rows))
    assert [i.id for i in items] == ["ok", "b64"]
    assert items[0].gold == 1 and items[0].prompt == "Question: q?\nA) x\nB) y\nAnswer:"
    assert items[1].kind == "open" and items[1].gold == "two" and open_images(items[1])[0].getpixel((0, 0)) == (0, 0, 255)
    assert {b.id: b.reason for b in bad} == {
        "nochoice": "no choices parsed", "onechoice": "no choices parsed", "noname": "answer names no choice",
        "noimage": "missing image", "binary": "binary answer is not 0 or 1", "noq": "no question",
        "kind": "unknown kind 'essay' (one of choice, binary, open, quantity, judge)",
        "dist": "answer has no distance or direction"}
    with pytest.raises(ValueError, match="has the id 'ok' twice"):
        load_items(_jsonl(tmp_path / "dup.jsonl", rows[:1] * 2))
    assert len(load_items(_jsonl(tmp_path / "d2.jsonl", rows), limit=3)[0]) == 2


def test_parquet_rows_with_image_bytes(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [{"id": "p0", "task": "t", "question": "q?", "choices": ["x", "y"], "answer": "(A)",
             "image": {"bytes": _png("green"), "path": "g.png"}}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    items, bad = load_items(str(tmp_path / "d.parquet"))
    assert not bad and items[0].gold == 0 and open_images(items[0])[0].getpixel((3, 3)) == (0, 128, 0)


def _blink_table(task, split, n):
    rows = []
    for i in range(n):
        row = {"idx": f"{split}_{task}_{i}", "question": f"Which point is closer ({i})?", "sub_task": task,
               "choices": ["A", "B"] if task == "Relative_Depth" else ["(A)", "(B)", "(C)"],
               "answer": "(B)" if split == "val" else "", "prompt": "ignored", "explanation": "",
               "image_1": {"bytes": _png((i * 40, 0, 0)), "path": f"{i}.png"},
               "image_2": None, "image_3": None, "image_4": None}
        if task == "Multi-view_Reasoning":
            row["image_2"] = {"bytes": _png((0, i * 40, 0)), "path": None}
        rows.append(row)
    return rows


def test_blink_converter_val_split_by_default_all_tasks(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    src = tmp_path / "BLINK"
    for task in ("Relative_Depth", "Multi-view_Reasoning"):
        (src / task).mkdir(parents=True)
        for split, n in (("val", 2), ("test", 3)):
            pq.write_table(pa.Table.from_pylist(_blink_table(task, split, n)),
                           src / task / f"{split}-00000-of-00001.parquet")
    out = tmp_path / "blink"
    assert convert.main(["blink", "--src", str(src), "--out", str(out)]) == 0
    items, bad = load_items(str(out / "data.jsonl"))
    assert not bad and len(items) == 4
    assert {i.task for i in items} == {"Relative_Depth", "Multi-view_Reasoning"}
    assert all(i.kind == "choice" and i.gold == 1 and i.meta["split"] == "val" for i in items)
    mv = [i for i in items if i.task == "Multi-view_Reasoning"][1]
    assert mv.id == "Multi-view_Reasoning/val_Multi-view_Reasoning_1" and len(mv.images) == 2
    assert [im.getpixel((0, 0)) for im in open_images(mv)] == [(40, 0, 0), (0, 40, 0)]
    with pytest.raises(ValueError, match="test answers are hidden"):
        convert.convert_blink(str(src), str(tmp_path / "t"), split="test")
    assert convert.main(["blink", "--src", str(src), "--out", str(out)]) == 2  # never writes into a used dir
    one = tmp_path / "one"
    convert.convert_blink(str(src / "Relative_Depth" / "val-00000-of-00001.parquet"), str(one))
    assert len(load_items(str(one / "data.jsonl"))[0]) == 2


def test_vsr_converter(tmp_path):
    images = tmp_path / "coco"
    images.mkdir()
    Image.new("RGB", (32, 32)).save(images / "000000000001.jpg")
    src = _jsonl(tmp_path / "test.jsonl", [
        {"image": "000000000001.jpg", "image_link": "http://images.cocodataset.org/train2017/000000000001.jpg",
         "caption": "The cat is left of the dog.", "label": 1, "relation": "left of"},
        {"image_link": "http://images.cocodataset.org/val2017/000000000002.jpg",
         "caption": "The cup is on the table.", "label": 0, "relation": "on"}])
    assert convert.main(["vsr", "--src", src, "--images", str(images), "--out", str(tmp_path / "vsr")]) == 0
    items, bad = load_items(str(tmp_path / "vsr" / "data.jsonl"))
    assert len(items) == 1 and items[0].kind == "binary" and items[0].gold == "1"
    assert items[0].prompt == "Statement: The cat is left of the dog.\nAnswer (only '0' or '1'):"
    assert [(b.id, b.reason) for b in bad] == [("1", "missing image")]


def test_spatial_rgpt_bench_converter_regions_as_in_training(tmp_path):
    (tmp_path / "imgs" / "sub").mkdir(parents=True)
    Image.new("RGB", (200, 150), (20, 20, 20)).save(tmp_path / "imgs" / "sub" / "a.jpg")
    conv = [{"from": "human", "value": "<image>\nHow wide is <mask> <depth> compared with <mask> <depth>?"},
            {"from": "gpt", "value": "Region [1] is 2.5 feet wider than Region [0]."}]
    rows = [
        {"id": "s0", "image_info": str({"file_path": "sub/a.jpg"}), "text_q": "ignored", "conversations": str(conv),
         "bbox": [[10, 20, 60, 90], [100, 30, 180, 120]], "rle": [],
         "qa_info": {"type": "quantitative", "category": "width_data"}},
        {"id": "s1", "image_info": {"file_path": "sub/a.jpg"}, "conversations": [
            {"from": "human", "value": "Is <mask> <depth> left of <mask> <depth>?"},
            {"from": "gpt", "value": "Yes, Region [0] is left of Region [1]."}],
         "bbox": "[[100, 30, 180, 120], [10, 20, 60, 90]]", "qa_info": {"type": "qualitative", "category": "left_predicate"}},
        {"id": "s2", "image_info": {"file_path": "sub/a.jpg"}, "conversations": conv, "bbox": [[1, 1, 5, 5]],
         "qa_info": {"type": "qualitative", "category": "left_predicate"}},
    ]
    src = tmp_path / "bench.json"
    src.write_text(json.dumps(rows))
    out = tmp_path / "srgpt"
    assert convert.main(["spatial-rgpt", "--src", str(src), "--images", str(tmp_path / "imgs"), "--out", str(out)]) == 0
    items, bad = load_items(str(out / "data.jsonl"))
    assert [(b.id, b.reason) for b in bad] == [("s2", "no question")]
    q, j = items
    assert (q.kind, q.task, j.kind, j.task) == ("quantity", "width_data", "judge", "left_predicate")
    assert q.question == "How wide is Region [0] compared with Region [1]?" and q.prompt == q.question
    assert q.answer == "Region [1] is 2.5 feet wider than Region [0]." and q.gold == ("metres", pytest.approx(0.762))
    assert q.regions == ((10, 20, 60, 90), (100, 30, 180, 120))
    image = np.asarray(open_images(q)[0])
    assert tuple(image[50, 10]) == (255, 0, 0) and tuple(image[70, 100]) == (0, 255, 0)


class FakeWorld:
    """Stands in for TheWorld: records what generate got; returns the prompt (with two marker tokens "y" when
    given images, as the world branch injects) and the answer "x"."""

    def __init__(self, processor, enable_world=True):
        self.processor = processor
        self.config = type("C", (), {"enable_world": enable_world})()
        self.calls = []

    def generate(self, input_ids, attention_mask=None, pixel_values=None, token_type_ids=None, images=None,
                 max_new_tokens=4):
        self.calls.append({"images": images, "pixel_values": None if pixel_values is None else pixel_values.shape,
                           "left_padded": bool((attention_mask[:, -1] == 1).all())})
        x, y = self.processor.tokenizer.convert_tokens_to_ids(["x", "y"])
        rows = len(input_ids)
        markers = np.full((rows, 2 if images is not None else 0), y)  # world markers go in after <bos>
        return np.concatenate([input_ids[:, :1], markers, input_ids[:, 1:], np.full((rows, 1), x)], axis=1)


def test_generator_gives_the_first_image_to_the_world_branch():
    from tests.helpers.tiny_gemma import build_processor

    processor = build_processor()
    model = FakeWorld(processor)
    images = [[Image.new("RGB", (40, 30), "red")], [Image.new("RGB", (40, 30), "blue"), Image.new("RGB", (9, 9))]]
    answers = Generator(model, world=True, max_new_tokens=1)(["short", "a longer question"], images)
    assert answers == ["x", "x"]
    call = model.calls[-1]
    assert call["images"] == [images[0][0], images[1][0]] and call["pixel_values"][0] == 3 and call["left_padded"]
    Generator(model, world=False, max_new_tokens=1)(["q", "q2"], images)
    assert model.calls[-1]["images"] is None
    with pytest.raises(ValueError, match="needs a model with the world branch"):
        Generator(FakeWorld(processor, enable_world=False), world=True, max_new_tokens=1)
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
