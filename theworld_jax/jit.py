"""The one way this library jits a module: `jit_module(fn, module, ...)(*args, **kwargs)`.

`fn(module, *args, **kwargs)` is compiled with `jax.jit` (`static_argnames` / `donate_argnames` name
`fn`'s own parameters). The module is split once per (module, fn, options); each call reads the live
values of its variables, so a call costs a flat list of arrays and a jitted dispatch (not an NNX graph
traversal, which is what `nnx.jit` pays per call) and sees parameter updates made in place. The module's
structure must not change after the first call. Compiled programs are shared by all modules of one
structure. Under an outer trace (a module holding tracers) the call is inlined as a nested jit.

`shared_call(module, *args, **static)` calls a module through one nested jitted program per module
structure: a decoder's identical layers are traced and lowered once instead of once each.

`enable_compilation_cache()` turns on JAX's persistent compilation cache (the command lines do, unless
--no-compile-cache): a second launch with the same shapes loads its programs instead of compiling them.
"""

from __future__ import annotations

import functools
import os
import weakref
from typing import Any, Callable

import jax
from flax import nnx

from theworld_jax import progress

_BOUND: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def jit_module(fn: Callable[..., Any], module: nnx.Module, *, static_argnames: tuple[str, ...] = (),
               donate_argnames: tuple[str, ...] = ()) -> Callable[..., Any]:
    """`functools.partial(fn, module)`, jitted (cached per module, fn and options)."""
    key = (fn, tuple(static_argnames), tuple(donate_argnames))
    bound = _BOUND.setdefault(module, {})
    if key not in bound:
        bound[key] = _Bound(module, *key)
    return bound[key]


class _Bound:
    def __init__(self, module: nnx.Module, fn, static_argnames: tuple, donate_argnames: tuple):
        graphdef, state = nnx.split(module)
        paths = tuple(path for path, _ in nnx.to_flat_state(state))
        live = {tuple(p): v for p, v in nnx.iter_graph(module) if isinstance(v, nnx.Variable)}
        self._variables = [live[p] for p in paths]
        # Array values are passed raw: the merged module inside the program applies any read hook itself
        # (reading through get_value here applied it twice), and get_value's copy of each value's pytree
        # and its array-ref checks cost 6.9 ms per call for the 883 variables of Gemma 3 4B with its
        # vision tower against 0.8 ms (this host), on every prefill and every decode call.
        self._raw = all(isinstance(v.get_raw_value(), jax.Array) for v in self._variables)
        self._jitted = _jit(graphdef, paths, fn, static_argnames, donate_argnames)

    def __call__(self, *args, **kwargs):
        if self._raw:
            values = [v.get_raw_value() for v in self._variables]
        else:
            values = [v.get_value() for v in self._variables]
        return self._jitted(values, *args, **kwargs)


@functools.lru_cache(maxsize=64)
def _jit(graphdef, paths: tuple, fn, static_argnames: tuple, donate_argnames: tuple):
    """One jitted function per (module structure, fn, options)."""

    @functools.wraps(fn)  # fn's name in compile logs and profiles; fn's signature for the argnames
    def run(values, *args, **kwargs):
        return fn(nnx.merge(graphdef, nnx.from_flat_state(list(zip(paths, values)))), *args, **kwargs)

    progress.announce_compiles(fn.__name__, fn.__name__.strip("_").replace("_", " "))
    return jax.jit(run, static_argnames=static_argnames, donate_argnames=donate_argnames)


def shared_call(module: nnx.Module, *args, remat_policy: Callable | None = None, **static):
    """`module(*args, **static)`, through one jitted program per (module structure, `static` keyword
    arguments, `remat_policy`): modules of one structure (Gemma 3's 29 sliding-window layers) are traced
    and lowered once and called once each. XLA inlines the calls before it optimises, so the compiled
    program does the work of direct calls (the same steady-state times on an H200,
    bench/results/compile_gpu.md); what shrinks is the tracing and lowering, which every first call
    pays, a warm compilation cache included. `args` are pytrees of arrays; `static` values must be hashable.
    remat_policy: a `jax.checkpoint` policy to rematerialise the module's activations in the backward
    pass with, or None for none."""
    graphdef, state = nnx.split(module)
    program = _shared_program(graphdef, type(module).__name__, remat_policy, tuple(sorted(static.items())))
    return program(state, *args)


@functools.lru_cache(maxsize=256)
def _shared_program(graphdef, name: str, remat_policy, static: tuple):
    def call(state, *args):
        return nnx.merge(graphdef, state)(*args, **dict(static))

    call.__name__ = name  # the program's name in traces and compile logs
    return jax.jit(call if remat_policy is None else jax.checkpoint(call, policy=remat_policy))


def default_compilation_cache_dir() -> str:
    """$THEWORLD_JAX_COMPILE_CACHE or $JAX_COMPILATION_CACHE_DIR if set, else theworld_jax/jax under
    $XDG_CACHE_HOME (default ~/.cache)."""
    for variable in ("THEWORLD_JAX_COMPILE_CACHE", "JAX_COMPILATION_CACHE_DIR"):
        if os.environ.get(variable):
            return os.environ[variable]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "theworld_jax", "jax")


def enable_compilation_cache(path: str | None = None) -> str:
    """Keep every compiled program in JAX's persistent cache at `path` (default:
    `default_compilation_cache_dir()`), and load it from there when the same program is compiled again,
    in this process or a later one. Call it before the first compilation. Returns the directory."""
    path = os.path.abspath(os.path.expanduser(path or default_compilation_cache_dir()))
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    # every program: the defaults skip those that compile in under a second or are small, which a
    # launch has dozens of (sampling, the VAE's pieces, placement), and which add up
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    return path
