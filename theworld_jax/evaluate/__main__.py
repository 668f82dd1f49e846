import sys

from theworld_jax.evaluate import main

sys.exit(main())
