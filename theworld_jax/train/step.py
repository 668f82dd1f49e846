"""The optimizer and the compiled train step.

The step takes a whole optimizer step's rows (A, G, L): A accumulation micro-batches of G rows (G over
the mesh's data/fsdp axes), computes logits at the labelled positions only, sums the token cross-entropies and their gradients over all of them, and
divides by the number of target tokens, so the loss is a true mean over target tokens whatever the
accumulation and the number of devices. Only the trained parameters (float32) get gradients and
optimizer state; the frozen ones are an argument, not a constant.
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from theworld_jax.jit import LARGE_PROGRAM_OPTIONS
from theworld_jax.train import model as model_lib
from theworld_jax.train.staged import StagedUpdate
from theworld_jax.weights.loader import param_path


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


# The frozen encoders: SigLIP with Gemma's projector, and the VAE encoder (TheWorldModel.encode_media).
ENCODERS = re.compile(r"^(gemma\.(vision_tower|multi_modal_projector)|vae)\.")
# What trains in the default recipe: the world projector alone (then the update runs staged).
PROJECTOR = re.compile(r"^world_projector\.")
MEDIA_KEYS = ("pixel_values", "video")


class TrainStep:
    """`step(trainable, opt_state, frozen, batch) -> (trainable, opt_state, metrics)`, compiled once per
    batch shape; `compiles` counts the update's traces. `layout`: the fast attention path's static bound
    (model.attention_layout); `remat`: the decoder's remat policy name.

    When no encoder parameter trains (`encode_apart`), a step is two programs: the encoders over the
    batch's images and video (no gradients flow there), then the update (the world projector, the decoder
    forward and backward, the optimizer) on their outputs. When only the world projector trains
    (`staged`), the update itself runs as programs of its stages and their backward
    (theworld_jax.train.staged). On a new batch shape on a mesh the programs are compiled together on
    threads (`compile`), so that XLA's single-threaded passes over them overlap."""

    def __init__(self, split: model_lib.SplitModel, optimizer: optax.GradientTransformation, *, layout=None,
                 remat: str = "none"):
        self.split = split
        self.optimizer = optimizer
        self.layout = layout
        self.remat = remat
        self.compiles = 0
        trained = [param_path(path) for path, _ in nnx.to_flat_state(split.template)]
        self.encode_apart = not any(ENCODERS.match(path) for path in trained)
        self.staged = all(PROJECTOR.match(path) for path in trained)
        self._update = KeepPlacement(self._step, donate_argnums=(0, 1), compiler_options=COMPILER_OPTIONS)
        apply = KeepPlacement(self._apply_terms, donate_argnums=(0, 1), compiler_options=COMPILER_OPTIONS)
        self._staged = StagedUpdate(split, apply, layout=layout, remat=remat, compiler_options=COMPILER_OPTIONS,
                                    on_trace=self._count)
        self._encoders = {}  # per output sharding: the encoders' program
        self._compiled = set()  # batch signatures whose two programs were compiled together
        self._eval = jax.jit(self._eval_terms, compiler_options=COMPILER_OPTIONS)

    def step(self, trainable, opt_state, frozen, batch):
        """One optimizer step on `batch` (A, G, ...): A accumulation micro-batches of G rows."""
        inputs, rest = _split_media(batch)
        if not self.encode_apart:
            return self._update(trainable, opt_state, frozen, batch, None)
        signature = _signature(batch)
        if signature not in self._compiled and _media_sharding(_first(batch)) is not None:  # on a mesh
            self.compile(trainable, opt_state, frozen, batch)
            self._compiled.add(signature)
        media = self._encoder(_media_sharding(_first(batch)))(trainable, frozen, inputs) if inputs else None
        if self.staged:
            return self._staged(trainable, opt_state, frozen, rest, media)
        return self._update(trainable, opt_state, frozen, rest, media)

    def evaluate(self, trainable, frozen, batch) -> tuple[jax.Array, jax.Array]:
        """(summed token cross-entropy, target tokens) over `batch` (A, G, ...), without gradients; the
        encoders run apart as in `step` (their program is the step's when the image shapes match)."""
        inputs, rest = _split_media(batch)
        if not self.encode_apart or not inputs:
            return self._eval(trainable, frozen, batch, None)
        media = self._encoder(_media_sharding(next(iter(inputs.values()))))(trainable, frozen, inputs)
        return self._eval(trainable, frozen, rest, media)

    def lower(self, trainable, opt_state, frozen, batch) -> list[jax.stages.Lowered]:
        """The step's programs for these arguments (arrays, or ShapeDtypeStructs with their shardings),
        lowered: [the update], or [the encoders, the update] when they run apart."""
        inputs, rest = _split_media(batch)
        if not self.encode_apart:
            return [self._update.lower(trainable, opt_state, frozen, batch, None)]
        sharding = _media_sharding(_first(batch))
        encode, media = [], None
        if inputs:
            encode = [self._encoder(sharding).lower(trainable, frozen, inputs)]
            media = jax.tree.map(lambda o: jax.ShapeDtypeStruct(o.shape, o.dtype, sharding=sharding),
                                 encode[0].out_info)
        if self.staged:
            replicated = None if sharding is None else NamedSharding(sharding.mesh, PartitionSpec())
            return encode + self._staged.lower(trainable, opt_state, frozen, rest, media, replicated)
        return encode + [self._update.lower(trainable, opt_state, frozen, rest, media)]

    def compile(self, trainable, opt_state, frozen, batch) -> list[jax.stages.Compiled]:
        """The step's programs compiled at once, each on its own thread (XLA's single-threaded passes over
        them overlap); the calls that follow with such arguments find them compiled. The staged update on
        a mesh of several devices: its forward programs in turn, the rest on threads as soon as the
        placement of their arguments is known (`StagedUpdate.compile_in_turn`)."""
        sharding = _media_sharding(_first(batch))
        if not (self.encode_apart and self.staged and sharding is not None and sharding.mesh.size > 1):
            lowered = self.lower(trainable, opt_state, frozen, batch)
            with ThreadPoolExecutor(len(lowered)) as pool:
                return list(pool.map(lambda program: program.compile(), lowered))
        inputs, rest = _split_media(batch)
        with ThreadPoolExecutor() as pool:
            futures, media = [], None
            if inputs:
                encode = self._encoder(sharding).lower(trainable, frozen, inputs)
                futures.append(pool.submit(encode.compile))
                media = jax.tree.map(lambda o: jax.ShapeDtypeStruct(o.shape, o.dtype, sharding=sharding),
                                     encode.out_info)
            futures += self._staged.compile_in_turn(trainable, opt_state, frozen, rest, media, pool)
            return [future.result() for future in futures]

    def _count(self):
        self.compiles += 1

    def _encoder(self, sharding):
        if sharding not in self._encoders:
            placement = {} if sharding is None else {"out_shardings": sharding}
            self._encoders[sharding] = jax.jit(self._encode, compiler_options=COMPILER_OPTIONS, **placement)
        return self._encoders[sharding]

    def _encode(self, trainable, frozen, inputs):
        """The encoders' outputs (model.Media) of each micro-batch, stacked (A, ...)."""
        def encode(micro):
            model = self.split.merge(trainable, frozen)
            return model.encode_media(micro.get("pixel_values"), micro.get("video"))

        return jax.lax.map(encode, inputs)

    def _micro_loss(self, trainable, frozen, micro, media=None):
        model = self.split.merge(trainable, frozen)
        return model_lib.loss_terms(model, micro, layout=self.layout, remat=self.remat, media=media)

    def _step(self, trainable, opt_state, frozen, batch, media):
        self._count()
        grad_fn = jax.value_and_grad(self._micro_loss, has_aux=True)

        def accumulate(carry, xs):
            grads, total, count = carry
            (t, c), g = grad_fn(trainable, frozen, *xs)
            return (jax.tree.map(jnp.add, grads, g), total + t, count + c), None

        zeros = jax.tree.map(jnp.zeros_like, trainable)
        init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32))
        (grads, total, count), _ = jax.lax.scan(accumulate, init, (batch, media))
        return self._apply(trainable, opt_state, grads, total, count)

    def _apply_terms(self, trainable, opt_state, terms):
        """The optimizer step from each micro-batch's (gradients, summed loss, target count)."""
        grads, total, count = terms[0]
        for g, t, c in terms[1:]:
            grads, total, count = jax.tree.map(jnp.add, grads, g), total + t, count + c
        return self._apply(trainable, opt_state, grads, total, count)

    def _apply(self, trainable, opt_state, grads, total, count):
        """The optimizer step from the gradients, summed loss and target count over the step's rows."""
        denom = jnp.maximum(count, 1).astype(jnp.float32)
        grads = jax.tree.map(lambda g: g / denom, grads)
        updates, opt_state = self.optimizer.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        metrics = {"loss": total / denom, "target_tokens": count, "grad_norm": optax.tree.norm(grads)}
        return trainable, opt_state, metrics

    def _eval_terms(self, trainable, frozen, batch, media):
        def add(carry, xs):
            total, count = self._micro_loss(trainable, frozen, *xs)
            return (carry[0] + total, carry[1] + count), None

        init = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32))
        return jax.lax.scan(add, init, (batch, media))[0]


