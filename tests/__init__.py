"""Tests of theworld-jax (a package, so that tests.helpers is importable from tests, scripts and bench)."""
