"""The repository stands on its own: no file points at documents that live outside it."""

from __future__ import annotations

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
SUFFIXES = {".py", ".md", ".toml", ".yaml", ".yml", ".json", ".txt", ".cfg"}
# Spelled in pieces so that this file does not match itself.
OUTSIDE = re.compile("|".join(re.escape(s) for s in (
    "DESIGN" + ".md", "DESIGN" + " section", "notes" + "/", "../" + "shared", "reference" + "-semantics",
    "/work" + "/")))


def repository_files():
    for path in ROOT.rglob("*"):
        parts = path.relative_to(ROOT).parts
        if any(p.startswith(".") or p in ("__pycache__", "build") or p.endswith(".egg-info") for p in parts):
            continue
        if path.is_file() and path.suffix in SUFFIXES:
            yield path


def test_no_reference_to_files_outside_the_repository():
    hits = [f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
            for path in repository_files()
            for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1) if OUTSIDE.search(line)]
    assert not hits, "references to documents outside the repository:\n" + "\n".join(hits)


def test_the_design_document_is_linked_from_the_readme():
    assert (ROOT / "docs" / "design.md").is_file()
    assert "docs/design.md" in (ROOT / "README.md").read_text()
