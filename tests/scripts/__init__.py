"""Scripts the tests run in a subprocess (python -m tests.scripts.<name>)."""
