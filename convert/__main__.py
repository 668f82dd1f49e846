"""`python -m convert` from the repository root: the same command as `theworld-convert`."""
from theworld_jax.convert import main

if __name__ == "__main__":
    raise SystemExit(main())
