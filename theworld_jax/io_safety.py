"""Writing outputs without losing anything: the rules every writer of the project follows, in one place.

- A target that exists (a file, or a directory that is not empty) is replaced only when the caller asks
  (`overwrite=True`, `--overwrite`). Never, even then: a source the output is made from, a directory
  holding a source, the current directory or a directory holding it.
- The new output is written into a temporary sibling and is complete before the old target is moved
  aside; the old one is removed only once the new one is in place.
- Temporary siblings are named `.NAME.tmp-HOST-PID-RANDOM` (and `.NAME.old-HOST-PID-RANDOM` for the old
  target while it is swapped out). They are removed on any error, on SIGTERM / SIGHUP and on Ctrl-C.
  Those left by a killed process (no process PID on this host any more) are removed by the next write
  into the same parent directory; an `.old` whose target is missing is put back instead. Nothing else
  is ever touched.
- Files and directories are created with the user's umask.

Writers: `theworld-convert` (`python -m convert`), `TheWorld.save_pretrained`. A command that writes
a directory at once (evaluation's --out) validates it with `check_target` while it parses its arguments
and writes it through `atomic_directory`; one that fills a directory over time (the training
launcher's output_dir) calls `make_output_dir`.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import socket
import threading
from collections.abc import Iterable, Iterator

_HOST = re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname())[:40] or "host"
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<host>[A-Za-z0-9_]+)-(?P<pid>[0-9]+)-[0-9a-f]{8}$")
_SIGNALS = tuple(getattr(signal, s) for s in ("SIGTERM", "SIGHUP") if hasattr(signal, s))


class UnsafeTargetError(ValueError):
    """An output target that may not be written: it exists (without overwrite), or is a protected path."""


class Interrupted(SystemExit):
    """Raised in the main thread on SIGTERM / SIGHUP while an atomic write is in progress."""

    def __init__(self, signum: int):
        super().__init__(128 + signum)
        self.signum = signum


def _inside(path: str, directory: str) -> bool:
    """Whether `path` is `directory` or lies under it (both real, absolute paths)."""
    return os.path.commonpath([path, directory]) == directory


def check_target(target: str, *, overwrite: bool = False, sources: Iterable[str | None] = (),
                 what: str = "output") -> str:
    """The absolute path of `target` if the rules allow writing it, else an UnsafeTargetError (one line).

    `sources`: the paths the output is made from (None and hub ids that are not local paths are
    ignored). Call this before any long work, then write through `atomic_directory`.
    """
    path = os.path.abspath(os.path.expanduser(target))
    cwd = None
    real = os.path.realpath(path)
    for source in sources:
        if source is None or not os.path.exists(source):
            continue
        src = os.path.realpath(source)
        if src == real:
            raise UnsafeTargetError(f"{what} {target!r} is the source {source!r}; choose another {what}")
        if _inside(src, real):
            raise UnsafeTargetError(
                f"{what} {target!r} holds the source {source!r} and is never replaced; choose another {what}")
    with contextlib.suppress(FileNotFoundError):
        cwd = os.path.realpath(os.getcwd())
    if cwd is not None and _inside(cwd, real):
        raise UnsafeTargetError(
            f"{what} {target!r} is the current directory or holds it, and is never replaced; name a new "
            "directory instead")
    if os.path.lexists(path) and not overwrite:
        if os.path.islink(path) or not os.path.isdir(path):
            raise UnsafeTargetError(f"{what} {target!r} exists and is a file; pass --overwrite (overwrite=True) "
                                    "to replace it, or choose another path")
        if os.listdir(path):
            raise UnsafeTargetError(f"{what} {target!r} exists and is not empty; pass --overwrite "
                                    "(overwrite=True) to replace it, or choose another path")
    return path


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: str) -> None:
    if os.path.islink(path) or not os.path.isdir(path):
        os.unlink(path)
    else:
        shutil.rmtree(path)


def clean_leftovers(parent: str) -> list[str]:
    """Remove the temporary siblings in `parent` left by dead processes of this host; returns their paths.

    An `.old` entry whose target is missing is renamed back to the target (a swap cut short).
    """
    handled = []
    try:
        names = os.listdir(parent)
    except FileNotFoundError:
        return handled
    for name in names:
        m = _LEFTOVER.match(name)
        if m is None or m["host"] != _HOST or _alive(int(m["pid"])):
            continue
        path = os.path.join(parent, name)
        target = os.path.join(parent, m["name"])
        with contextlib.suppress(FileNotFoundError):
            if m["kind"] == "old" and not os.path.lexists(target):
                os.rename(path, target)
            else:
                _remove(path)
            handled.append(path)
    return handled


def _sibling(target: str, kind: str) -> str:
    parent, name = os.path.split(target)
    return os.path.join(parent, f".{name}.{kind}-{_HOST}-{os.getpid()}-{secrets.token_hex(4)}")


@contextlib.contextmanager
def _signals_raise() -> Iterator[None]:
    """In the main thread, make SIGTERM / SIGHUP (when not handled already) raise `Interrupted`."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Interrupted(signum)

    previous = {s: signal.getsignal(s) for s in _SIGNALS}
    for s, h in previous.items():
        if h == signal.SIG_DFL:
            signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in previous.items():
            if h == signal.SIG_DFL:
                signal.signal(s, h)


@contextlib.contextmanager
def _signals_blocked() -> Iterator[None]:
    """Hold SIGINT / SIGTERM / SIGHUP back for a few renames, so that a swap is never cut in half."""
    blocked = {signal.SIGINT, *_SIGNALS}
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _swap_in(tmp: str, target: str) -> None:
    """Put the complete `tmp` at `target`; an existing target is moved aside first, removed last."""
    backup = None
    with _signals_blocked():
        if os.path.lexists(target):
            backup = _sibling(target, "old")
            os.rename(target, backup)
        try:
            os.rename(tmp, target)
        except BaseException:
            if backup is not None:
                os.rename(backup, target)
            raise
    if backup is not None:
        _remove(backup)


@contextlib.contextmanager
def atomic_directory(target: str, *, overwrite: bool = False, sources: Iterable[str | None] = (),
                     what: str = "output") -> Iterator[str]:
    """Yield a new empty temporary sibling of `target` to fill; on success it becomes `target`.

    The rules of this module apply (`check_target`, checked again before the swap). On any error, on
    SIGTERM / SIGHUP and on Ctrl-C the temporary directory is removed and `target` is left as it was.
    """
    sources = tuple(sources)
    path = check_target(target, overwrite=overwrite, sources=sources, what=what)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    clean_leftovers(parent)
    tmp = _sibling(path, "tmp")
    os.mkdir(tmp)
    try:
        with _signals_raise():
            yield tmp
            check_target(target, overwrite=overwrite, sources=sources, what=what)
            _swap_in(tmp, path)
    except BaseException:
        with _signals_blocked():
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def make_output_dir(directory: str, *, resume: bool = False, sources: Iterable[str | None] = (),
                    what: str = "output_dir") -> str:
    """Create `directory` for output written into it over time (a training run); returns its absolute path.

    An existing non-empty directory is accepted only with `resume=True` (the caller recognised it as
    its own earlier run); the protected paths of `check_target` are refused in any case. To replace a
    whole earlier run, write the new one through `atomic_directory(..., overwrite=True)` instead.
    """
    path = check_target(directory, overwrite=resume, sources=sources, what=what)
    if os.path.lexists(path) and not os.path.isdir(path):
        raise UnsafeTargetError(f"{what} {directory!r} exists and is a file")
    clean_leftovers(os.path.dirname(path))
    os.makedirs(path, exist_ok=True)
    return path
