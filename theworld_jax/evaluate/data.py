"""The benchmark format: rows read from JSONL / JSON / Parquet, checked into `Item`s, and their images.

A row: {"id", "task", "question", "image" | "images" | "image_bytes", "choices"?, "answer", "kind"?,
"regions"?, "prompt"?, "meta"?}. See the README's "Evaluation" section. A row that cannot be scored
(no question, no image file, no choices parsed, a gold answer that names no choice...) becomes a
`BadRow` with the reason, counted in the report and skipped.
"""

from __future__ import annotations

import base64
import io
import json
import os
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from theworld_jax.evaluate import scoring
from theworld_jax.spatial_regions import draw_regions, parse_listlike, unique_boxes

KINDS = ("choice", "binary", "open", "quantity", "judge")
PARQUET_HINT = "reading Parquet needs pyarrow: pip install 'theworld-jax[eval]'"


@dataclass(frozen=True)
class Item:
    """One scorable row. `gold`: the choice index (choice), "0"/"1" (binary), the normalised answer (open),
    (unit kind, value) (quantity), None (judge). `images`: file paths or raw bytes; the first one also
    feeds the world branch. `regions`: boxes drawn on the first image as SpatialRGPT `Region [i]`."""

    id: str
    task: str
    kind: str
    question: str
    prompt: str
    answer: str
    gold: Any
    images: tuple
    choices: tuple[str, ...] = ()
    regions: tuple = ()
    meta: dict = field(default_factory=dict)


@dataclass(frozen=True)
class BadRow:
    """A row that is counted and skipped: `reason` is short (it groups rows in the report)."""

    id: str
    task: str
    reason: str
    detail: str = ""


class BadImage(ValueError):
    """An image that cannot be read: args (reason, detail); the row is counted bad."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason, detail)
        self.reason, self.detail = reason, detail


def read_table(path: str) -> list[dict]:
    """Rows of a .jsonl, .json (a list) or .parquet file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no data file at {path!r}")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as e:
            raise ImportError(PARQUET_HINT) from e
        return pq.read_table(path).to_pylist()
    with open(path, encoding="utf-8") as f:
        if ext == ".json":
            rows = json.load(f)
            if not isinstance(rows, list):
                raise ValueError(f"{path!r} must hold a JSON list of rows, got {type(rows).__name__}")
            return rows
        if ext != ".jsonl":
            raise ValueError(f"{path!r}: the data file must end in .jsonl, .json or .parquet")
        rows = []
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path!r} line {n} is not JSON: {e}") from e
        return rows


def prompt_for(kind: str, question: str, choices: tuple[str, ...]) -> str:
    """The text of the user turn: multiple choice in upstream's BLINK layout, else the question as is."""
    if kind != "choice":
        return question
    lines = [f"Question: {question}"] + [f"{scoring.LETTERS[i]}) {c}" for i, c in enumerate(choices)]
    return "\n".join(lines) + "\nAnswer:"


def _image_refs(row: dict, root: str) -> tuple:
    """The row's images as resolved file paths or bytes; raises BadImage naming a missing file."""
    if row.get("images") is not None:
        refs = list(row["images"])
    elif row.get("image") is not None:
        refs = [row["image"]]
    elif row.get("image_bytes") is not None:
        refs = [row["image_bytes"] if isinstance(row["image_bytes"], bytes) else {"bytes": row["image_bytes"]}]
    else:
        raise BadImage("no image")
    out = []
    for ref in refs:
        if isinstance(ref, dict):
            ref = ref.get("bytes") or ref.get("path")
            if isinstance(ref, str) and not os.path.splitext(ref)[1]:  # base64 text, not a path
                ref = base64.b64decode(ref)
        if isinstance(ref, (bytes, bytearray)):
            out.append(bytes(ref))
        elif isinstance(ref, str) and ref:
            path = ref if os.path.isabs(ref) else os.path.join(root, ref)
            if not os.path.isfile(path):
                raise BadImage("missing image", path)
            out.append(path)
        else:
            raise BadImage("no image")
    if not out:
        raise BadImage("no image")
    return tuple(out)


def _kind(row: dict) -> str:
    kind = row.get("kind") or ("choice" if row.get("choices") is not None else "open")
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r} (one of {', '.join(KINDS)})")
    return kind


def to_item(row: dict, index: int, root: str) -> Item | BadRow:
    """A checked Item, or a BadRow saying why the row cannot be scored."""
    rid = str(row.get("id", index))
    task = str(row.get("task") or "default")
    try:
        kind = _kind(row)
        question = row.get("question")
        if not isinstance(question, str) or not question.strip():
            raise ValueError("no question")
        answer = row.get("answer")
        if kind != "judge" and (answer is None or str(answer).strip() == ""):
            raise ValueError("no answer")
        answer = "" if answer is None else str(answer)
        choices: tuple[str, ...] = ()
        gold: Any = None
        if kind == "choice":
            try:
                choices = tuple(str(c) for c in parse_listlike(row.get("choices"), "choices"))
            except ValueError:
                choices = ()
            if len(choices) < 2 or len(choices) > len(scoring.LETTERS):
                raise ValueError("no choices parsed")
            gold = scoring.choice_index(answer, choices)
            if gold is None:
                raise ValueError("answer names no choice")
        elif kind == "binary":
            gold = answer.strip()
            if gold not in ("0", "1"):
                raise ValueError("binary answer is not 0 or 1")
        elif kind == "open":
            gold = scoring.normalize(answer)
        elif kind == "quantity":
            gold = scoring.parse_quantity(answer)
            if gold is None or (gold[0] == "metres" and gold[1] <= 0):
                raise ValueError("answer has no distance or direction")
        regions = tuple(unique_boxes(parse_listlike(row.get("regions"), "regions"))[0])
        images = _image_refs(row, root)
        prompt = row.get("prompt") or prompt_for(kind, question, choices)
        meta = row.get("meta") if isinstance(row.get("meta"), dict) else {}
    except BadImage as e:
        return BadRow(rid, task, e.reason, e.detail)
    except (ValueError, TypeError) as e:
        return BadRow(rid, task, str(e))
    return Item(rid, task, kind, question, prompt, answer, gold, images, choices, regions, meta)


def load_items(path: str, limit: int | None = None) -> tuple[list[Item], list[BadRow]]:
    """Items and bad rows of a data file (its first `limit` rows); relative image paths are relative to
    the file's directory. Raises ValueError on duplicate ids."""
    root = os.path.dirname(os.path.abspath(path))
    items, bad, seen = [], [], set()
    for i, row in enumerate(read_table(path)[:limit]):
        if not isinstance(row, dict):
            raise ValueError(f"{path!r} row {i} is not an object")
        got = to_item(row, i, root)
        if got.id in seen:
            raise ValueError(f"{path!r} has the id {got.id!r} twice; ids must be unique")
        seen.add(got.id)
        (items if isinstance(got, Item) else bad).append(got)
    return items, bad


def open_images(item: Item) -> list[Image.Image]:
    """The item's images as RGB PIL images, regions drawn on the first; raises BadImage."""
    out = []
    for ref in item.images:
        try:
            image = Image.open(io.BytesIO(ref) if isinstance(ref, bytes) else ref)
            image.load()
        except (OSError, ValueError) as e:
            raise BadImage("unreadable image", str(e)) from e
        out.append(image.convert("RGB"))
    if item.regions:
        out[0] = draw_regions(out[0], item.regions)
    return out
