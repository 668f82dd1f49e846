"""The command line: `theworld-train --config FILE key=value ...` (also `python -m theworld_jax.train`, and
`python -m train` from a checkout). Errors are one line (`--debug` shows the traceback)."""

from __future__ import annotations

import argparse
import dataclasses

from theworld_jax import cli


def parser() -> argparse.ArgumentParser:
    from theworld_jax.train.config import describe

    p = cli.Parser(prog="theworld-train", formatter_class=argparse.RawDescriptionHelpFormatter,
                   description="Train TheWorld: a YAML config (configs/*.yaml) with dotted key=value overrides.",
                   epilog="config keys (YAML sections, or dotted on the command line: optimizer.learning_rate=5e-5), "
                          "with their defaults:\n" + describe())
    p.add_argument("--config", type=cli.existing_file, help="a YAML training config (configs/NAME.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted config keys, e.g. output_dir=runs/a steps=200 model.freeze_gemma_language=false")
    cli.add_common(p)
    return p


def _train(args) -> int:
    from theworld_jax.train import distributed
    from theworld_jax.train.config import load_config

    config = load_config(args.config, args.overrides)
    if args.quiet:
        config = dataclasses.replace(config, progress_bar=False)
    distributed.initialize(config.distributed)
    from theworld_jax.train.loop import train

    train(config)
    return 0


def main(argv=None) -> int:
    return cli.run(parser(), _train, argv)
