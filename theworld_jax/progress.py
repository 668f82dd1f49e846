"""Progress on long work, shown on a terminal only: bars, timed steps, and a line per compilation.

Shown when stderr is a terminal, or always with THEWORLD_PROGRESS=1; never with THEWORLD_QUIET=1 or
after `set_quiet()` (the command lines' --quiet). Everything goes to stderr.

    for x in progress.bar(items, desc="encoding images"): ...
    with progress.counter(len(rows), desc="evaluate", unit="row") as done: done.update(len(batch))
    with progress.step("writing OUT"): ...          # "writing OUT ..." then "writing OUT: 3.2 s"
    progress.announce_compiles(_forward_jit, "the forward pass")   # a jitted function: one line before
                                                    # each compilation, one with its time after
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Iterable, Iterator

from tqdm.auto import tqdm

_state = {"quiet": os.environ.get("THEWORLD_QUIET", "") not in ("", "0")}
_labels: dict[str, str] = {}
_lowering: dict[str, float] = {}  # seconds spent lowering, until the backend compilation is done
_lock = threading.Lock()
_LOWERED = "/jax/core/compile/jaxpr_to_mlir_module_duration"
_COMPILED = "/jax/core/compile/backend_compile_duration"


def set_quiet(quiet: bool = True) -> None:
    """Silence (or allow again) every progress bar and line of this module."""
    _state["quiet"] = quiet


def enabled() -> bool:
    if _state["quiet"]:
        return False
    return os.environ.get("THEWORLD_PROGRESS", "") not in ("", "0") or sys.stderr.isatty()


def note(message: str) -> None:
    """One line on stderr, when progress is shown."""
    if enabled():
        print(message, file=sys.stderr, flush=True)


def bar(iterable: Iterable, *, desc: str, total: int | None = None) -> Iterable:
    """`iterable` with a tqdm bar on stderr when progress is shown (the iterable itself otherwise)."""
    if not enabled():
        return iterable
    return tqdm(iterable, desc=desc, total=total, leave=False, file=sys.stderr, dynamic_ncols=True)


class _Silent:
    """A counter that shows nothing."""

    def update(self, n: int = 1) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


def counter(total: int, *, desc: str, unit: str = "it"):
    """A bar advanced by hand (`.update(n)`, a context manager) when progress is shown; silent otherwise."""
    if not enabled():
        return _Silent()
    return tqdm(total=total, desc=desc, unit=unit, leave=False, file=sys.stderr, dynamic_ncols=True)


@contextlib.contextmanager
def step(description: str) -> Iterator[None]:
    """A line before a long step and one with its duration after it."""
    note(f"{description} ...")
    start = time.perf_counter()
    yield
    note(f"{description}: {time.perf_counter() - start:.1f} s")


def announce_compiles(fn, label: str) -> None:
    """Say "compiling LABEL ..." before each XLA compilation of the jitted `fn` and its time after it.

    `fn` is a jitted function (or its name: the wrapped Python function's __name__).
    """
    name = fn if isinstance(fn, str) else getattr(fn, "__name__", None) or getattr(fn, "__wrapped__").__name__
    with _lock:
        if not _labels:
            import jax.monitoring

            jax.monitoring.register_event_duration_secs_listener(_on_event)
        _labels[name] = label


def _on_event(event: str, duration: float, **kwargs) -> None:
    name = kwargs.get("fun_name", "")
    if name.startswith("jit(") and name.endswith(")"):
        name = name[4:-1]
    label = _labels.get(name)
    if label is None:
        return
    if event == _LOWERED:
        _lowering[name] = duration
        note(f"compiling {label} ...")
    elif event == _COMPILED:
        note(f"compiled {label} in {duration + _lowering.pop(name, 0.0):.1f} s")
