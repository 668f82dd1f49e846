"""Answer parsing and scoring: multiple choice, binary statements, open answers, SpatialRGPT distances.

Every parser returns None for a reply it cannot read; an unparsed reply is counted wrong.
"""

from __future__ import annotations

import re
import string
import unicodedata
from typing import Sequence

LETTERS = string.ascii_uppercase
THRESHOLDS = (0.10, 0.25, 0.50)  # SpatialRGPT success: relative error within 10 / 25 / 50 %
SUCCESS_AT = 0.25  # the threshold that makes a quantitative answer "correct" (the SpatialRGPT paper's)

# Upstream's strict Yes/No judge question (kasohrab/theworld, evaluation/spatial_metrics.py, judge_mode
# "strict"); a reply whose first word is "yes" marks the prediction correct.
JUDGE_QUESTION = """You are evaluating spatial reasoning answers. Compare the prediction to the ground truth.

Question: {question}

Ground Truth Answer: {ground_truth}

Predicted Answer: {prediction}

Does the prediction contain the correct answer from the ground truth?
The prediction MUST include the key information from the ground truth to be marked correct.
Be strict - if the prediction contradicts or lacks the ground truth answer, mark it as incorrect.

Respond with ONLY "Yes" or "No" (one word)."""


def normalize(text: str) -> str:
    """Lowercase, NFKC, punctuation and the articles a/an/the removed, whitespace collapsed."""
    text = unicodedata.normalize("NFKC", str(text)).lower()
    text = "".join(" " if unicodedata.category(c).startswith("P") or c in "`*^$+<=>|~" else c for c in text)
    return " ".join(w for w in text.split() if w not in ("a", "an", "the"))


# ------------------------------------------------------------------ multiple choice
def choice_index(answer: str, choices: Sequence[str]) -> int | None:
    """The index of a gold answer given as a letter ("A", "(A)", "A.") or as an option's text."""
    text = str(answer).strip()
    m = re.fullmatch(r"\(?\s*([A-Za-z])\s*[\).:]?", text)
    if m and LETTERS.index(m.group(1).upper()) < len(choices):
        return LETTERS.index(m.group(1).upper())
    wanted = normalize(text)
    hits = [i for i, c in enumerate(choices) if normalize(c) == wanted]
    return hits[0] if len(hits) == 1 else None


def _letter(letter: str, n: int) -> int | None:
    i = LETTERS.find(letter.upper())
    return i if 0 <= i < n else None


def _restated_option(reply: str, choices: Sequence[str]) -> int | None:
    """The one option whose text the reply is or contains (as whole words); nested matches keep the longest."""
    said = normalize(reply)
    options = [normalize(c) for c in choices]
    exact = [i for i, o in enumerate(options) if o and o == said]
    if len(exact) == 1:
        return exact[0]
    found = [i for i, o in enumerate(options) if o and f" {o} " in f" {said} "]
    found = [i for i in found if not any(j != i and options[i] != options[j] and options[i] in options[j]
                                         for j in found)]
    return found[0] if len({options[i] for i in found}) == 1 else None


def parse_choice(reply: str, choices: Sequence[str]) -> int | None:
    """The option index a reply names, or None. In order: the reply is a letter ("B", "(b)", "B.", "**B**");
    it starts with "(B)", "B)", "B." or "B:"; it says "answer is B" / "answer: (B)" / "option B"; it is or
    contains one option's text; it starts with a capital option letter and a space ("B the cat")."""
    n = len(choices)
    text = str(reply).strip()
    core = text.strip(" \t\r\n*_`'\".:;()[]")
    if len(core) == 1 and core.isalpha():
        return _letter(core, n)
    m = re.match(r"^[\s*_`'\"]*(?:\(([A-Za-z])\)|([A-Za-z])[\).:\]])", text)
    if m:
        return _letter(m.group(1) or m.group(2), n)
    m = re.search(r"\b(?i:answer|option|choice)\s*(?i:is|:)?\s*[*_`'\"]*(?:\(([A-Za-z])\)|([A-Z])(?![A-Za-z]))",
                  text)
    if m:
        return _letter(m.group(1) or m.group(2), n)
    restated = _restated_option(text, choices)
    if restated is not None:
        return restated
    m = re.match(r"^([A-Z])\s", text)
    return _letter(m.group(1), n) if m else None


# ------------------------------------------------------------------ binary statements (VSR)
def parse_binary(reply: str) -> str | None:
    """Upstream's VSR rules: the reply is "0"/"1"; a leading digit; "answer is d"; the first standalone
    0/1; else the words false/no/incorrect/wrong (-> "0") or true/yes/correct/right (-> "1") anywhere,
    as substrings. None when none applies (upstream counted that as "0"; here it is wrong)."""
    text = str(reply).strip().lower()
    if text in ("0", "1"):
        return text
    for pattern in (r"^[^\w]*([01])(?!\d)", r"answer\s*(?:is|:)?\s*([01])(?!\d)", r"(?<![\d.])([01])(?![\d.])"):
        m = re.search(pattern, text)
        if m:
            return m.group(1)
    if any(w in text for w in ("false", "no", "incorrect", "wrong")):
        return "0"
    if any(w in text for w in ("true", "yes", "correct", "right")):
        return "1"
    return None


# ------------------------------------------------------------------ SpatialRGPT quantities
_NUMBER = r"(\d+(?:,\d{3})*(?:\.\d+)?|\.\d+|" + "|".join((
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
    "fifteen", "twenty", "thirty", "fifty", "hundred", "half")) + r")"
