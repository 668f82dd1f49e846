"""Answer parsing and scoring, reports and the plot, on predictions whose scores are worked out by hand."""

import io
import math

import pytest
from PIL import Image

from theworld_jax.evaluate import scoring
from theworld_jax.evaluate.data import Item
from theworld_jax.evaluate.plot import accuracy_png
from theworld_jax.evaluate.report import build_report, markdown, summary, wilson

CHOICES = ["left", "right", "upper left"]


@pytest.mark.parametrize("reply,expected", [
    ("B", 1), ("b", 1), ("(b)", 1), ("B.", 1), ("B)", 1), ("B:", 1), ("**B**", 1), (" (C) upper left", 2),
    ("A) left", 0), ("The answer is (C).", 2), ("Answer: B", 1), ("The Answer Is (c)", 2), ("option C", 2),
    ("left", 0), ("Left.", 0), ("The cat is on the right side.", 1), ("It is upper left of it", 2),
    ("B the dog", 1), ("I do not know", None), ("The answer is a cat", None), ("E", None), ("(D)", None),
    ("left or right", None),
])
def test_parse_choice(reply, expected):
    assert scoring.parse_choice(reply, CHOICES) == expected


@pytest.mark.parametrize("gold,expected", [("(A)", 0), ("B", 1), ("c.", 2), ("Upper left", 2), ("(E)", None),
                                           ("down", None)])
def test_gold_choice(gold, expected):
    assert scoring.choice_index(gold, CHOICES) == expected


@pytest.mark.parametrize("reply,expected", [
    ("1", "1"), ("0", "0"), (" 1.", "1"), ("0 because", "0"), ("The answer is 1", "1"), ("I think 1 here", "1"),
    ("False", "0"), ("Yes it is", "1"), ("That is incorrect", "0"), ("correct", "1"), ("hmm", None),
])
def test_parse_binary_upstream_rules(reply, expected):
    assert scoring.parse_binary(reply) == expected


@pytest.mark.parametrize("text,expected", [
    ("Region [0] is 1.2 meters tall.", ("metres", 1.2)), ("It is 120 cm wide", ("metres", 1.2)),
    ("about 5 feet 3 inches", ("metres", 5 * 0.3048 + 3 * 0.0254)), ("5'3\"", ("metres", 5 * 0.3048 + 3 * 0.0254)),
    ("3 ft", ("metres", 3 * 0.3048)), ("The distance is 2-4 m", ("metres", 3.0)), ("roughly two meters", ("metres", 2.0)),
    ("1,200 mm", ("metres", 1.2)), ("It is 10 inches.", ("metres", 0.254)), ("4.5m apart", ("metres", 4.5)),
    ("Region [1] is at 3 o'clock from Region [0]", ("clock", 3.0)), ("3 in the box", None), ("7 minutes", None),
    ("Region [2] is tall", None), ("0.8 kilometers", ("metres", 800.0)),
])
def test_parse_quantity(text, expected):
    got = scoring.parse_quantity(text)
    assert (got is None) == (expected is None)
    if got is not None:
        assert got[0] == expected[0] and got[1] == pytest.approx(expected[1])


def test_score_every_kind():
    assert scoring.score("choice", 1, CHOICES, "(B)") == ("B", True, {})
    assert scoring.score("choice", 1, CHOICES, "no idea") == (None, False, {})
    assert scoring.score("binary", "0", (), "False.") == ("0", True, {})
    assert scoring.score("binary", "0", (), "maybe") == (None, False, {})  # upstream counted this as "0"
    assert scoring.score("open", scoring.normalize("Two dogs"), (), "two dogs.") == ("two dogs", True, {})
    gold = scoring.parse_quantity("Region [0] is 2 meters wide.")
    parsed, ok, extra = scoring.score("quantity", gold, (), "About 240 cm.")
    assert parsed == pytest.approx(2.4) and ok and extra["relative_error"] == pytest.approx(0.2)
    parsed, ok, extra = scoring.score("quantity", gold, (), "about 6 feet")  # 1.8288 m: 8.6 % off
    assert ok and extra["relative_error"] == pytest.approx(abs(6 * 0.3048 - 2) / 2)
    assert scoring.score("quantity", gold, (), "3 m")[1] is False            # 50 % off
    assert scoring.score("quantity", gold, (), "very wide") == (None, False, {"relative_error": None, "unit": "metres"})
    clock = scoring.parse_quantity("at 10 o'clock")
    assert scoring.score("quantity", clock, (), "ten o'clock")[1] and not scoring.score("quantity", clock, (), "2 o'clock")[1]
    assert scoring.score("judge", None, (), "anything") == (None, None, {})


