"""The training launcher: `theworld-train --config configs/NAME.yaml [key=value ...]`.

config (YAML + dotted overrides), formats and data (reading, labels, bucketing, loading), model (the
adapter to TheWorld), step (optimizer, compiled step), outputs (checkpoints, metrics), loop (the run),
distributed (jax.distributed from the environment), cli (the command line).
"""

__all__ = ["main"]


def main(argv=None) -> int:
    from theworld_jax.train.cli import main as _main

    return _main(argv)
