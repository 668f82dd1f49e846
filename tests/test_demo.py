"""`python -m theworld_jax.demo`, end to end on tiny random models, as a new user runs it."""

from __future__ import annotations

import io
import os
import re

import pytest

from theworld_jax import demo


def test_the_demo_runs_every_stage_and_says_what_it_did(tmp_path):
    workdir = tmp_path / "demo"
    out = io.StringIO()
    assert demo.main(["--workdir", str(workdir)], out=out) == 0
    text = out.getvalue()
    stages = re.findall(r"^\[(\d)/(\d)\] (\w+):", text, flags=re.M)
    assert [s[2] for s in stages] == ["build", "load", "ask", "save", "export"], text
    assert len(re.findall(r"^    \(\d+\.\d s\)$", text, flags=re.M)) == len(stages), text
    assert re.search(r"^    > .+", text, flags=re.M), "no streamed answer:\n" + text
    assert "gibberish" in text
    assert "every parameter equal: True" in text
    assert "projector kept bit for bit: True" in text
    assert "theworld-demo --model google/gemma-3-4b-it" in text
    assert sorted(os.listdir(tmp_path)) == ["demo"]  # nothing written outside the working directory
    assert {"gemma3-tiny", "cosmos-vae-tiny", "theworld", "theworld-upstream"} <= set(os.listdir(workdir))
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
