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
from flax import nnx

from theworld_jax import jit
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


# XLA options of the step and eval programs. The dot merger (XLA:GPU with cuBLAS GEMMs) joins the q/k/v
# products and the gate/up products of each layer into one product each by concatenating their weights,
# on every call: in the deviceless H200 compile of the projector-only step at batch 1 that was 975 MiB of
# weight concatenations and 289 MiB of output slices per step (bench/results/gpu_aot_programs.md, sixth
# session); without it every product reads its weight in place. Other backends ignore the option.
COMPILER_OPTIONS = {"xla_gpu_dot_merger_threshold_mb": 0}


class TrainStep:
    """`step(trainable, opt_state, frozen, batch) -> (trainable, opt_state, metrics)`; `compiles` counts
    the traces of the step. `layout`: the fast attention path's static bound (model.attention_layout);
    `remat`: the decoder's remat policy name.

    staged=False: the step is one program, compiled once per batch shape. staged=True: the step runs
    outside jit, each stage of the model's forward (and its gradient) a program of its own, the decoder's
    identical layer groups one program for all (theworld_jax.jit.shared_call), then the update: the
    same values from programs a fraction of the size, so the first step compiles in a fraction of the
    time (bench/results/compile_gpu.md)."""

    def __init__(self, split: model_lib.SplitModel, optimizer: optax.GradientTransformation, *, layout=None,
                 remat: str = "none", staged: bool = False):
        self.split = split
        self.optimizer = optimizer
        self.layout = layout
        self.remat = remat
        self.compiles = 0
        self.step = jax.jit(self._step, donate_argnums=(0, 1), compiler_options=COMPILER_OPTIONS)
        self.eval = jax.jit(self._eval, compiler_options=COMPILER_OPTIONS)
        if staged:
            self.step, self.eval = self._staged_step, self._staged_eval
            self._update = jax.jit(self._apply, donate_argnums=(0, 1), compiler_options=COMPILER_OPTIONS)
            self._model = None

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
        return self._apply(trainable, opt_state, grads, total, count)

    def _eval(self, trainable, frozen, batch):
        return self._micro_loss(trainable, frozen, batch)

    def _apply(self, trainable, opt_state, grads, total, count):
        """The optimizer update from summed gradients, loss and target count -> (trainable, opt_state, metrics)."""
        denom = jnp.maximum(count, 1).astype(jnp.float32)
        grads = jax.tree.map(lambda g: g / denom, grads)
        updates, opt_state = self.optimizer.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        metrics = {"loss": total / denom, "target_tokens": count, "grad_norm": optax.tree.norm(grads)}
        return trainable, opt_state, metrics

    def _staged_model(self, trainable, frozen):
        """The model merged once (for these frozen values) and its trained Variables by path."""
        if self._model is None or self._model[0] is not frozen:
            model = self.split.merge(trainable, frozen)
            variables = {model_lib.param_path(p): v for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
            self._model = (frozen, model, {path: variables[path] for path in trainable})
        return self._model[1:]

    def _staged_loss(self, trainable, frozen, micro):
        model, variables = self._staged_model(trainable, frozen)
        # the float32 master values, as split.merge puts them in the whole step's model
        with jit.staging([(variables[path], value) for path, value in trainable.items()]):
            return model_lib.loss_terms(model, micro, layout=self.layout, remat=self.remat)

    def _staged_step(self, trainable, opt_state, frozen, batch):
        grad_fn = jax.value_and_grad(self._staged_loss, has_aux=True)
        grads, total, count = None, None, None
        for a in range(jax.tree.leaves(batch)[0].shape[0]):
            (t, c), g = grad_fn(trainable, frozen, {k: v[a] for k, v in batch.items()})
            grads, total, count = (g, t, c) if grads is None else _accumulate((grads, total, count), (g, t, c))
        self.compiles = max(self.compiles, 1)
        return self._update(trainable, opt_state, grads, total, count)

    def _staged_eval(self, trainable, frozen, batch):
        return self._staged_loss(trainable, frozen, batch)


@jax.jit
def _accumulate(sums, terms):
    return jax.tree.map(jnp.add, sums, terms)

