"""End to end through `python -m theworld_jax.evaluate` (main) on tiny random TheWorld checkpoints: the
world branch really gets the images, world vs no-world and two checkpoints side by side, the judge,
resume after an interruption with the same report, the plot, and argument checks before any load."""

import json
import os
import re

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from theworld_jax import TheWorld, progress
from theworld_jax.evaluate import main, runner
from theworld_jax.evaluate.data import Item
from tests.helpers.tiny_gemma import build_processor, build_tiny_gemma3, save_tiny_gemma3
from tests.helpers.tiny_vae import make_tiny_vae


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    save_tiny_gemma3(build_tiny_gemma3(), build_processor(), str(root / "gemma"), layout="hub")
    make_tiny_vae(str(root / "vae"), "cosmos_like")
    for name, seed in (("world_a", 0), ("world_b", 1)):
        TheWorld.from_pretrained(str(root / "gemma"), cosmos_model_name=str(root / "vae"), dtype=jnp.float32,
                                 vae_image_size=(32, 32), seed=seed).save_pretrained(str(root / name))
    rng = np.random.RandomState(0)
    for i in range(3):
        Image.fromarray(rng.randint(0, 256, (48, 64, 3), np.uint8)).save(root / f"im{i}.png")
    judge = {"kind": "judge", "regions": [[2, 2, 20, 20], [30, 10, 60, 40]],
             "answer": "Yes, Region [0] is to the left of Region [1]."}
    # Ordered so that every batch of two holds a long prompt: one prompt bucket, one compilation per path.
    rows = [
        {"id": "c0", "task": "Relative_Depth", "image": "im0.png", "question": "Which point is closer?",
         "choices": ["A", "B"], "answer": "(A)"},
        {"id": "j0", "task": "left_predicate", "image": "im1.png",
         "question": "Is Region [0] to the left of Region [1]?", **judge},
        {"id": "bad", "task": "vsr", "kind": "binary", "image": "missing.png", "question": "Statement: x",
         "answer": "0"},
        {"id": "c1", "task": "Relative_Depth", "image": "im1.png", "question": "Which is nearer?",
         "choices": ["the cup", "the box"], "answer": "(B)"},
        {"id": "q0", "task": "width", "kind": "quantity", "image": "im0.png", "regions": [[4, 4, 30, 40]],
         "question": "How wide is Region [0]?", "answer": "Region [0] is 1.5 meters wide."},
        {"id": "v0", "task": "vsr", "kind": "binary", "image": "im2.png",
         "question": "Statement: The cat is left of the dog.\nAnswer (only '0' or '1'):", "answer": "1"},
        {"id": "j1", "task": "above_predicate", "image": "im2.png", "question": "Is Region [1] above Region [0]?",
         **judge},
    ]
    with open(root / "data.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return root


def _run(setup, out, *extra):
    return main(["--model", str(setup / "world_a"), "--data", str(setup / "data.jsonl"), "--out", str(out),
                 "--dtype", "float32", "--batch-size", "2", "--max-new-tokens", "6", *extra])


REAL_CALL = runner.Generator.__call__


class Interrupted(RuntimeError):
    """Stands for the run being killed."""


class CountingGenerate:
    """Spy on Generator.__call__: counts rows, records whether the world got images, can interrupt."""

    def __init__(self, monkeypatch, stop_after=None):
        self.rows, self.world_images, self.calls, self.stop_after = 0, [], 0, stop_after
        spy = self

        def call(gen, prompts, images=None):
            if spy.stop_after is not None and spy.calls >= spy.stop_after:
                raise Interrupted
            spy.calls += 1
            spy.rows += len(prompts)
            spy.world_images.append(gen.world and images is not None)
            return REAL_CALL(gen, prompts, images)

        monkeypatch.setattr(runner.Generator, "__call__", call)


def _read(path):
    with open(path) as f:
        return json.load(f)


def test_cli_world_vs_no_world_with_judge_then_rerun_is_a_no_op(setup, tmp_path, monkeypatch):
    out = tmp_path / "out"
    spy = CountingGenerate(monkeypatch)
    assert _run(setup, out, "--no-world-baseline", "--judge", str(setup / "gemma")) == 0
    # 6 good rows for the world run, 6 for the no-world run, 2 judge rows for each of the two
    assert spy.rows == 16 and spy.world_images == [True] * 3 + [False] * 3 + [False] * 2
    for name, world in (("model", True), ("no_world", False)):
        r = _read(out / name / "report.json")
        assert r["world"] is world and r["overall"]["n"] == 4 and set(r["tasks"]) == {"Relative_Depth", "vsr", "width"}
        assert r["rows"] == {"total": 7, "scored": 4, "judged": 2, "bad": 1, "pending": 0,
                             "unparsed": r["rows"]["unparsed"]}
        assert r["bad_rows"] == {"missing image": 1} and r["quantitative"]["n"] == 1
        assert r["qualitative"]["judged"] == 2 and lo_le_acc_le_hi(r["overall"])
        preds = [json.loads(line) for line in open(out / name / "predictions.jsonl")]
        assert sorted(p["id"] for p in preds) == ["bad", "c0", "c1", "j0", "j1", "q0", "v0"]
        assert all(set(p) >= {"id", "task", "prediction", "parsed", "correct"} for p in preds if "bad" not in p)
    md = (out / "report.md").read_text()
    assert "| task | model | no_world | model - no_world |" in md and "Qualitative, judged apart" in md
    assert Image.open(out / "accuracy.png").format == "PNG"
    before = {n: (out / n / "predictions.jsonl").read_text() for n in ("model", "no_world")}
    report = _read(out / "model" / "report.json")
    spy.rows = 0
    assert _run(setup, out, "--no-world-baseline", "--judge", str(setup / "gemma")) == 0
    assert spy.rows == 0 and _read(out / "model" / "report.json") == report
    assert {n: (out / n / "predictions.jsonl").read_text() for n in before} == before


def lo_le_acc_le_hi(s):
    return s["ci95"][0] <= s["accuracy"] <= s["ci95"][1]


def test_resume_after_interruption_gives_the_uninterrupted_report(setup, tmp_path, monkeypatch):
    full = tmp_path / "full"
    CountingGenerate(monkeypatch)
    assert _run(setup, full, "--baseline", str(setup / "world_b")) == 0
    cut = tmp_path / "cut"
    spy = CountingGenerate(monkeypatch, stop_after=1)  # killed after the first batch of two rows
    with pytest.raises(Interrupted):  # --debug: the stand-in for a kill propagates instead of a one-line error
        _run(setup, cut, "--baseline", str(setup / "world_b"), "--debug")
    done = [json.loads(line)["id"] for line in open(cut / "model" / "predictions.jsonl")]
    assert sorted(done) == ["bad", "c0", "j0"]
    with open(cut / "model" / "predictions.jsonl", "a") as f:
        f.write('{"id": "c1", "task": "Rel')  # a torn last line, as from a kill mid-write
    spy = CountingGenerate(monkeypatch)
    assert _run(setup, cut, "--baseline", str(setup / "world_b")) == 0
    assert spy.rows == 4 + 6  # model: the four rows left; then the whole baseline
    for name in ("model", "baseline"):
        assert _read(cut / name / "report.json") == _read(full / name / "report.json")
    assert (cut / "report.md").read_text() == (full / "report.md").read_text()
    assert "| task | model | baseline | model - baseline |" in (cut / "report.md").read_text()


def test_arguments_checked_before_any_model_load(setup, tmp_path, monkeypatch):
    def no_load(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(TheWorld, "from_pretrained", no_load)
    data = str(setup / "data.jsonl")
    bad_calls = [
        (["--model", str(setup / "nope"), "--data", data, "--out", str(tmp_path / "o1")], "is not a checkpoint"),
        (["--model", str(setup / "world_a"), "--data", str(setup / "no.jsonl"), "--out", str(tmp_path / "o2")],
         "no data file"),
        (["--model", str(setup / "world_a"), "--data", data, "--out", str(tmp_path / "o3"), "--batch-size", "0"],
         "--batch-size must be a positive integer"),
        (["--model", str(setup / "world_a"), "--data", data, "--out", str(tmp_path / "o5"), "--mesh", "1,2"],
         "--mesh must be DATA,FSDP,TENSOR"),
    ]
    for argv, message in bad_calls:
        with pytest.raises(SystemExit, match=message):
            main(argv)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("not ours")
    with pytest.raises(SystemExit, match="was not made by this tool"):
        main(["--model", str(setup / "world_a"), "--data", data, "--out", str(foreign)])
    assert os.listdir(foreign) == ["keep.txt"]
    with pytest.raises(SystemExit):
        main(["--model", str(setup / "world_a"), "--data", data, "--out", str(tmp_path / "o4"), "--baseline",
              str(setup / "world_b"), "--no-world-baseline"])


def _rows(n):
    return [Item(id=str(i), task="vsr", kind="binary", question="q", prompt="p", answer="1", gold="1", images=())
            for i in range(n)]


def test_progress_over_the_rows_on_a_terminal_and_quiet_silences_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("THEWORLD_PROGRESS", "1")  # as on a terminal
    generate = lambda prompts, images: ["1"] * len(prompts)  # noqa: E731
    runner.run_predictions(generate, _rows(5), [], str(tmp_path), batch_size=2, desc="world")
    assert re.search(r"world: .*/5 \[", capsys.readouterr().err)
    progress.set_quiet(True)  # what --quiet does
    try:
        runner.run_predictions(generate, _rows(7), [], str(tmp_path), batch_size=2, desc="world")
    finally:
        progress.set_quiet(False)
    assert capsys.readouterr().err == ""


def test_errors_of_the_work_are_one_line_and_debug_shows_them(tmp_path, capsys):
    (tmp_path / "data.jsonl").write_text(json.dumps({"id": "v", "task": "vsr", "kind": "binary", "image": "x.png",
                                                     "question": "Statement: x", "answer": "1"}) + "\n")
    (tmp_path / "empty").mkdir()
    argv = ["--model", str(tmp_path / "empty"), "--data", str(tmp_path / "data.jsonl"), "--quiet"]
    assert main([*argv, "--out", str(tmp_path / "o1")]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("evaluate: error: ") and "empty" in lines[0], lines
    with pytest.raises(Exception, match="empty"):
        main([*argv, "--out", str(tmp_path / "o2"), "--debug"])
