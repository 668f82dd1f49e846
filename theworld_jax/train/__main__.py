"""`python -m theworld_jax.train --config configs/NAME.yaml [key=value ...]` (theworld-train)."""

import sys

from theworld_jax.train.cli import main

if __name__ == "__main__":
    sys.exit(main())
