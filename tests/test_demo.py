"""`python -m theworld_jax.demo`, end to end on tiny random models, as a new user runs it."""

from __future__ import annotations

import io
import logging
import os
import re

import pytest
from transformers.utils import logging as transformers_logging

from theworld_jax import demo


@pytest.fixture
def transformers_messages(caplog, recwarn):
    """What transformers logs (at its default verbosity, warnings) and warns during the test."""
    logger, level = logging.getLogger("transformers"), transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_warning()
    logger.addHandler(caplog.handler)  # transformers' loggers do not propagate to the root logger
    yield lambda: [r.getMessage() for r in caplog.records] + [str(w.message) for w in recwarn]
    logger.removeHandler(caplog.handler)
    transformers_logging.set_verbosity(level)


def test_the_demo_runs_every_stage_and_says_what_it_did(tmp_path, transformers_messages):
    workdir = tmp_path / "demo"
    out = io.StringIO()
    assert demo.main(["--workdir", str(workdir)], out=out) == 0
    text = out.getvalue()
    spurious = [m for m in transformers_messages() if "You are using a model of type" in m]
    assert not spurious  # the demo loads a save_pretrained directory too
    stages = re.findall(r"^\[(\d)/(\d)\] (\w+):", text, flags=re.M)
    assert [s[2] for s in stages] == ["build", "load", "ask", "save", "train", "export"], text
    assert len(re.findall(r"^    \(\d+\.\d s\)$", text, flags=re.M)) == len(stages), text
    assert re.search(r"^    > .+", text, flags=re.M), "no streamed answer:\n" + text
    assert "gibberish" in text
    assert "every parameter equal: True" in text
    losses = [float(x) for x in re.findall(r"^    step \d+/\d+ loss (\d+\.\d+)", text, flags=re.M)]
    assert len(losses) >= 3 and losses[-1] < 0.7 * losses[0], text  # the loss printed falling
    assert "the projector moved: True" in text
    assert "projector kept bit for bit: True" in text
    assert "theworld-demo --model google/gemma-3-4b-it" in text
    assert sorted(os.listdir(tmp_path)) == ["demo"]  # nothing written outside the working directory
    assert {"gemma3-tiny", "cosmos-vae-tiny", "theworld", "train-run", "theworld-upstream"} <= set(os.listdir(workdir))
    assert "final" in os.listdir(workdir / "train-run")
    upstream = workdir / "theworld-upstream"
    assert sorted(os.listdir(upstream)) == ["config.json", "model.safetensors"]


def test_the_demo_writes_only_into_a_new_or_empty_directory(tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(SystemExit, match="not an empty directory"):
        demo.main(["--workdir", str(tmp_path)], out=io.StringIO())
    assert os.listdir(tmp_path) == ["mine.txt"] and (tmp_path / "mine.txt").read_text() == "keep me"


def test_model_and_cosmos_go_together():
    with pytest.raises(SystemExit):
        demo.parse_args(["--model", "some/dir"])


@pytest.mark.parametrize("argv, needle", [(["--image", "no-such.png"], "--image: 'no-such.png' does not exist"),
                                          (["--max-new-tokens", "0"], "--max-new-tokens: 0 is out of range"),
                                          (["--model", "./nowhere", "--cosmos", "./nowhere"], "--model")])
def test_arguments_are_checked_in_one_line_before_anything_is_built(tmp_path, monkeypatch, capsys, argv, needle):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        demo.main(argv, out=io.StringIO())
    assert exit_.value.code == 2 and os.listdir(tmp_path) == []
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], lines
