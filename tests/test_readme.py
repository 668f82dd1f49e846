"""Every ```python snippet of the README runs as written, on tiny random models.

The snippets run in order in one namespace (like a notebook), in a temporary working directory. They
name their inputs in upper-case assignments at the start of a line (`GEMMA = "google/gemma-3-4b-it"`);
this test replaces the value of each name in `substitutions` (tiny models built with theworld_jax.tiny,
the sample image, a small VAE input size) and leaves every other line as the README has it. A snippet
that still names a hub model or a /path/to placeholder after substitution fails the test.
"""

from __future__ import annotations

import contextlib
import io
import os
import pathlib
import re

import pytest

from theworld_jax import tiny
from theworld_jax.demo import SAMPLE_IMAGE

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
ASSIGNMENT = re.compile(r"^([A-Z][A-Z0-9_]*) = (.+?)(\s+#.*)?$")


def python_snippets(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.M | re.S)


def substitute(snippet: str, values: dict[str, object]) -> str:
    def line(text: str) -> str:
        m = ASSIGNMENT.match(text)
        return f"{m.group(1)} = {values[m.group(1)]!r}" if m and m.group(1) in values else text
    return "\n".join(line(t) for t in snippet.splitlines())


@pytest.fixture(scope="module")
def substitutions(tmp_path_factory):
    root = tmp_path_factory.mktemp("readme-models")
    return {"GEMMA": tiny.write_tiny_gemma3(str(root / "gemma3-tiny")),
            "COSMOS": tiny.write_tiny_vae(str(root / "cosmos-vae-tiny")),
            "IMAGE": str(SAMPLE_IMAGE), "VAE_IMAGE_SIZE": tiny.VAE_IMAGE_SIZE}


def test_the_readme_has_python_snippets_with_substitutable_inputs():
    snippets = python_snippets(README.read_text())
    assert len(snippets) >= 2
    names = {m.group(1) for s in snippets for t in s.splitlines() if (m := ASSIGNMENT.match(t))}
    assert {"GEMMA", "COSMOS", "IMAGE"} <= names, names


def test_every_readme_python_snippet_runs(substitutions, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "readme"}
    for i, snippet in enumerate(python_snippets(README.read_text())):
        code = substitute(snippet, substitutions)
        leftover = re.findall(r"google/gemma|nvidia/Cosmos|/path/to", code)
        assert not leftover, f"snippet {i} still names {leftover} after substitution:\n{code}"
        with contextlib.redirect_stdout(io.StringIO()):
            exec(compile(code, f"README.md python snippet {i}", "exec"), namespace)
    assert os.getcwd() == str(tmp_path)
