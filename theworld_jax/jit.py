"""The one way this library jits a module: `jit_module(fn, module, ...)(*args, **kwargs)`.

`fn(module, *args, **kwargs)` is compiled with `jax.jit` (`static_argnames` / `donate_argnames` name
`fn`'s own parameters). The module is split once per (module, fn, options); each call reads the live
values of its variables, so a call costs a flat list of arrays and a jitted dispatch (not an NNX graph
traversal, which is what `nnx.jit` pays per call) and sees parameter updates made in place. The module's
structure must not change after the first call. Compiled programs are shared by all modules of one
structure. Under an outer trace (a module holding tracers) the call is inlined as a nested jit.

`shared_call(module, *args, **static)` calls a module through one jitted program per module structure:
under an outer jit a decoder's identical layers are traced and lowered once instead of once each; outside
jit each call runs that program, so a forward run stage by stage compiles each kind of stage once.

`LARGE_PROGRAM_OPTIONS` are the XLA options of programs over whole sequences (`jit_module(...,
compiler_options=)`; `with compiler_options(...)` for the programs shared_call runs outside jit);
`DECODE_LOOP_OPTIONS` those of the decode loop (the whole loop as one CUDA graph on a GPU).

`enable_compilation_cache()` turns on JAX's persistent compilation cache (the command lines do, unless
--no-compile-cache): a second launch with the same shapes loads its programs instead of compiling them.
`set_process_xla_flags()` adds the XLA flags that only work process-wide (the command lines do).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
import weakref
from typing import Any, Callable

import jax
from flax import nnx

from theworld_jax import progress

_BOUND: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def jit_module(fn: Callable[..., Any], module: nnx.Module, *, static_argnames: tuple[str, ...] = (),
               donate_argnames: tuple[str, ...] = (), compiler_options: dict | None = None) -> Callable[..., Any]:
    """`functools.partial(fn, module)`, jitted (cached per module, fn and options; `compiler_options`: XLA's,
    e.g. LARGE_PROGRAM_OPTIONS)."""
    key = (fn, tuple(static_argnames), tuple(donate_argnames), tuple(sorted((compiler_options or {}).items())))
    return bind(module, key, lambda graphdef, paths: _jit(graphdef, paths, *key))


def bind(module: nnx.Module, key: tuple, make_program: Callable) -> Bound:
    """The module's Bound for `key` (made once per module and key): its live variables and the program
    `make_program(graphdef, paths)`, which takes their values (`Bound.values()`; `merge` rebuilds the module
    from them inside the program)."""
    bound = _BOUND.setdefault(module, {})
    if key not in bound:
        bound[key] = Bound(module, make_program)
    return bound[key]


class Bound:
    """A module's live variables and the program `make_program(graphdef, paths)` that takes their values
    (for shared_call: a function of the compiler options that returns the program, `program(options)`)."""

    def __init__(self, module: nnx.Module, make_program: Callable):
        graphdef, state = nnx.split(module)
        flat = nnx.to_flat_state(state)  # the module's own Variable objects: calls read their live values
        paths = tuple(path for path, _ in flat)
        self._variables = [variable for _, variable in flat]
        # Array values are passed raw: the merged module inside the program applies any read hook itself
        # (reading through get_value here applied it twice), and get_value's copy of each value's pytree
        # and its array-ref checks cost 6.9 ms per call for the 883 variables of Gemma 3 4B with its
        # vision tower against 0.8 ms (this host), on every prefill and every decode call.
        self._raw = all(isinstance(v.get_raw_value(), jax.Array) for v in self._variables)
        self.program = make_program(graphdef, paths)

    def values(self) -> list:
        if self._raw:
            return [v.get_raw_value() for v in self._variables]
        return [v.get_value() for v in self._variables]

    def __call__(self, *args, **kwargs):
        return self.program(self.values(), *args, **kwargs)


def merge(graphdef, paths: tuple, values) -> nnx.Module:
    return nnx.merge(graphdef, nnx.from_flat_state(list(zip(paths, values))))


@functools.lru_cache(maxsize=64)
def _jit(graphdef, paths: tuple, fn, static_argnames: tuple, donate_argnames: tuple, compiler_options: tuple):
    """One jitted function per (module structure, fn, options)."""

    @functools.wraps(fn)  # fn's name in compile logs and profiles; fn's signature for the argnames
    def run(values, *args, **kwargs):
        return fn(merge(graphdef, paths, values), *args, **kwargs)

    progress.announce_compiles(fn.__name__, fn.__name__.strip("_").replace("_", " "))
    return jax.jit(run, static_argnames=static_argnames, donate_argnames=donate_argnames,
                   compiler_options=dict(compiler_options) or None)


def shared_call(module: nnx.Module, *args, method: str = "__call__", remat_policy: Callable | None = None,
                **static):
    """`module.<method>(*args, **static)`, through one jitted program per (module structure, method,
    `static` keyword arguments, `remat_policy`).

    Under an outer jit, modules of one structure (Gemma 3's 29 sliding-window layers) are traced and
    lowered once and called once each; XLA inlines the calls before it optimises, so the compiled
    program does the work of direct calls (the same steady-state times on an H200,
    bench/results/compile_gpu.md). Called outside jit, each call runs that program, compiled once per
    structure: a caller that runs a model's stages this way compiles each stage once, the decoder's
    identical layer groups once for all (TheWorld's forward), with the XLA options of the enclosing
    `compiler_options(...)`. `args` are pytrees of arrays; `static` values must be hashable.
    remat_policy: a `jax.checkpoint` policy to rematerialise the call's activations in the backward
    pass with, or None for none."""
    key = (_shared_program, method, remat_policy, tuple(sorted(static.items())))
    name = type(module).__name__
    # per bound, one program per options (the shared lookup hashes the graphdef: once, not per call)
    bound = bind(module, key, lambda graphdef, paths: functools.cache(
        functools.partial(_shared_program, graphdef, paths, name, *key[1:])))
    values = bound.values()
    nested = any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves((values, args)))
    return bound.program(() if nested else _OPTIONS.get())(values, *args)


@functools.lru_cache(maxsize=256)
def _shared_program(graphdef, paths: tuple, name: str, method: str, remat_policy, static: tuple, options: tuple):
    def call(values, *args):
        return getattr(merge(graphdef, paths, values), method)(*args, **dict(static))

    call.__name__ = name if method == "__call__" else f"{name}.{method}"  # its name in traces and compile logs
    progress.announce_compiles(call.__name__, call.__name__)  # when it compiles as a program of its own
    return jax.jit(call if remat_policy is None else jax.checkpoint(call, policy=remat_policy),
                   compiler_options=dict(options) or None)


# XLA options of the programs that run a model over whole sequences (the forward, the prefill, the training
# step; not the decode loop), measured on an H200 (bench/results/compile_gpu.md):
# - GEMMs through cuBLAS, not Triton (tenth session): the fused forward's first call 27.7 -> 17.6 s, the
#   projector-only training step's 41.8 -> 23.6 s, the same steady state (79.3 / 140.4 against 81.2 / 140.3
#   ms): at thousands of rows the autotuner had picked cuBLAS anyway. Decoding keeps Triton, faster at one
#   or two rows.
# - no fusion autotuner (eleventh session): XLA gives its Triton normalisation and softmax fusions its cost
#   model's tiles instead of compiling and timing candidates: the training step's first call 35.4 -> 25.5 s,
#   the staged forward's 15.5 -> 11.5 s, steady state 139.8 / 78.0 against 140.3 / 78.3 ms.
# Other backends ignore the options.
LARGE_PROGRAM_OPTIONS = {"xla_gpu_enable_triton_gemm": False, "xla_gpu_experimental_enable_fusion_autotuner": False}

# The decode loop's program: XLA's default command-buffer kinds plus the while loop and its conditional, so
# the whole loop runs as one CUDA graph (CUDA's conditional nodes) instead of a graph launch per step after
# the host reads the loop's predicate back. On an H200 (fifteenth session, bench/results/decode_profile.md):
# 3.005 -> 2.956 ms/step at batch 1 and 3.370 -> 3.347 at batch 8 in one process, 3.017 -> 2.963 and
# 3.417 -> 3.358 in another (each variant traced and compiled in turn).
DECODE_LOOP_OPTIONS = {"xla_gpu_enable_command_buffer":
                       "FUSION,CUBLAS,CUBLASLT,CUDNN,CUSTOM_CALL,DYNAMIC_SLICE_FUSION,CONDITIONAL,WHILE"}

# XLA flags that take effect only for the whole process: on an H200 the fusion autotuner's switch as a
# program's option left the training step's update at 23.4 s of XLA compile, as $XLA_FLAGS at 17.3 s
# (the card still ran the autotuner's pass; bench/results/compile_gpu.md, eleventh session).
PROCESS_XLA_FLAGS = ("--xla_gpu_experimental_enable_fusion_autotuner=false",)

_OPTIONS: contextvars.ContextVar[tuple] = contextvars.ContextVar("theworld_jax_compiler_options", default=())


@contextlib.contextmanager
def compiler_options(options: dict):
    """Inside: the programs `shared_call` runs outside jit (a model's stages, called one by one) are
    compiled with these XLA options. Calls under an outer jit are part of its program and take its own."""
    token = _OPTIONS.set(tuple(sorted(options.items())))
    try:
        yield
    finally:
        _OPTIONS.reset(token)


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


def set_process_xla_flags(flags: tuple[str, ...] = PROCESS_XLA_FLAGS) -> str:
    """Add `flags` to $XLA_FLAGS, each unless $XLA_FLAGS names it already (the user's setting wins). XLA
    reads them when JAX first starts a backend: call this before anything touches a device. Returns the
    new $XLA_FLAGS."""
    current = os.environ.get("XLA_FLAGS", "").split()
    named = {flag.split("=", 1)[0] for flag in current}
    os.environ["XLA_FLAGS"] = " ".join(current + [f for f in flags if f.split("=", 1)[0] not in named])
    return os.environ["XLA_FLAGS"]
