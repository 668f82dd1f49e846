"""Training data: tokenisation with assistant-turn labels, length filtering, a seeded bucketed order that
resumes mid-epoch, and a loader that decodes images in a thread pool.

Each optimizer step takes `rows_per_step` = batch_size x devices x accumulation rows, all padded to one
length (a bucket: a multiple of pad_multiple, world tokens included). The order of epoch e is a pure
function of (seed, e), so step s always sees the same rows: resuming needs only the step.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from theworld_jax.modeling.fusion import IGNORE_INDEX
from theworld_jax.train.formats import BadRow, Sample, read_rows, to_sample

END_OF_TURN = "<end_of_turn>"


# ---------------------------------------------------------------- tokenisation


def _template_messages(messages) -> list[dict]:
    """Our messages -> chat-template content lists, the image first in the first user turn."""
    out, placed = [], False
    for m in messages:
        content = [{"type": "text", "text": m["content"]}]
        if m["role"] == "user" and not placed:
            content.insert(0, {"type": "image"})
            placed = True
        out.append({"role": m["role"], "content": content})
    return out


class Encoder:
    """Sample -> input_ids, labels, token_type_ids (text only; the image block expanded as the processor
    expands it). Labels are the assistant turns (content and <end_of_turn>) or, with loss_on "all",
    every token."""

    def __init__(self, processor, image_token_id: int, loss_on: str = "assistant", *,
                 world_marker_id: int | None = None):
        """world_marker_id: <start_of_world>'s id (None without the world branch): a row whose text
        carries it keeps its markers where they are, other rows get them after BOS."""
        self.world_marker_id = world_marker_id
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_sequence = processor.full_image_sequence
        self.boi = self.tokenizer.boi_token
        self.image_token_id = image_token_id
        self.loss_on = loss_on

    def _render(self, messages, generation_prompt: bool = False) -> str:
        text = self.processor.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=generation_prompt)
        return text.replace(self.boi, self.image_sequence)

    def text_and_spans(self, sample: Sample, check_targets: bool = True) -> tuple[str, list[tuple[int, int]]]:
        messages = _template_messages(sample.messages)
        if not any(m["role"] == "user" for m in messages):
            raise BadRow("no user turn")
        try:
            text = self._render(messages)
            spans = []
            for i, m in enumerate(messages):
                if m["role"] != "assistant":
                    continue
                start = len(self._render(messages[:i], generation_prompt=True))
                end = text.find(END_OF_TURN, start)
                spans.append((start, len(text) if end < 0 else end + len(END_OF_TURN)))
        except Exception as e:  # the template rejects role orders it cannot render
            raise BadRow(f"chat template: {e}") from None
        if check_targets and self.loss_on == "assistant" and not spans:
            raise BadRow("no assistant turn to learn from")
        return text, spans

    def encode(self, sample: Sample, check_targets: bool = True) -> dict[str, np.ndarray]:
        text, spans = self.text_and_spans(sample, check_targets)
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = np.asarray(enc["input_ids"], np.int32)
        if self.loss_on == "all":
            labels = ids.copy()
        else:
            starts = np.asarray([s for s, _ in enc["offset_mapping"]])
            target = np.zeros(len(ids), bool)
            for a, b in spans:
                target |= (starts >= a) & (starts < b)
            labels = np.where(target, ids, IGNORE_INDEX).astype(np.int32)
        return {"input_ids": ids, "labels": labels,
                "token_type_ids": (ids == self.image_token_id).astype(np.int32)}

    def measure(self, samples: list[Sample]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(token lengths, target token counts, each text's first image token (its length when it has
        none), whether it carries the world marker) of `samples` (one batched tokenizer call)."""
        if not samples:
            return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, bool)
        rendered = [self.text_and_spans(s) for s in samples]
        enc = self.tokenizer([text for text, _ in rendered], add_special_tokens=False, return_offsets_mapping=True)
        lengths, targets, image_starts, markers = [], [], [], []
        for (_, spans), offsets, ids in zip(rendered, enc["offset_mapping"], enc["input_ids"]):
            ids = np.asarray(ids)
            image = np.flatnonzero(ids == self.image_token_id)
            image_starts.append(int(image[0]) if len(image) else len(ids))
            markers.append(self.world_marker_id is not None and bool((ids == self.world_marker_id).any()))
            lengths.append(len(offsets))
            if self.loss_on == "all":
                targets.append(len(offsets))
            else:
                starts = np.asarray([a for a, _ in offsets])
                targets.append(int(sum(((starts >= a) & (starts < b)).sum() for a, b in spans)))
        return (np.asarray(lengths, np.int64), np.asarray(targets, np.int64), np.asarray(image_starts, np.int64),
                np.asarray(markers, bool))


