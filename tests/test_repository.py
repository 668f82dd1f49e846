"""The repository stands on its own (no file points at documents outside it), the package's imports run
down its layers only, and everything the package imports is declared in pyproject.toml."""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import pathlib
import re
import sys
import tomllib

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


# ---------------------------------------------------------------- the package's structure

PACKAGE = ROOT / "theworld_jax"
# The layers of theworld_jax, bottom up (module names relative to the package; a name covers its
# submodules, the longest match wins; "" is the package's own __init__). A module imports from its own
# layer and the layers below it, never from one above.
LAYERS = (
    ("foundation", ("config", "progress", "io_safety", "sharding", "sampling", "spatial_regions", "jit",
                    "attention", "interval_attention", "decode_attention")),
    ("modeling primitives", ("modeling",)),
    ("models", ("modeling.gemma3", "modeling.cosmos_vae", "modeling.theworld")),
    ("weights", ("weights",)),
    ("checkpoints and sources", ("checkpoint", "sources", "processing")),
    ("host inputs", ("inputs",)),
    ("generation", ("generation",)),
    ("public API", ("", "theworld", "cosmos_vae")),
    ("commands", ("cli", "chat", "convert", "demo", "tiny", "evaluate", "train")),
)


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> int:
    best = None
    for rank, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or (prefix and module.startswith(prefix + ".")):
                if best is None or len(prefix) > len(best[1]):
                    best = (rank, prefix)
    assert best is not None, f"theworld_jax.{module} has no layer: add it to LAYERS in {__name__}"
    return best[0]


def package_imports():
    """(module, imported theworld_jax module, line) for every import in the package, lazy ones included."""
    modules = {_module_name(p) for p in PACKAGE.rglob("*.py")}
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module_name(path)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("theworld_jax"):
                base = node.module.removeprefix("theworld_jax").lstrip(".")
                for alias in node.names:  # `from theworld_jax import TheWorld`: the public API
                    name = f"{base}.{alias.name}".lstrip(".")
                    yield module, name if name in modules else base, node.lineno
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("theworld_jax"):
                        yield module, alias.name.removeprefix("theworld_jax").lstrip("."), node.lineno


def test_no_import_runs_back_up_the_layers():
    edges = list(package_imports())
    assert len(edges) > 100  # the scan sees the package
    upward = [f"theworld_jax.{m or '__init__'}:{line} ({LAYERS[_layer(m)][0]}) imports theworld_jax.{d or '__init__'} "
              f"({LAYERS[_layer(d)][0]})" for m, d, line in edges if _layer(d) > _layer(m)]
    assert not upward, "imports from a higher layer:\n" + "\n".join(upward)


def test_generation_does_not_import_the_model_api():
    assert not [d for m, d, _ in package_imports() if m == "generation" and _layer(d) >= _layer("theworld")]


# ---------------------------------------------------------------- declared dependencies

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# Runtime dependencies the package never imports itself, and why they are declared.
INDIRECT = {"jinja2": "transformers renders chat templates with it",
            "ml_dtypes": "safetensors reads and writes bfloat16 NumPy arrays through it",
            "pyyaml": "training configs"}


def _requirement_name(spec: str) -> str:
    return re.split(r"[\s\[<>=!~;]", spec, maxsplit=1)[0].lower().replace("_", "-")


def third_party_imports():
    """{top-level module: [files]} of every import in the package that is neither stdlib nor the package."""
    found: dict[str, list[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in ("theworld_jax", "__future__"):
                    found.setdefault(top, []).append(str(path.relative_to(ROOT)))
    return found


def test_every_runtime_import_is_a_declared_dependency():
    project = PYPROJECT["project"]
    runtime = {_requirement_name(s) for s in project["dependencies"]}
    extras = project["optional-dependencies"]
    reference = {_requirement_name(s) for s in extras["reference"] + extras["test"]} - runtime
    optional = {_requirement_name(s) for name, specs in extras.items() if name not in ("reference", "test")
                for s in specs}
    distributions = importlib.metadata.packages_distributions()
    imported, problems = set(), []
    for module, files in third_party_imports().items():
        names = {_requirement_name(d) for d in distributions.get(module, [module])}
        imported |= names
        if names & reference:
            problems.append(f"{module} (in {files[0]}) is the reference side's (tests, bench), not the library's")
        elif not names & (runtime | optional):
            problems.append(f"{module} (in {files[0]}) is not a declared dependency (from {sorted(names)})")
    assert not problems, "\n".join(problems)
    unused = runtime - imported - {_requirement_name(n) for n in INDIRECT}
    assert not unused, f"declared but never imported (drop them or say why in INDIRECT): {sorted(unused)}"
    assert {"jinja2", "transformers", "jax", "flax"} <= runtime


def test_accelerator_extras_and_their_install_lines():
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert any(s.startswith("jax[cuda") for s in extras["cuda"]) and any(s.startswith("jax[tpu]") for s in extras["tpu"])
    readme = (ROOT / "README.md").read_text()
    assert re.search(r"pip install [^\n]*\.\[cuda\]", readme) and re.search(r"pip install [^\n]*\.\[tpu\]", readme)


def test_console_scripts_point_at_mains_with_help_on_every_option():
    scripts = PYPROJECT["project"]["scripts"]
    assert {"theworld-convert", "theworld-chat", "theworld-demo", "theworld-evaluate"} <= set(scripts)
    for name, target in scripts.items():
        module, function = target.split(":")
        assert callable(getattr(importlib.import_module(module), function)), name


def test_tests_and_benchmarks_import_their_helpers_as_modules():
    """tests.helpers and bench.common are packages imported by name: no sys.path edits, no bare imports."""
    helpers = {p.stem for p in (ROOT / "tests" / "helpers").glob("*.py")} | {"common"}
    hits = []
    for path in sorted((ROOT / "tests").rglob("*.py")) + sorted((ROOT / "bench").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr == "path" and getattr(node.value, "id", "") == "sys":
                hits.append(f"{path.relative_to(ROOT)}:{node.lineno}: sys.path")
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            hits += [f"{path.relative_to(ROOT)}:{node.lineno}: import {n}" for n in names if n in helpers - {"__init__"}]
    assert not hits, "\n".join(hits)