class KeepPlacement:
    """`fn(trainable, opt_state, ...) -> (trainable, opt_state, metrics)` jitted (`jit_kwargs`) so that on a
    mesh the trained parameters and the optimizer state come out placed as they went in, the metrics
    replicated: one program per placement. Left to XLA, an output's sharding could come back in another
    form (P('fsdp', None) as P('fsdp')), and the second step compiled the whole update again (4 CPU devices,
    tests/scripts/staged_step_on_a_mesh.py). Off a mesh: a plain jit."""

    def __init__(self, fn, **jit_kwargs):
        self.fn = fn
        self.jit_kwargs = jit_kwargs
        self._programs = {}

    def __call__(self, trainable, opt_state, *args):
        return self.program(trainable, opt_state)(trainable, opt_state, *args)

    def lower(self, trainable, opt_state, *args) -> jax.stages.Lowered:
        return self.program(trainable, opt_state).lower(trainable, opt_state, *args)

    def program(self, trainable, opt_state):
        """The jitted fn for the placement of `trainable` and `opt_state` (arrays or ShapeDtypeStructs)."""
        shardings, tree = jax.tree.flatten(jax.tree.map(lambda x: getattr(x, "sharding", None), (trainable, opt_state)),
                                           is_leaf=lambda x: x is None)
        placed = all(isinstance(s, NamedSharding) for s in shardings)
        key = (tree, tuple(shardings)) if placed else None
        if key not in self._programs:
            placement = {}
            if placed:
                metrics = NamedSharding(shardings[0].mesh, PartitionSpec())
                placement = {"out_shardings": (*jax.tree.unflatten(tree, shardings), metrics)}
            self._programs[key] = jax.jit(self.fn, **self.jit_kwargs, **placement)
        return self._programs[key]


def _split_media(batch: dict) -> tuple[dict, dict]:
    """(the encoders' inputs, the rest) of a batch."""
    return ({k: v for k, v in batch.items() if k in MEDIA_KEYS}, {k: v for k, v in batch.items() if k not in MEDIA_KEYS})


def _first(batch: dict):
    return next(iter(batch.values()))


def _media_sharding(x):
    """Where the encoders' outputs (A, G, ...) go: along the batch's first two axes as `x` (A, G, ...) lies on
    its mesh (the launcher's batches). None for arrays off a mesh: the two programs then compile one after
    the other as they are called (compiled ahead, the update's arguments, uncommitted on the first step and
    committed after it, would compile it a second time)."""
    sharding = getattr(x, "sharding", None)
    if isinstance(sharding, NamedSharding):
        return NamedSharding(sharding.mesh, PartitionSpec(*sharding.spec[:2]))
    return None


def _signature(batch: dict) -> tuple:
    return tuple((k, v.shape, str(v.dtype), getattr(v, "sharding", None)) for k, v in sorted(batch.items()))
