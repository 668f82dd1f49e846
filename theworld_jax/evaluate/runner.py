"""Batched, resumable generation over a benchmark, and the optional judge pass.

Each finished row is appended to `predictions.jsonl` (flushed per batch); a rerun skips the ids already
there, so an interrupted run continues where it stopped. Rows that fail (an unreadable image, a prompt
the model cannot take) are written with a "bad" reason and counted in the report.
"""

from __future__ import annotations

import json
import os
from typing import Callable, Iterable, Sequence

import numpy as np

from theworld_jax import progress
from theworld_jax.evaluate import scoring
from theworld_jax.evaluate.data import BadImage, BadRow, Item, open_images

PREDICTIONS = "predictions.jsonl"
JUDGMENTS = "judgments.jsonl"


class JsonlLog:
    """An append-only JSONL file of {"id": ...} rows that this tool created; a torn last line (the run was
    killed mid-write) is cut off on open."""

    def __init__(self, path: str):
        self.path = path
        self.rows: dict[str, dict] = {}
        if os.path.exists(path):
            with open(path, "rb") as f:
                data = f.read()
            keep = data[:data.rfind(b"\n") + 1]
            if len(keep) != len(data):
                with open(path, "r+b") as f:
                    f.truncate(len(keep))
            for line in keep.decode("utf-8").splitlines():
                if line.strip():
                    row = json.loads(line)
                    self.rows[str(row["id"])] = row

    def append(self, rows: Iterable[dict]) -> None:
        rows = list(rows)
        if not rows:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                self.rows[str(row["id"])] = row
            f.flush()
            os.fsync(f.fileno())


class Generator:
    """Greedy answers of a TheWorld for chat prompts; with `world`, each row's first image also goes
    to the world branch (`images=`)."""

    def __init__(self, model, *, world: bool, max_new_tokens: int):
        if model.processor is None:
            raise ValueError("the model holds no processor/tokenizer files; evaluation needs them")
        if world and not model.config.enable_world:
            raise ValueError("world=True needs a model with the world branch (enable_world)")
        self.model, self.world, self.max_new_tokens = model, world, max_new_tokens

    def __call__(self, prompts: Sequence[str], images: Sequence[Sequence] | None = None) -> list[str]:
        """One answer per prompt; `images[i]`: the PIL images of row i (None: text only)."""
        conversations = []
        for i, prompt in enumerate(prompts):
            content = [{"type": "image", "image": im} for im in (images[i] if images else ())]
            conversations.append([{"role": "user", "content": content + [{"type": "text", "text": prompt}]}])
        processor = self.model.processor
        enc = processor.apply_chat_template(conversations, add_generation_prompt=True, tokenize=True,
                                            return_dict=True, return_tensors="np",
                                            processor_kwargs={"padding": True, "padding_side": "left"})
        enc = {k: enc[k] for k in ("input_ids", "attention_mask", "pixel_values", "token_type_ids") if k in enc}
        world_images = [row[0] for row in images] if self.world and images else None
        out = np.asarray(self.model.generate(**enc, images=world_images, max_new_tokens=self.max_new_tokens))
        # generate returns the prompt (with <start_of_world><end_of_world> when it injected them) + new tokens
        ids = np.asarray(enc["input_ids"])
        start = ids.shape[1] if np.array_equal(out[:, :ids.shape[1]], ids) else ids.shape[1] + 2
        return [s.strip() for s in processor.batch_decode(out[:, start:], skip_special_tokens=True)]


def _batches(items: Sequence[Item], size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _answer_rows(generate: Callable, items: Sequence[Item]) -> list[dict]:
    """Generate and score a batch; a ValueError from the model is retried row by row, and a row that
    still fails is recorded bad."""
    opened, rows = [], []
    for item in items:
        try:
            opened.append((item, open_images(item)))
        except BadImage as e:
            rows.append(bad_row(BadRow(item.id, item.task, e.reason, e.detail)))
    if not opened:
        return rows
    try:
        answers = generate([it.prompt for it, _ in opened], [ims for _, ims in opened])
    except ValueError as e:
        if len(opened) == 1:
            return rows + [bad_row(BadRow(opened[0][0].id, opened[0][0].task, "generation failed", str(e)))]
        return rows + [r for it, _ in opened for r in _answer_rows(generate, [it])]
    for (item, _), answer in zip(opened, answers):
        rows.append(prediction_row(item, answer))
    return rows


def prediction_row(item: Item, prediction: str) -> dict:
    parsed, correct, extra = scoring.score(item.kind, item.gold, item.choices, prediction)
    return {"id": item.id, "task": item.task, "kind": item.kind, "prediction": prediction, "parsed": parsed,
            "correct": correct, "answer": item.answer, **extra}


def bad_row(bad: BadRow) -> dict:
    return {"id": bad.id, "task": bad.task, "bad": bad.reason, "detail": bad.detail}


def run_predictions(generate: Callable, items: Sequence[Item], bad: Sequence[BadRow], directory: str, *,
                    batch_size: int, desc: str = "evaluate") -> JsonlLog:
    """Answer every item not yet in `directory`/predictions.jsonl, `batch_size` rows per call."""
    log = JsonlLog(os.path.join(directory, PREDICTIONS))
    log.append(bad_row(b) for b in bad if b.id not in log.rows)
    todo = [it for it in items if it.id not in log.rows]
    with progress.counter(len(items), desc=desc, unit="row") as bar:
        bar.update(len(items) - len(todo))
        for batch in _batches(todo, batch_size):
            log.append(_answer_rows(generate, batch))
            bar.update(len(batch))
    return log


def run_judge(generate: Callable, items: Sequence[Item], predictions: JsonlLog, directory: str, *,
              batch_size: int, desc: str = "judge") -> JsonlLog:
    """Ask the judge (text only) upstream's strict Yes/No question for every answered "judge" item."""
    log = JsonlLog(os.path.join(directory, JUDGMENTS))
    todo = [it for it in items if it.kind == "judge" and it.id not in log.rows
            and "prediction" in predictions.rows.get(it.id, {})]
    with progress.counter(len(todo), desc=desc, unit="row") as bar:
        for batch in _batches(todo, batch_size):
            prompts = [scoring.judge_prompt(it.question, it.answer, predictions.rows[it.id]["prediction"])
                       for it in batch]
            replies = generate(prompts, None)
            log.append({"id": it.id, "judge_reply": reply, "correct": scoring.parse_judge(reply)}
                       for it, reply in zip(batch, replies))
            bar.update(len(batch))
    return log
