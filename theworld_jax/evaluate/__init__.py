"""Benchmark evaluation (BLINK, VSR, SpatialRGPT-Bench), world vs no world: `python -m theworld_jax.evaluate`."""

__all__ = ["main"]


def main(argv=None) -> int:
    """The command line (see theworld_jax.evaluate.cli)."""
    from theworld_jax.evaluate.cli import main as run

    return run(argv)
