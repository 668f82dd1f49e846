"""`python -m convert` (the repository root's shim of theworld_jax.convert, installed as theworld-convert)."""
