"""Converters from the published benchmark layouts into the evaluation format (OUT/data.jsonl).

    python -m theworld_jax.evaluate.convert blink --src BLINK_DIR [--split val] [--tasks T ...] --out OUT
    python -m theworld_jax.evaluate.convert vsr --src test.jsonl --images COCO_DIR --out OUT
    python -m theworld_jax.evaluate.convert spatial-rgpt --src BENCH.jsonl --images IMAGE_DIR --out OUT

BLINK: the HF repo BLINK-Benchmark/BLINK (`<Task>/<split>-*.parquet`, or a single parquet file), every
task; the val split by default (test answers are hidden). Images are written under OUT/images.
VSR: cambridgeltl/vsr_* JSONL (or parquet) rows {image | image_link, caption, label 0/1, relation}; the
prompt is upstream's training template. SpatialRGPT-Bench: a8cheng/SpatialRGPT-Bench rows {id,
image_info.file_path | image, conversations, bbox, qa_info{type, category}}; the question and answer
are rewritten as in training (`Region [i]`), the boxes are kept in "regions" and drawn when the image is
read. OUT must not exist or be empty; nothing outside it is written.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from typing import Iterable

from theworld_jax.evaluate.data import read_table
from theworld_jax.spatial_regions import parse_serialised, rewrite_conversation

DATA_FILE = "data.jsonl"
VSR_TEMPLATE = "Statement: {caption}\nAnswer (only '0' or '1'):"  # upstream's vsr_training template


def _prepare_out(out: str) -> None:
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise FileExistsError(f"--out {out!r} exists and is not an empty directory; pick a new one")
    os.makedirs(out, exist_ok=True)


def _write_rows(out: str, rows: Iterable[dict]) -> int:
    n = 0
    with open(os.path.join(out, DATA_FILE), "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def _image_bytes(value) -> tuple[bytes | None, str]:
    """(bytes, extension) of an HF Image cell ({"bytes", "path"} or bytes)."""
    if isinstance(value, dict):
        ext = os.path.splitext(value.get("path") or "")[1] or ".png"
        return value.get("bytes"), ext
    if isinstance(value, (bytes, bytearray)):
        return bytes(value), ".png"
    return None, ""


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(name))


# ------------------------------------------------------------------ BLINK
def blink_files(src: str, split: str) -> list[tuple[str, str]]:
    """(task, parquet file) pairs of a BLINK checkout (`<Task>/<split>-*.parquet` or `<Task>/<split>/*.parquet`)
    or of one parquet file (the task from its directory)."""
    if os.path.isfile(src):
        return [(os.path.basename(os.path.dirname(os.path.abspath(src))), src)]
    if not os.path.isdir(src):
        raise FileNotFoundError(f"--src {src!r} is neither a BLINK directory nor a parquet file")
    found = []
    for task in sorted(os.listdir(src)):
        files = sorted(glob.glob(os.path.join(src, task, f"{split}-*.parquet"))
                       + glob.glob(os.path.join(src, task, split, "*.parquet")))
        found += [(task, f) for f in files]
    if not found:
        raise FileNotFoundError(f"no {split!r} parquet files under {src!r} (expected <Task>/{split}-*.parquet)")
    return found


def convert_blink(src: str, out: str, split: str = "val", tasks: list[str] | None = None) -> int:
    """BLINK -> OUT/data.jsonl + OUT/images; returns the number of rows."""
    if split == "test":
        raise ValueError("BLINK's test answers are hidden; evaluate on --split val")
    files = [(t, f) for t, f in blink_files(src, split) if not tasks or t in tasks]
    if not files:
        raise ValueError(f"none of the tasks {tasks} is in {src!r}")
    _prepare_out(out)
    os.makedirs(os.path.join(out, "images"))

    def rows():
        for task, path in files:
            for i, row in enumerate(read_table(path)):
                task_name = row.get("sub_task") or task
                rid = f"{task_name}/{row.get('idx', i)}"
                images = []
                for k in range(1, 5):
                    data, ext = _image_bytes(row.get(f"image_{k}"))
                    if data:
                        name = f"images/{_safe(rid)}_{k}{ext}"
                        with open(os.path.join(out, name), "wb") as f:
                            f.write(data)
                        images.append(name)
                yield {"id": rid, "task": task_name, "kind": "choice", "question": row.get("question"),
                       "choices": list(row.get("choices") or []), "answer": row.get("answer"), "images": images,
                       "meta": {"split": split}}

    return _write_rows(out, rows())


# ------------------------------------------------------------------ VSR
def convert_vsr(src: str, images: str, out: str) -> int:
    """VSR statements with 0/1 labels -> OUT/data.jsonl (images referenced in `images`)."""
    table = read_table(src)
    _prepare_out(out)
    root = os.path.abspath(images)

    def rows():
        for i, row in enumerate(table):
            name = row.get("image") or os.path.basename(str(row.get("image_link") or ""))
            yield {"id": str(row.get("id", i)), "task": "vsr", "kind": "binary",
                   "question": VSR_TEMPLATE.format(caption=row.get("caption", "")),
                   "answer": str(row.get("label", "")), "image": os.path.join(root, name) if name else None,
                   "meta": {"relation": row.get("relation")}}

    return _write_rows(out, rows())


# ------------------------------------------------------------------ SpatialRGPT-Bench
def _as_dict(value) -> dict:
    """A dict given as a dict or a serialised string; {} for anything else."""
    try:
        value = parse_serialised(value)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def convert_spatial_rgpt(src: str, images: str | None, out: str) -> int:
    """SpatialRGPT-Bench -> OUT/data.jsonl: quantitative rows are "quantity" (scored by distance),
    qualitative rows "judge" (scored by the optional judge); task = the qa category."""
    table = read_table(src)
    _prepare_out(out)
    root = os.path.abspath(images) if images else os.path.dirname(os.path.abspath(src))

    def rows():
        for i, row in enumerate(table):
            rid = str(row.get("id", i))
            info = _as_dict(row.get("qa_info"))
            qa_type, category = info.get("type"), info.get("category") or "spatial"
            record = {"id": rid, "task": category, "kind": "quantity" if qa_type == "quantitative" else "judge",
                      "meta": {"qa_type": qa_type, "qa_category": category}}
            try:
                example = rewrite_conversation(row.get("conversations"), row.get("bbox"))
                record["question"] = example.messages[0]["content"]
                record["answer"] = example.messages[1]["content"] if len(example.messages) > 1 else ""
                record["regions"] = [list(b) for b in example.boxes]
            except (ValueError, IndexError, KeyError) as e:
                record["question"] = None  # counted as a bad row by the evaluation
                record["meta"]["error"] = str(e)
            data, ext = _image_bytes(row.get("image"))
            if data:
                name = f"images/{_safe(rid)}{ext}"
                os.makedirs(os.path.join(out, "images"), exist_ok=True)
                with open(os.path.join(out, name), "wb") as f:
                    f.write(data)
                record["image"] = name
            else:
                path = _as_dict(row.get("image_info")).get("file_path") or row.get("image")
                record["image"] = os.path.join(root, path) if isinstance(path, str) and path else None
            yield record

    return _write_rows(out, rows())


# ------------------------------------------------------------------ command line
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m theworld_jax.evaluate.convert", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="benchmark", required=True)
    b = sub.add_parser("blink", help="BLINK parquet (HF BLINK-Benchmark/BLINK)")
    b.add_argument("--src", required=True, help="a BLINK checkout (one folder of parquet files per task) or one parquet file")
    b.add_argument("--split", default="val", choices=("val", "test"), help="the split to read (default val)")
    b.add_argument("--tasks", nargs="+", help="only these tasks (default: all)")
    v = sub.add_parser("vsr", help="VSR JSONL (cambridgeltl/vsr_random, vsr_zeroshot)")
    v.add_argument("--src", required=True, help="a VSR JSONL file")
    v.add_argument("--images", required=True, help="the directory of the COCO images")
    s = sub.add_parser("spatial-rgpt", help="SpatialRGPT-Bench JSON / JSONL / parquet")
    s.add_argument("--src", required=True, help="SpatialRGPT-Bench rows: .json, .jsonl or .parquet")
    s.add_argument("--images", help="the image folder image_info.file_path is relative to")
    for q in (b, v, s):
        q.add_argument("--out", required=True, help="a new directory: OUT/data.jsonl (and OUT/images)")
    args = p.parse_args(argv)
    try:
        if args.benchmark == "blink":
            n = convert_blink(args.src, args.out, args.split, args.tasks)
        elif args.benchmark == "vsr":
            n = convert_vsr(args.src, args.images, args.out)
        else:
            n = convert_spatial_rgpt(args.src, args.images, args.out)
    except (OSError, ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{n} rows -> {os.path.join(args.out, DATA_FILE)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