_WORDS = {"zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8,
          "nine": 9, "ten": 10, "eleven": 11, "twelve": 12, "fifteen": 15, "twenty": 20, "thirty": 30,
          "fifty": 50, "hundred": 100, "half": 0.5}
# Unit spellings (regex) -> metres per unit; the conversions of the SpatialRGPT judge prompt.
UNITS = (
    (r"kilomet(?:er|re)s?|km", 1000.0),
    (r"centimet(?:er|re)s?|cms?", 0.01),
    (r"millimet(?:er|re)s?|mm", 0.001),
    (r"met(?:er|re)s?|m", 1.0),
    (r"inch(?:es)?|in(?![a-z]|\s+[a-z])|\"|''|″", 0.0254),
    (r"f(?:oo|ee)t|ft|'|′", 0.3048),
    (r"yards?|yds?", 0.9144),
)
_UNIT = "|".join(f"(?:{u})" for u, _ in UNITS)
_QUANTITY = re.compile(rf"(?<![\w.]){_NUMBER}\s*(?:-\s*)?({_UNIT})(?![a-z])", re.IGNORECASE)
_RANGE = re.compile(rf"(?<![\w.]){_NUMBER}\s*(?:-|–|to)\s*{_NUMBER}\s*({_UNIT})(?![a-z])", re.IGNORECASE)
_CLOCK = re.compile(r"(?<![\w.])(\d{1,2}|" + "|".join(list(_WORDS)[1:13]) + r")\s*o[’']?\s*clock", re.IGNORECASE)


def _number(text: str) -> float:
    text = text.lower().replace(",", "")
    return float(_WORDS[text]) if text in _WORDS else float(text)


def _metres_per(unit: str) -> float:
    for spelling, factor in UNITS:
        if re.fullmatch(spelling, unit, re.IGNORECASE):
            return factor
    raise ValueError(f"unknown unit {unit!r}")


def parse_metres(text: str) -> float | None:
    """The first distance in `text` in metres, or None. "Region [i]" numbers are ignored; "5 feet 3 inches"
    and 5'3" add up; a range "1-2 m" gives its middle; a number without a unit is not a distance."""
    text = re.sub(r"Region\s*\[\d+\]", " ", str(text))
    ranged = _RANGE.search(text)
    first = _QUANTITY.search(text)
    if ranged and (first is None or ranged.start() <= first.start()):
        return (_number(ranged.group(1)) + _number(ranged.group(2))) / 2 * _metres_per(ranged.group(3))
    if first is None:
        return None
    metres = _number(first.group(1)) * _metres_per(first.group(2))
    if _metres_per(first.group(2)) == 0.3048:  # feet, maybe followed by inches
        rest = _QUANTITY.match(text[first.end():].lstrip(" ,and"))
        if rest and _metres_per(rest.group(2)) == 0.0254:
            metres += _number(rest.group(1)) * 0.0254
    return metres


def parse_clock(text: str) -> int | None:
    """The first "N o'clock" direction (1..12) in `text`, or None."""
    m = _CLOCK.search(str(text))
    if m is None:
        return None
    hour = int(_number(m.group(1)))
    return hour if 1 <= hour <= 12 else None


def parse_quantity(text: str) -> tuple[str, float] | None:
    """("clock", hour) for a clock direction, ("metres", value) for a distance, else None."""
    hour = parse_clock(text)
    if hour is not None:
        return "clock", float(hour)
    metres = parse_metres(text)
    return None if metres is None else ("metres", metres)


def quantity_error(prediction: str, gold: tuple[str, float]) -> float | None:
    """Relative error |pred - gold| / gold, or None when the prediction gives no quantity of the gold's
    kind. Clock directions: 0 for the same hour, else 1 (beyond every threshold)."""
    got = parse_quantity(prediction)
    if got is None or got[0] != gold[0]:
        return None
    if gold[0] == "clock":
        return 0.0 if got[1] == gold[1] else 1.0
    return abs(got[1] - gold[1]) / gold[1]


# ------------------------------------------------------------------ judge
def judge_prompt(question: str, ground_truth: str, prediction: str) -> str:
    return JUDGE_QUESTION.format(question=question, ground_truth=ground_truth, prediction=prediction)


def parse_judge(reply: str) -> bool:
    """True when the judge's reply starts with "yes" (upstream's strict rule: anything else is No)."""
    return str(reply).strip().lower().startswith("yes")


# ------------------------------------------------------------------ one row
def score(kind: str, gold, choices: Sequence[str], prediction: str) -> tuple[object, bool | None, dict]:
    """(parsed answer, correct, extra fields) of a prediction. correct is None for "judge" rows (the
    judge decides later); extra holds "relative_error" for "quantity" rows."""
    if kind == "choice":
        index = parse_choice(prediction, choices)
        return (None if index is None else LETTERS[index]), index == gold, {}
    if kind == "binary":
        parsed = parse_binary(prediction)
        return parsed, parsed == gold, {}
    if kind == "open":
        parsed = normalize(prediction)
        return parsed, parsed == gold, {}
    if kind == "quantity":
        got = parse_quantity(prediction)
        error = quantity_error(prediction, gold)
        parsed = None if got is None else got[1]
        return parsed, error is not None and error <= SUCCESS_AT, {"relative_error": error, "unit": gold[0]}
    if kind == "judge":
        return None, None, {}
    raise ValueError(f"unknown kind {kind!r}")