def test_judge_prompt_and_parse():
    prompt = scoring.judge_prompt("Is Region [0] left?", "Yes, it is.", "No.")
    assert "Ground Truth Answer: Yes, it is." in prompt and prompt.endswith('Respond with ONLY "Yes" or "No" (one word).')
    assert scoring.parse_judge(" Yes.") and scoring.parse_judge("yes") and not scoring.parse_judge("No")
    assert not scoring.parse_judge("The answer is yes")


def test_wilson_interval():
    lo, hi = wilson(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433, abs=1e-4)
    assert wilson(0, 0) == [0.0, 1.0]
    assert summary([True, False, True, True]) == {"accuracy": 0.75, "n": 4, "ci95": wilson(3, 4)}


def _item(i, task, kind, gold=None):
    return Item(id=str(i), task=task, kind=kind, question="q", prompt="q", answer="a", gold=gold, images=("x",))


def test_report_by_hand_and_markdown_and_plot():
    items = [_item(0, "depth", "choice", 0), _item(1, "depth", "choice", 1), _item(2, "vsr", "binary", "1"),
             _item(3, "dist", "quantity", ("metres", 2.0)), _item(4, "dist", "quantity", ("metres", 1.0)),
             _item(5, "qual", "judge"), _item(6, "qual", "judge")]
    preds = {
        "0": {"id": "0", "correct": True, "parsed": "A"}, "1": {"id": "1", "correct": False, "parsed": None},
        "2": {"id": "2", "correct": True, "parsed": "1"},
        "3": {"id": "3", "correct": True, "parsed": 2.2, "relative_error": 0.1, "unit": "metres"},
        "4": {"id": "4", "correct": False, "parsed": None, "relative_error": None, "unit": "metres"},
        "5": {"id": "5", "prediction": "yes", "correct": None, "parsed": None},
        "6": {"id": "6", "prediction": "no", "correct": None, "parsed": None},
        "7": {"id": "7", "task": "depth", "bad": "missing image"},
    }
    r = build_report(items, preds, {"5": {"id": "5", "correct": True}}, info={"model": "m", "world": True})
    assert r["overall"] == summary([True, False, True, True, False])
    assert r["tasks"]["depth"] == summary([True, False]) and r["tasks"]["dist"] == summary([True, False])
    assert r["rows"] == {"total": 8, "scored": 5, "judged": 1, "bad": 1, "pending": 0, "unparsed": 2}
    assert r["bad_rows"] == {"missing image": 1}
    q = r["quantitative"]
    assert q["n"] == 2 and q["success"] == {"10%": 0.5, "25%": 0.5, "50%": 0.5} and q["unparseable"] == 1
    assert math.isclose(q["mean_relative_error"], 0.1)
    assert r["qualitative"]["n"] == 2 and r["qualitative"]["judged"] == 1
    assert r["qualitative"]["overall"]["accuracy"] == 1.0
    other = build_report(items, {k: dict(v, correct=True) if "bad" not in v else v for k, v in preds.items()},
                         info={"model": "b", "world": False})
    md = markdown({"model": r, "no_world": other})
    assert "| task | model | no_world | model - no_world |" in md
    assert "| **overall** | 60.0 [" in md and "| -40.0 |" in md
    png = accuracy_png({"model": r, "no_world": other})
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG" and image.size[0] == 900 and image.size[1] > 100
