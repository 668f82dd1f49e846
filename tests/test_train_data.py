"""Training data: assistant-only labels, bad rows skipped and counted, a seeded order that resumes."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from theworld_jax.modeling.fusion import IGNORE_INDEX
from theworld_jax.train import data as data_lib
from theworld_jax.train.config import DataConfig
from theworld_jax.train.formats import Sample, to_sample
from theworld_jax.tiny import DATA_DIR, build_processor

IMAGE = os.path.join(DATA_DIR, "images", "red_circle.png")


@pytest.fixture(scope="module")
def encoder():
    from theworld_jax.processing import add_world_tokens

    processor = build_processor()
    add_world_tokens(processor, 300)
    image_id = processor.tokenizer.convert_tokens_to_ids("<image_soft_token>")
    return data_lib.Encoder(processor, image_id)


def test_labels_cover_assistant_turns_only(encoder):
    sample = Sample(IMAGE, ({"role": "user", "content": "What colour?"}, {"role": "assistant", "content": "red"},
                            {"role": "user", "content": "Shape?"}, {"role": "assistant", "content": "a circle"}))
    row = encoder.encode(sample)
    tok = encoder.tokenizer
    targets = tok.decode(row["input_ids"][row["labels"] != IGNORE_INDEX])
    assert targets == "red<end_of_turn>a circle<end_of_turn>"
    assert (row["labels"][row["labels"] != IGNORE_INDEX] == row["input_ids"][row["labels"] != IGNORE_INDEX]).all()
    assert row["token_type_ids"].sum() == 4  # the image block is one bidirectional block
    everything = data_lib.Encoder(encoder.processor, encoder.image_token_id, "all").encode(sample)
    assert (everything["labels"] == row["input_ids"]).all()


def test_formats_read_as_upstream(tmp_path):
    cfg = DataConfig(image_folder=str(tmp_path), question_template="Statement: {caption}\nAnswer (only '0' or '1'):")
    llava = {"image": "a.jpg", "conversations": [{"from": "human", "value": "Write a terse caption.\n<image>"},
                                                 {"from": "gpt", "value": "a dog on grass"}]}
    s = to_sample(llava, "llava", "/data", cfg)
    assert s.image == str(tmp_path / "a.jpg")
    assert s.messages == ({"role": "user", "content": "Write a terse caption."},
                          {"role": "assistant", "content": "a dog on grass"})
    vsr = {"image_link": "http://images.cocodataset.org/train2017/000000012345.jpg",
           "caption": "The cat is left of the laptop.", "label": 1}
    s = to_sample(vsr, "vsr", "/data", cfg)
    assert s.image == str(tmp_path / "000000012345.jpg")
    assert s.messages[0]["content"] == "Statement: The cat is left of the laptop.\nAnswer (only '0' or '1'):"
    assert s.messages[1]["content"] == "1"
    s = to_sample({"image": "b.png", "text": "Describe.", "label": "a red kite"}, "text_label", "/data",
                  DataConfig())
    assert s.image == "/data/b.png" and s.messages[1] == {"role": "assistant", "content": "a red kite"}


def test_bad_rows_skipped_and_counted(encoder, tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    good = {"image": IMAGE, "messages": [{"role": "user", "content": "Colour?"},
                                         {"role": "assistant", "content": "red"}]}
    lines = [json.dumps(good), "{not json", json.dumps({**good, "image": "missing.png"}),
             json.dumps({"image": IMAGE}), json.dumps({**good, "messages": [{"role": "user", "content": "hi"}]}),
             json.dumps({**good, "messages": [{"role": "user", "content": "word " * 200},
                                              {"role": "assistant", "content": "x"}]}),
             json.dumps({**good, "image": "broken.png"}), json.dumps(good)]
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    cfg = DataConfig(format="chat", max_length=120)
    ds = data_lib.load_dataset(str(path), cfg, encoder, extra_tokens=18)
    assert len(ds.samples) == 3 and ds.num_skipped == 5
    assert ds.skipped["image file missing"] == 1 and ds.skipped["line 2 is not JSON"] == 1
    assert ds.skipped["longer than max_length (world tokens included)"] == 1
    assert ds.skipped["no assistant turn to learn from"] == 1
    loader = data_lib.Loader(ds, encoder, lambda im: {"pixel_values": np.zeros((3, 4, 4), np.float32)},
                             extra_tokens=18, pad_id=0, num_threads=2)
    batch = loader.batch(np.arange(3), 128)
    assert loader.unreadable == 1  # broken.png: a filler row without targets
    assert batch["input_ids"].shape == (3, 110)
    assert (batch["labels"][1] == IGNORE_INDEX).all() and (batch["labels"][0] != IGNORE_INDEX).any()


def test_order_is_seeded_bucketed_and_resumable():
    rng = np.random.default_rng(0)
    lengths = rng.integers(100, 1000, size=103)
    buckets = data_lib.bucket_lengths(lengths, 3, 128, 1024)
    assert all(b % 128 == 0 for b in buckets) and buckets[-1] >= lengths.max()
    a = data_lib.Sampler(lengths, 8, seed=1, buckets=buckets, window=4)
    b = data_lib.Sampler(lengths, 8, seed=1, buckets=buckets, window=4)
    assert a.steps_per_epoch == 12
    for s in (0, 5, 11, 12, 30):  # a fresh sampler gives the same rows at any step (resume mid-epoch)
        np.testing.assert_array_equal(a.step(s).rows, b.step(s).rows)
        assert a.step(s).length >= lengths[a.step(s).rows].max()
    epoch0 = np.concatenate([a.step(s).rows for s in range(12)])
    assert len(set(epoch0)) == 96
    assert not np.array_equal(epoch0, np.concatenate([a.step(s).rows for s in range(12, 24)]))
    assert a.padding_fraction() < data_lib.Sampler(lengths, 8, seed=1, buckets=[1024], window=4).padding_fraction()


def test_spatial_rgpt_rows_as_upstream_reads_them(tmp_path):
    """`<mask> <depth>` -> "Region [i]" over unique boxes, counted across turns; boxes kept to be drawn."""
    from PIL import Image

    Image.new("RGB", (400, 300)).save(tmp_path / "0a1b2c3d.jpg")
    row = {"filename": "0a1b2c3d", "conversations": [
        {"from": "human", "value": "<image>\nIs <mask> <depth> wider than <mask> <depth>?"},
        {"from": "gpt", "value": "Region [0] is wider than Region [1]."},
        {"from": "human", "value": "How tall is <mask> <depth>?"},
        {"from": "gpt", "value": "Region [0] is 1.2 meters tall."}],
        "bbox": [[10, 20, 110, 220], [300, 40, 380, 200], [300, 40, 380, 200]]}
    s = to_sample(row, "spatial_rgpt", str(tmp_path), DataConfig(draw_bboxes=True))
    assert s.image == str(tmp_path / "0a1b2c3d.jpg")
    assert [m["content"] for m in s.messages] == [
        "Is Region [0] wider than Region [1]?", "Region [0] is wider than Region [1].",
        "How tall is Region [1]?", "Region [1] is 1.2 meters tall."]
    assert len(s.boxes) == 2
    assert to_sample(row, "spatial_rgpt", str(tmp_path), DataConfig()).boxes == ()
