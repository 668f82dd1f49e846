"""The command lines: installable entry points, --help on every option, argument errors in one line
before any model is loaded, and progress lines only on request."""

import argparse
import importlib
import os
import subprocess
import sys
import tomllib

import jax
import jax.numpy as jnp
import pytest
from PIL import Image

from theworld_jax import chat, convert, progress

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = tomllib.load(open(os.path.join(REPO, "pyproject.toml"), "rb"))["project"]["scripts"]


def _entry(spec):
    module, function = spec.split(":")
    return importlib.import_module(module), function


def test_the_commands_are_console_scripts():
    assert {"theworld-convert", "theworld-chat"} <= set(SCRIPTS)
    for name, spec in SCRIPTS.items():
        module, function = _entry(spec)
        assert callable(getattr(module, function)), name


@pytest.mark.parametrize("name", sorted(SCRIPTS) + ["python -m theworld_jax.evaluate.convert"])
def test_help_on_every_option(name, capsys, monkeypatch):
    spec = SCRIPTS.get(name, "theworld_jax.evaluate.convert:main")
    module, function = _entry(spec)
    printed = []  # the parser that answers --help, whichever function builds it
    print_help = argparse.ArgumentParser.print_help
    monkeypatch.setattr(argparse.ArgumentParser, "print_help",
                        lambda self, file=None: (printed.append(self), print_help(self, file))[1])
    with pytest.raises(SystemExit) as exit_:
        getattr(module, function)(["--help"])
    assert exit_.value.code == 0 and "usage" in capsys.readouterr().out and len(printed) == 1
    parsers, options = printed, 0
    for p in parsers:
        for action in p._actions:
            if action.choices and isinstance(action.choices, dict):  # sub-commands
                parsers.extend(action.choices.values())
            elif action.dest != "help":
                options += 1
                assert action.help, f"{name} {p.prog}: {action.option_strings or action.dest} has no help"
    assert options