# ---------------------------------------------------------------- the dataset


@dataclasses.dataclass
class Dataset:
    """The usable samples of a file, their text lengths and target token counts, and why the others were
    skipped. image_starts: each sample's first image token in the fused row (world markers and tokens
    included; a lower bound where the text carries its own markers)."""

    samples: list[Sample]
    lengths: np.ndarray
    targets: np.ndarray
    skipped: collections.Counter
    image_starts: np.ndarray

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())


def load_dataset(path: str, data_cfg, encoder: Encoder, *, extra_tokens: int, max_rows: int | None = None
                 ) -> Dataset:
    """Read `path` in `data_cfg.format`; rows with a missing image, a bad field, or longer than
    max_length once the `extra_tokens` (world tokens and markers) are added are skipped and counted."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"data file {path!r} does not exist")
    data_dir = os.path.dirname(os.path.abspath(path))
    skipped = collections.Counter()
    samples = []
    rows = read_rows(path)
    limit = max_rows if max_rows is not None else data_cfg.num_samples
    for row in rows:
        if limit is not None and len(samples) >= limit:
            break
        try:
            sample = to_sample(row, data_cfg.format, data_dir, data_cfg)
            if not os.path.isfile(sample.image):
                raise BadRow("image file missing")
            encoder.text_and_spans(sample)
        except BadRow as e:
            skipped[_reason(str(e))] += 1
            continue
        samples.append(sample)
    lengths, targets, image_starts, markers = encoder.measure(samples)
    image_starts = image_starts + np.where(markers, 0, extra_tokens)  # markers injected after BOS otherwise
    keep = lengths + extra_tokens <= data_cfg.max_length
    if (~keep).any():
        skipped["longer than max_length (world tokens included)"] += int((~keep).sum())
    samples = [s for s, k in zip(samples, keep) if k]
    return Dataset(samples, lengths[keep], targets[keep], skipped, image_starts[keep])


def _reason(message: str) -> str:
    return message.split(" (")[0] if message.startswith("line ") else message


# ---------------------------------------------------------------- order and buckets


def bucket_lengths(fused_lengths: np.ndarray, count: int, multiple: int, max_length: int) -> list[int]:
    """`count` padded lengths (multiples of `multiple`) at quantiles of the fused lengths; the largest
    holds the longest row."""
    top = min(_round_up(int(fused_lengths.max()), multiple), _round_up(max_length, multiple))
    qs = np.quantile(fused_lengths, np.linspace(0, 1, count + 1)[1:]) if count > 1 else [top]
    return sorted({min(_round_up(int(q), multiple), top) for q in qs} | {top})


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@dataclasses.dataclass(frozen=True)
class StepBatch:
    rows: np.ndarray  # (rows_per_step,) sample indices
    length: int  # padded fused length


class Sampler:
    """The rows of every optimizer step: epoch e's order is a pure function of (seed, e)."""

    def __init__(self, fused_lengths: np.ndarray, rows_per_step: int, *, seed: int, buckets: list[int],
                 window: int):
        if len(fused_lengths) < rows_per_step:
            raise ValueError(f"the data has {len(fused_lengths)} usable rows, fewer than one step's "
                             f"{rows_per_step} (batch_size x devices x accumulation)")
        self.lengths = fused_lengths
        self.rows_per_step = rows_per_step
        self.seed = seed
        self.buckets = buckets
        self.window = window
        self.steps_per_epoch = len(fused_lengths) // rows_per_step
        self._cache: dict[int, list[StepBatch]] = {}

    def epoch(self, e: int) -> list[StepBatch]:
        if e not in self._cache:
            rng = np.random.default_rng([self.seed, e])
            order = rng.permutation(len(self.lengths))[: self.steps_per_epoch * self.rows_per_step]
            chunk = self.window * self.rows_per_step
            steps = []
            for start in range(0, len(order), chunk):
                part = order[start:start + chunk]
                part = part[np.argsort(self.lengths[part], kind="stable")]
                for i in range(0, len(part), self.rows_per_step):
                    rows = part[i:i + self.rows_per_step]
                    need = int(self.lengths[rows].max())
                    steps.append(StepBatch(rows, next(b for b in self.buckets if b >= need)))
            self._cache = {e: [steps[i] for i in rng.permutation(len(steps))]}
        return self._cache[e]

    def step(self, s: int) -> StepBatch:
        e, i = divmod(s, self.steps_per_epoch)
        return self.epoch(e)[i]

    def padding_fraction(self, epoch: int = 0) -> float:
        steps = self.epoch(epoch)
        padded = sum(b.length * len(b.rows) for b in steps)
        return 1.0 - sum(int(self.lengths[b.rows].sum()) for b in steps) / padded


