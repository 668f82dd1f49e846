"""JAX's persistent compilation cache, as the command lines turn it on: a second process is served by it."""

import os
import subprocess
import sys

_CACHED_RUN = """
import sys, jax, jax.numpy as jnp
from theworld_jax.jit import enable_compilation_cache
hits = []
jax.monitoring.register_event_listener(lambda event, **kw: hits.append(event) if "cache_hits" in event else None)
print("DIR", enable_compilation_cache(sys.argv[1]))
jax.jit(lambda x: jnp.tanh(x) @ x.T)(jnp.ones((8, 8))).block_until_ready()
print("HITS", len(hits))
"""


def test_persistent_compilation_cache_serves_a_second_process(tmp_path):
    cache = str(tmp_path / "jit-cache")
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_COMPILATION_CACHE_DIR",)}
    runs = [subprocess.run([sys.executable, "-c", _CACHED_RUN, cache], capture_output=True, text=True, env=env,
                           cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), timeout=120)
            for _ in range(2)]
    for run in runs:
        assert run.returncode == 0, run.stderr[-2000:]
    assert f"DIR {cache}" in runs[0].stdout and os.listdir(cache)
    hits = [int(run.stdout.split("HITS")[1]) for run in runs]
    assert hits[0] == 0 and hits[1] >= 1, hits  # every program of the first process, the matmul's included


def test_an_unusable_cache_dir_is_a_warning_and_no_cache_flag_leaves_jax_alone(tmp_path, capsys, monkeypatch):
    import jax

    from theworld_jax import cli

    monkeypatch.setenv("XLA_FLAGS", "")
    parser = cli.Parser(prog="x")
    cli.add_compile_cache(parser)
    before = jax.config.jax_compilation_cache_dir
    blocker = tmp_path / "file"
    blocker.write_text("")
    cli.prepare_jax(parser.parse_args(["--compile-cache", str(blocker / "cache")]))
    assert "warning: no persistent compilation cache" in capsys.readouterr().err
    cli.prepare_jax(parser.parse_args(["--no-compile-cache"]))
    assert jax.config.jax_compilation_cache_dir == before


def test_process_xla_flags_are_added_and_the_users_win(monkeypatch):
    from theworld_jax.jit import PROCESS_XLA_FLAGS, set_process_xla_flags

    name = PROCESS_XLA_FLAGS[0].split("=")[0]
    monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/x")
    assert set_process_xla_flags().split() == ["--xla_dump_to=/tmp/x", *PROCESS_XLA_FLAGS]
    assert set_process_xla_flags().split() == ["--xla_dump_to=/tmp/x", *PROCESS_XLA_FLAGS]  # once
    monkeypatch.setenv("XLA_FLAGS", f"{name}=true")
    assert set_process_xla_flags() == f"{name}=true"
    monkeypatch.delenv("XLA_FLAGS")
    assert set_process_xla_flags() == " ".join(PROCESS_XLA_FLAGS)