def test_convert_runs_from_the_repo_root_and_as_a_module_from_anywhere(tmp_path):
    env = {**os.environ, "PYTHONPATH": REPO}
    for cmd, cwd, needle in ((["-m", "convert", "gemma3", "--help"], REPO, "--overwrite"),
                             (["-m", "theworld_jax.convert", "export", "--help"], tmp_path, "--overwrite"),
                             (["-m", "theworld_jax.chat", "--help"], tmp_path, "--max-new-tokens")):
        done = subprocess.run([sys.executable, *cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and needle in done.stdout, done.stderr


@pytest.fixture
def no_loading(monkeypatch):
    """Any model load fails the test: errors must come before it."""
    import theworld_jax

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(theworld_jax.TheWorld, "from_pretrained", refuse)
    monkeypatch.setattr(theworld_jax.CosmosVAE, "from_pretrained", refuse)


@pytest.fixture
def model_dir(tmp_path):
    path = tmp_path / "model"
    path.mkdir()
    (path / "config.json").write_text("{}")
    return path


def one_line_error(capsys, *needles):
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "error:" in lines[0] and all(n in lines[0] for n in needles), lines[0]
    return lines[0]


@pytest.mark.parametrize("extra, needles", [
    (["--image", "missing.png"], ["--image", "missing.png", "does not exist"]),
    (["--image", "notes.txt"], ["--image", "notes.txt", "not a readable image"]),
    (["--image", "."], ["--image", "is a directory"]),
    (["--max-new-tokens", "0"], ["--max-new-tokens", "out of range"]),
    (["--max-new-tokens", "ten"], ["--max-new-tokens", "not an integer"]),
    (["--top-p", "1.5"], ["--top-p", "(0, 1]"]),
    (["--temperature", "0"], ["--temperature", "> 0"]),
    (["--top-k", "-3"], ["--top-k"]),
    (["--vae-image-size", "0", "64"], ["--vae-image-size"]),
    (["--cosmos", "./no-vae"], ["--cosmos", "no-vae", "does not exist"]),
])
def test_chat_argument_errors_are_one_line_before_loading(tmp_path, monkeypatch, capsys, no_loading, model_dir,
                                                          extra, needles):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(SystemExit) as exit_:
        chat.main(["--model", str(model_dir), "--prompt", "hi", *extra])
    assert exit_.value.code == 2
    one_line_error(capsys, *needles)


def test_chat_missing_model_and_empty_prompt(tmp_path, capsys, no_loading, model_dir):
    with pytest.raises(SystemExit):
        chat.main(["--model", str(tmp_path / "nowhere"), "--prompt", "hi"])
    one_line_error(capsys, "--model", "nowhere", "does not exist")
    assert chat.main(["--model", str(model_dir), "--prompt", "  "]) == 1
    one_line_error(capsys, "--prompt is empty")


@pytest.mark.parametrize("case", ["non_empty", "is_source", "holds_source", "cwd", "parent_of_cwd", "a_file"])
def test_convert_refuses_unsafe_outputs_before_loading(tmp_path, monkeypatch, capsys, no_loading, case):
    src = tmp_path / "ckpt" / "gemma"
    src.mkdir(parents=True)
    (src / "config.json").write_text("{}")
    work = tmp_path / "w" / "work"
    work.mkdir(parents=True)
    (work / "mine.txt").write_text("precious")
    (tmp_path / "file").write_text("a file")
    monkeypatch.chdir(work)
    dst, needle = {"non_empty": (str(work), "not empty"), "is_source": (str(src), "is the source"),
                   "holds_source": (str(tmp_path / "ckpt"), "holds the source"),
                   "cwd": (".", "current directory"), "parent_of_cwd": ("..", "current directory"),
                   "a_file": (str(tmp_path / "file"), "is a file")}[case]
    if case == "non_empty":
        monkeypatch.chdir(tmp_path)
    overwrite = [] if case in ("non_empty", "a_file") else ["--overwrite"]
    before = sorted(os.walk(tmp_path))
    assert convert.main(["gemma3", "--src", str(src), "--dst", dst, *overwrite]) == 1
    one_line_error(capsys, needle)
    assert sorted(os.walk(tmp_path)) == before


def test_convert_debug_shows_the_traceback(tmp_path, no_loading):
    src = tmp_path / "gemma"
    src.mkdir()
    from theworld_jax.io_safety import UnsafeTargetError

    with pytest.raises(UnsafeTargetError):
        convert.main(["gemma3", "--src", str(src), "--dst", str(src), "--debug"])


def test_compilations_are_announced_on_request_and_quiet_silences_them(monkeypatch, capsys):
    @jax.jit
    def _announced_square(x):
        return x * x

    progress.announce_compiles(_announced_square, "the square")
    monkeypatch.setenv("THEWORLD_PROGRESS", "1")
    _announced_square(jnp.ones(3))
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "compiling the square ..." and err[1].startswith("compiled the square in ")
    _announced_square(jnp.ones(3))  # cached: nothing
    progress.set_quiet(True)
    try:
        _announced_square(jnp.ones(4))  # compiles, silently
    finally:
        progress.set_quiet(False)
    assert capsys.readouterr().err == ""
    monkeypatch.delenv("THEWORLD_PROGRESS")
    _announced_square(jnp.ones(5))  # stderr is not a terminal: nothing
    assert capsys.readouterr().err == ""


def test_image_argument_accepts_a_real_image(tmp_path):
    path = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(path)
    assert chat.parser().parse_args(["--model", str(tmp_path), "--prompt", "p", "--image", str(path)]).image


def test_a_missing_config_is_named_in_one_line(tmp_path, capsys):
    (tmp_path / "model").mkdir()
    assert chat.main(["--model", str(tmp_path / "model"), "--prompt", "hi"]) == 1
    one_line_error(capsys, "model", "config.json")
    assert convert.main(["gemma3", "--src", str(tmp_path / "model"), "--dst", str(tmp_path / "out")]) == 1
    one_line_error(capsys, "model", "config.json")
    assert not (tmp_path / "out").exists()
