"""`python -m train --config configs/NAME.yaml [key=value ...]` from a checkout (theworld-train)."""

import sys

from theworld_jax.train.cli import main

sys.exit(main())
