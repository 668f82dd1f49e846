"""Variants of the training step that undo one of the sixth session's deviceless-census changes each, for an
A/B on the card in one device call (`python -m bench.train_gpu --side jax --batches 1 --variants ...`).

Each variant patches the library in the worker process before the step is built:
- `dot_merger`: TrainStep compiles with XLA's default options (the dot merger joins q/k/v and gate/up);
- `autodiff_norm`: RMSNorm differentiated by autodiff instead of its written-out backward;
- `gelu_aux`: the gated gelu's differentiated forward without the optimization barrier (XLA may compute the
  gelu in the gate GEMM's GELU_AUX epilogue);
- `siglip_2d_bias`: SigLIP's q/k/v as (D, N, H) products plus an (N, H) bias;
- `before`: all four (the step as at c6aa2dd); `plain`: none.

Seventh session, the sliding layers' block rows (`theworld_jax.interval_attention`): `reversed_blocks`
takes the reversed call (1,023 dummy queries in front of the block) where the Layout would let the band
call serve.

Eighth session, the padded length: `pad16` / `pad64` pad the cuDNN calls and the batch's rows (4,399 fused
tokens) to a multiple of 16 / 64 (4,400 / 4,416) instead of 128 (4,480).

Twelfth session: `one_program` runs the projector-only update as one program instead of its stages'
programs (theworld_jax.train.staged).

Thirteenth session: `no_dot_merger` compiles the step with the library's options plus
`xla_gpu_dot_merger_threshold_mb=0` (no per-step concatenation of the frozen q/k/v weights, no slices of
the merged GEMM's output: 2.6 -> 0.75 GiB of copies per B=1 step in the deviceless compile); on the card
the B=1 step did not move (140.2 -> 140.0 ms, bench/results/train_gpu.md), so the library keeps the merger.

Fourteenth session, the host's time per step: `no_command_buffers` compiles every program of the step
without XLA's command buffers (CUDA graphs; `xla_gpu_enable_command_buffer` empty), `encode_no_command_buffers`
only the encoders' program. On the card a B=1 step's dispatch took 42 ms of the host's time; in the traced
step 27.8 ms went to `command_buffer::update` (each staged program's graph updated for its new buffers on
every call), and the device waited 1.4 ms (4.0 traced) at the step's start for the encoders' graph
(bench/results/train_gpu.md).

Fifteenth session: `skip_temp_updates` runs the process with `--xla_gpu_command_buffer_update_mode=SKIP_TEMP`
(XLA re-maps the temporary buffers' addresses instead of updating each graph for them; it switches XLA to its
VMM allocator).
"""

from __future__ import annotations

import os
import re

import jax
import jax.numpy as jnp


def _dot_merger():
    from theworld_jax.train import step

    step.COMPILER_OPTIONS = {}


def _no_dot_merger():
    from theworld_jax.train import step

    step.COMPILER_OPTIONS = {**step.COMPILER_OPTIONS, "xla_gpu_dot_merger_threshold_mb": 0}


def _autodiff_norm():
    from theworld_jax.modeling import layers

    def rms_norm(x, weight, eps):
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
        return (normed * (1.0 + weight.astype(jnp.float32))).astype(x.dtype)

    layers.rms_norm = rms_norm


def _gelu_aux():
    from theworld_jax.modeling import layers

    @jax.custom_vjp
    def gelu_gated(gate, up):
        return jax.nn.gelu(gate, approximate=True) * up

    gelu_gated.defvjp(lambda gate, up: (gelu_gated(gate, up), (gate, up)), layers._gelu_gated_backward)
    layers.gelu_gated = gelu_gated


def _siglip_2d_bias():
    from theworld_jax.modeling import siglip

    siglip._project = lambda x, kernel, bias: jnp.einsum("BTD,DNH->BTNH", x, kernel) + bias


def _reversed_blocks():
    from theworld_jax import interval_attention as ia

    ia._band_serves = lambda *args: False


def _one_program():
    from theworld_jax.train import step

    step.PROJECTOR = re.compile(r"(?!)")  # matches no path: TrainStep.staged is false


def _no_command_buffers():
    from theworld_jax.train import step

    step.COMPILER_OPTIONS = {**step.COMPILER_OPTIONS, "xla_gpu_enable_command_buffer": ""}


def _encode_no_command_buffers():
    from theworld_jax.train import step

    library_encoder, options = step.TrainStep._encoder, step.COMPILER_OPTIONS

    def encoder(self, sharding):  # the library's, with the options swapped while it builds its program
        step.COMPILER_OPTIONS = {**options, "xla_gpu_enable_command_buffer": ""}
        try:
            return library_encoder(self, sharding)
        finally:
            step.COMPILER_OPTIONS = options

    step.TrainStep._encoder = encoder


def _process_flag(flag: str):
    def patch():  # before the worker's first device call, when XLA reads $XLA_FLAGS
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()
    return patch


def _pad(multiple: int):
    def patch():
        from theworld_jax import interval_attention as ia

        ia.CUDNN_MULTIPLE = multiple
    return patch


PATCHES = {"dot_merger": _dot_merger, "autodiff_norm": _autodiff_norm, "gelu_aux": _gelu_aux,
           "siglip_2d_bias": _siglip_2d_bias, "reversed_blocks": _reversed_blocks, "pad16": _pad(16),
           "pad64": _pad(64), "one_program": _one_program, "no_dot_merger": _no_dot_merger,
           "no_command_buffers": _no_command_buffers, "encode_no_command_buffers": _encode_no_command_buffers,
           "skip_temp_updates": _process_flag("--xla_gpu_command_buffer_update_mode=SKIP_TEMP")}
CENSUS = ("dot_merger", "autodiff_norm", "gelu_aux", "siglip_2d_bias")
VARIANTS = {"plain": (), "before": CENSUS, **{name: (name,) for name in PATCHES}}


def apply(variant: str) -> None:
    """Patch the library for `variant` (a name of VARIANTS)."""
    if variant not in VARIANTS:
        raise SystemExit(f"unknown training variant {variant!r}; expected one of {sorted(VARIANTS)}")
    for name in VARIANTS[variant]:
        PATCHES[name]()
