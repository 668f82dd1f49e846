"""The optimizer and the compiled train step.

The step takes a whole optimizer step's rows (A, G, L): A accumulation micro-batches of G rows (G over
the mesh's data/fsdp axes), computes logits at the labelled positions only, sums the token cross-entropies and their gradients over all of them, and
divides by the number of target tokens, so the loss is a true mean over target tokens whatever the
accumulation and the number of devices. Only the trained parameters (float32) get gradients and
optimizer state; the frozen ones are an argument, not a constant.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from theworld_jax.jit import LARGE_PROGRAM_OPTIONS
from theworld_jax.train import model as model_lib


def learning_rate_schedule(opt_cfg, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0, then linear decay to 0 (HF Trainer's default) or cosine decay to 0."""
    warmup = min(opt_cfg.warmup_steps, total_steps)
    lr = opt_cfg.learning_rate
    if opt_cfg.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(total_steps, warmup + 1), end_value=0.0)
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup),
                                 optax.linear_schedule(lr, 0.0, max(total_steps - warmup, 1))], [warmup])


def decay_mask(params: dict[str, jax.Array]) -> dict[str, bool]:
    """Weight decay on matrices only: not on biases and norm scales (HF Trainer's rule)."""
    return {path: value.ndim >= 2 and not path.endswith(("bias", "norm.weight", "scale"))
            for path, value in params.items()}


def make_optimizer(opt_cfg, total_steps: int, params: dict[str, jax.Array]) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW with the warmup schedule."""
    return optax.chain(
        optax.clip_by_global_norm(opt_cfg.max_grad_norm),
        optax.adamw(learning_rate_schedule(opt_cfg, total_steps), b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps,
                    weight_decay=opt_cfg.weight_decay, mask=decay_mask(params)))


# XLA options of the step and eval programs: those of every large program (theworld_jax.jit). XLA's dot
# merger stays on: with Triton GEMMs it concatenated the frozen q/k/v and gate/up weights on every step
# (975 MiB at batch 1 in the deviceless H200 compile, bench/results/gpu_aot_programs.md, sixth session) and
# was switched off; with cuBLAS GEMMs the step compiled in 27.7 s with it against 37.0 s without, at the
# same speed (142.0 / 142.8 ms on an H200, bench/results/compile_gpu.md, tenth session).
COMPILER_OPTIONS = dict(LARGE_PROGRAM_OPTIONS)


class TrainStep:
    """`step(trainable, opt_state, frozen, batch) -> (trainable, opt_state, metrics)`, jitted once per
    batch shape; `compiles` counts the traces. `layout`: the fast attention path's static bound
    (model.attention_layout); `remat`: the decoder's remat policy name."""

    def __init__(self, split: model_lib.SplitModel, optimizer: optax.GradientTransformation, *, layout=None,
                 remat: str = "none"):
        self.split = split
        self.optimizer = optimizer
        self.layout = layout
        self.remat = remat
        self.compiles = 0
        self.step = jax.jit(self._step, donate_argnums=(0, 1), compiler_options=COMPILER_OPTIONS)
        self.eval = jax.jit(self._eval, compiler_options=COMPILER_OPTIONS)

    def _micro_loss(self, trainable, frozen, micro):
        model = self.split.merge(trainable, frozen)
        return model_lib.loss_terms(model, micro, layout=self.layout, remat=self.remat)

    def _step(self, trainable, opt_state, frozen, batch):
        self.compiles += 1
        grad_fn = jax.value_and_grad(self._micro_loss, has_aux=True)

        def accumulate(carry, micro):
            grads, total, count = carry
            (t, c), g = grad_fn(trainable, frozen, micro)
            return (jax.tree.map(jnp.add, grads, g), total + t, count + c), None

        zeros = jax.tree.map(jnp.zeros_like, trainable)
        init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32))
        (grads, total, count), _ = jax.lax.scan(accumulate, init, batch)
        denom = jnp.maximum(count, 1).astype(jnp.float32)
        grads = jax.tree.map(lambda g: g / denom, grads)
        updates, opt_state = self.optimizer.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        metrics = {"loss": total / denom, "target_tokens": count, "grad_norm": optax.tree.norm(grads)}
        return trainable, opt_state, metrics

    def _eval(self, trainable, frozen, batch):
        return self._micro_loss(trainable, frozen, batch)