# ---------------------------------------------------------------- loading


class Loader:
    """Builds a process's share of a step's rows: tokenised, images decoded (a thread pool), padded.

    A row whose image cannot be read becomes a filler row (a blank image, no targets) and is counted.
    """

    def __init__(self, dataset: Dataset, encoder: Encoder, prepare_image, *, extra_tokens: int,
                 pad_id: int, num_threads: int, draw_boxes=None):
        self.dataset = dataset
        self.encoder = encoder
        self.prepare_image = prepare_image  # PIL image -> {"pixel_values": ..., "image": ...}
        self.extra_tokens = extra_tokens
        self.pad_id = pad_id
        self.draw_boxes = draw_boxes
        self.pool = ThreadPoolExecutor(max(1, num_threads))
        self.unreadable = 0
        self._filler = None

    def _row(self, index: int) -> dict:
        from PIL import Image

        if index < 0:
            return self._blank()
        sample = self.dataset.samples[index]
        try:
            with Image.open(sample.image) as im:
                image = im.convert("RGB")
            if sample.boxes and self.draw_boxes is not None:
                image = self.draw_boxes(image, sample.boxes)
        except Exception:  # noqa: BLE001 - any unreadable image is a skipped row
            return self.filler()
        return {**self.encoder.encode(sample), **self.prepare_image(image)}

    def filler(self) -> dict:
        """The stand-in of an unreadable row (counted)."""
        self.unreadable += 1
        return self._blank()

    def _blank(self) -> dict:
        """A row that contributes nothing: a black image, no target token (also pads eval batches)."""
        from PIL import Image

        if self._filler is None:
            sample = Sample("", ({"role": "user", "content": ""},))
            row = self.encoder.encode(sample, check_targets=False)
            row["labels"] = np.full_like(row["labels"], IGNORE_INDEX)
            self._filler = {**row, **self.prepare_image(Image.new("RGB", (8, 8)))}
        return self._filler

    def batch(self, rows: np.ndarray, fused_length: int) -> dict[str, np.ndarray]:
        """Rows -> padded arrays (n, L), L = fused_length - extra_tokens (the world tokens and markers)."""
        prepared = list(self.pool.map(self._row, [int(r) for r in rows]))
        length = fused_length - self.extra_tokens
        n = len(prepared)
        out = {"input_ids": np.full((n, length), self.pad_id, np.int32),
               "attention_mask": np.zeros((n, length), np.int32),
               "token_type_ids": np.zeros((n, length), np.int32),
               "labels": np.full((n, length), IGNORE_INDEX, np.int32)}
        for i, row in enumerate(prepared):
            k = len(row["input_ids"])
            out["input_ids"][i, :k] = row["input_ids"]
            out["attention_mask"][i, :k] = 1
            out["token_type_ids"][i, :k] = row["token_type_ids"]
            out["labels"][i, :k] = row["labels"]
        if "pixel_values" in prepared[0]:
            out["pixel_values"] = np.stack([row["pixel_values"] for row in prepared])
        if "image" in prepared[0]:
            out["images"] = [row["image"] for row in prepared]
        return out


def steps_for(epochs: float, steps_per_epoch: int) -> int:
    return max(1, math.ceil(epochs * steps_per_epoch))
