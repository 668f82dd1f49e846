"""What every command line of the project shares: one-line errors, --debug / --quiet, argument checks.

Arguments are checked while they are parsed (argparse `type=` functions below), so a wrong path or an
out-of-range number is reported in one line before any model is loaded. `run` turns the errors of the
work itself into one line too; `--debug` shows the traceback instead.

    parser = cli.Parser(prog="theworld-x", description=...)
    parser.add_argument("--image", type=cli.existing_file, help=...)
    cli.add_common(parser)
    return cli.run(parser, work, argv)     # work(args) -> int
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from theworld_jax import progress

# transformers' advice "PyTorch was not found..." is noise here: the commands never use torch.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line: `PROG: error: MESSAGE (see PROG --help)`."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quiet", action="store_true", help="no progress bars or progress lines on stderr")
    parser.add_argument("--debug", action="store_true", help="on an error, show the full traceback")
    add_compile_cache(parser)


def add_compile_cache(parser: argparse.ArgumentParser) -> None:
    """--compile-cache DIR / --no-compile-cache; `prepare_jax(args)` applies them."""
    parser.add_argument("--compile-cache", metavar="DIR",
                        help="JAX's persistent compilation cache: a later launch with the same shapes loads its "
                             "programs instead of compiling them (default: $XDG_CACHE_HOME/theworld_jax/jax, "
                             "~/.cache/theworld_jax/jax without it)")
    parser.add_argument("--no-compile-cache", action="store_true",
                        help="neither read nor write the persistent compilation cache")


def prepare_jax(args: argparse.Namespace) -> None:
    """Before JAX starts: the process's XLA flags (theworld_jax.jit.PROCESS_XLA_FLAGS), and the persistent
    compilation cache unless --no-compile-cache (for parsers that have the flags)."""
    from theworld_jax.jit import set_process_xla_flags

    set_process_xla_flags()
    if hasattr(args, "no_compile_cache") and not args.no_compile_cache:
        from theworld_jax.jit import enable_compilation_cache

        try:
            enable_compilation_cache(args.compile_cache)
        except OSError as err:  # an unwritable cache costs compile time, not the command
            print(f"warning: no persistent compilation cache ({one_line(err)}); programs compile on every launch",
                  file=sys.stderr)


def one_line(err: BaseException) -> str:
    """An error as one line: its message (with its type unless it is a plain bad-input error)."""
    message = " ".join(str(err).split()) or type(err).__name__
    if type(err).__name__ in ("ValueError", "FileNotFoundError", "FileExistsError", "NotADirectoryError",
                              "IsADirectoryError", "PermissionError", "CheckpointError", "UnsafeTargetError"):
        return message
    return f"{type(err).__name__}: {message}"


def run(parser: argparse.ArgumentParser, work: Callable[[argparse.Namespace], int], argv=None) -> int:
    """Parse `argv`, then `work(args)`; errors print one line and give exit status 1 (Ctrl-C: 130)."""
    args = parser.parse_args(argv)
    progress.set_quiet(bool(getattr(args, "quiet", False)))
    prepare_jax(args)
    if getattr(args, "debug", False):
        return work(args)
    try:
        return work(args)
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        print(f"{parser.prog}: error: {one_line(err)}", file=sys.stderr)
        return 1


# ---------------------------------------------------------------- argparse types (checked while parsing)
def existing_file(value: str) -> str:
    if os.path.isdir(value):
        raise argparse.ArgumentTypeError(f"{value!r} is a directory, not a file")
    if not os.path.isfile(value):
        raise argparse.ArgumentTypeError(f"{value!r} does not exist")
    if not os.access(value, os.R_OK):
        raise argparse.ArgumentTypeError(f"{value!r} is not readable")
    return value


def image_file(value: str) -> str:
    """An existing file that PIL can identify as an image (its header only is read)."""
    existing_file(value)
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(value) as image:
            image.verify()
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise argparse.ArgumentTypeError(f"{value!r} is not a readable image ({one_line(err)})") from None
    return value


def existing_dir(value: str) -> str:
    if os.path.isfile(value):
        raise argparse.ArgumentTypeError(f"{value!r} is a file; pass a directory")
    if not os.path.isdir(value):
        raise argparse.ArgumentTypeError(f"directory {value!r} does not exist")
    return value


def checkpoint(value: str) -> str:
    """A local checkpoint directory, or a hub id ("org/name") that is not a local path."""
    if os.path.isdir(value):
        return value
    if os.path.exists(value):
        raise argparse.ArgumentTypeError(f"{value!r} is a file; pass the checkpoint's directory")
    if value.startswith((".", "/", "~")) or value.count("/") != 1 or os.sep != "/" and os.sep in value:
        raise argparse.ArgumentTypeError(f"checkpoint directory {value!r} does not exist")
    return value


def _number(kind, low=None, high=None, *, low_open=False, what=""):
    def parse(value: str):
        try:
            number = kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not {'an integer' if kind is int else 'a number'}") \
                from None
        if (low is not None and (number < low or low_open and number == low)) or (high is not None and number > high):
            raise argparse.ArgumentTypeError(f"{value} is out of range: expected {what}")
        return number

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


positive_int = _number(int, 1, what="an integer >= 1")
nonnegative_int = _number(int, 0, what="an integer >= 0")
positive_float = _number(float, 0.0, low_open=True, what="a number > 0")
probability = _number(float, 0.0, 1.0, low_open=True, what="a number in (0, 1]")
