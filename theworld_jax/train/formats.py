"""The training data formats upstream's users have on disk, each read as upstream reads it.

Every format becomes a `Sample`: one image path and chat messages ({"role", "content": str}), the
image going first into the first user turn (upstream's collator: user [image, text] then the rest).

- chat:          {"image", "messages": [{"role", "content"}, ...]}
- text_label:    {"image", "text", "label"}                         -> user text, assistant label
- llava:         {"image", "conversations": [{"from", "value"}]}    -> last human value (without <image>),
                                                                       last gpt value (LLaVA-CC3M chat.json)
- vsr:           {"image_link" or "image", "caption", "label"}      -> question_template.format(caption=...),
                                                                       label "1"/"0"; image_folder/basename
- spatial_rgpt:  {"filename", "conversations", "bbox"}              -> `<mask>` -> "Region [i]", boxes drawn
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")


class BadRow(ValueError):
    """A row that cannot be trained on; its message is the reason (counted, never fatal)."""


@dataclasses.dataclass(frozen=True)
class Sample:
    image: str
    messages: tuple[dict, ...]
    boxes: tuple[tuple[float, float, float, float], ...] = ()


def read_rows(path: str) -> list:
    """A JSON array or JSONL file -> rows; an unparsable JSONL line becomes a BadRow entry."""
    with open(path) as f:
        text = f.read()
    if text.lstrip().startswith("["):
        return json.loads(text)
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            rows.append(BadRow(f"line {number} is not JSON ({e.msg})"))
    return rows


def _field(row: dict, name: str, kind=str):
    value = row.get(name)
    if not isinstance(value, kind):
        raise BadRow(f"missing or malformed field {name!r}")
    return value


def _image_path(name: str, data_dir: str, image_folder: str | None) -> str:
    return os.path.join(image_folder or data_dir, name)


def _chat(row, data_dir, cfg) -> Sample:
    messages = _field(row, "messages", list)
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in (
                "system", "user", "assistant"):
            raise BadRow("messages must be {role: system|user|assistant, content: str} objects")
    return Sample(_image_path(_field(row, "image"), data_dir, cfg.image_folder), tuple(messages))


def _text_label(row, data_dir, cfg) -> Sample:
    label = row.get("label")
    if label is None:
        raise BadRow("missing field 'label'")
    return Sample(_image_path(_field(row, "image"), data_dir, cfg.image_folder),
                  ({"role": "user", "content": _field(row, "text")}, {"role": "assistant", "content": str(label)}))


def _llava(row, data_dir, cfg) -> Sample:
    turns = _field(row, "conversations", list)
    human = [t.get("value") for t in turns if isinstance(t, dict) and t.get("from") == "human"]
    gpt = [t.get("value") for t in turns if isinstance(t, dict) and t.get("from") == "gpt"]
    if not human or not gpt or not isinstance(human[-1], str) or not isinstance(gpt[-1], str):
        raise BadRow("conversations need a human and a gpt turn")
    text = human[-1].replace("<image>", "").strip()
    return Sample(_image_path(_field(row, "image"), data_dir, cfg.image_folder),
                  ({"role": "user", "content": text}, {"role": "assistant", "content": gpt[-1]}))


def _vsr(row, data_dir, cfg) -> Sample:
    link = row.get("image_link") or row.get("image")
    if not isinstance(link, str):
        raise BadRow("missing field 'image_link' (or 'image')")
    if "label" not in row:
        raise BadRow("missing field 'label'")
    text = cfg.question_template.format(caption=_field(row, "caption"))
    return Sample(_image_path(os.path.basename(link), data_dir, cfg.image_folder),
                  ({"role": "user", "content": text}, {"role": "assistant", "content": str(int(row["label"]))}))


def _spatial_rgpt(row, data_dir, cfg) -> Sample:
    from theworld_jax.spatial_regions import rewrite_conversation

    stem = _field(row, "filename")
    folder = cfg.image_folder or data_dir
    image = _images_by_stem(folder).get(stem)
    if image is None:
        raise BadRow("image file missing")
    try:
        example = rewrite_conversation(row.get("conversations"), row.get("bbox"))
    except ValueError as e:
        raise BadRow(str(e)) from None
    return Sample(image, example.messages, example.boxes if cfg.draw_bboxes else ())


@functools.lru_cache(maxsize=8)
def _images_by_stem(folder: str) -> dict[str, str]:
    """{file stem: path} of the jpg/jpeg/png/webp files in `folder` (listed once, as upstream scans)."""
    if not os.path.isdir(folder):
        return {}
    return {os.path.splitext(name)[0]: os.path.join(folder, name) for name in sorted(os.listdir(folder))
            if name.lower().endswith(IMAGE_EXTENSIONS)}


READERS = {"chat": _chat, "text_label": _text_label, "llava": _llava, "vsr": _vsr, "spatial_rgpt": _spatial_rgpt}


def to_sample(row, fmt: str, data_dir: str, cfg) -> Sample:
    """One raw row -> a Sample, or BadRow naming what is wrong with it."""
    if isinstance(row, BadRow):
        raise row
    if not isinstance(row, dict):
        raise BadRow("row is not a JSON object")
    return READERS[fmt](row, data_dir, cfg)
