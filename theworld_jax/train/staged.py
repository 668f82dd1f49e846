"""The projector-only update as programs of the forward's stages, each with its backward program.

When only the world projector trains (the default recipe: SigLIP, the VAE and Gemma are frozen), the
update of one micro-batch runs
  inputs   the decoder's input x from the world projector (TheWorldModel.fused_inputs, the decoder's
           prologue), and the residuals of x's VJP with respect to the trained parameters;
  groups   each run of the layer pattern (gemma3_text.LayerGroup): x -> x, and the residuals of its VJP
           with respect to x (the layers are frozen, so no weight gradients); one program per group
           structure (Gemma 3 4B: six layers, three, the last one), called for every group of it;
  head     the final norm, the logits at the labelled positions, the summed cross-entropy and its
           gradient with respect to x;
then the groups' backward programs in reverse, the inputs' backward (the projector's gradient) and the
optimizer update. The programs are a fraction of the one-program step's size, so XLA compiles them in
a fraction of its time, all at once on threads (`TrainStep.compile`), and loads them faster from the
persistent cache (bench/results/compile_gpu.md).
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from theworld_jax import jit
from theworld_jax.modeling.fusion import causal_lm_loss_terms_at
from theworld_jax.modeling.gemma3_text import REMAT_POLICIES, check_remat

# Residuals of at most this many values are returned packed, one array per dtype: a program's outputs are
# buffers of their own, so each small one (the group programs' slice offsets, the same scalar for every
# layer, the block rows' masks) was a copy kernel of its own, about fifty per group program. Larger ones stay
# apart: where a custom call takes one (cuDNN's softmax statistics, (B, N, 256) float32), the backward would
# slice it out of the pack in a kernel of its own. XLA:GPU's deviceless compile for an H200 (B=1): the
# six-layer group's forward 235 -> 154 kernels with the changes beside this one, its backward 188 -> 182.
SMALL_RESIDUAL = 1024


class Staged:
    """`fn(*args) -> (y, aux)` as two programs: `forward(*args) -> ((y, aux), saved)`, the residuals of y's
    VJP with respect to `args[i]` for i in `argnums` that are neither arguments themselves (the frozen weights
    are read again, not copied) nor constants (those of up to SMALL_RESIDUAL values packed into one array per
    dtype), and `backward(args, saved, dy)`, the cotangents of those arguments."""

    def __init__(self, fn: Callable, argnums: tuple[int, ...], name: str, compiler_options: dict | None = None):
        self.fn = fn
        self.argnums = argnums
        self._plans = {}  # per argument signature: the VJP's tree and where each of its leaves comes from

        def forward(*args):
            return self._forward(*args)

        def backward(args, saved, dy):
            return self._backward(args, saved, dy)

        forward.__name__, backward.__name__ = f"{name}.forward", f"{name}.backward"  # in compile logs, profiles
        options = compiler_options or None
        self.forward = jax.jit(forward, compiler_options=options)
        self.backward = jax.jit(backward, compiler_options=options)

    def _forward(self, *args):
        def differentiated(*values):
            full = list(args)
            for i, value in zip(self.argnums, values):
                full[i] = value
            return self.fn(*full)

        y, pullback, aux = jax.vjp(differentiated, *(args[i] for i in self.argnums), has_aux=True)
        leaves, tree = jax.tree.flatten(pullback)
        inputs = {id(x): i for i, x in enumerate(jax.tree.leaves(args))}
        sources, saved, small, seen = [], [], {}, {}
        for leaf in leaves:
            if id(leaf) in inputs:
                source = ("input", inputs[id(leaf)])
            elif not isinstance(leaf, jax.core.Tracer):  # a constant: kept in the plan, not returned
                source = ("constant", leaf)
            elif id(leaf) in seen:
                source = seen[id(leaf)]
            elif leaf.size == 0:  # e.g. cuDNN's empty placeholders: made again in the backward
                source = ("empty", (leaf.shape, leaf.dtype))
            elif leaf.size <= SMALL_RESIDUAL:
                group = small.setdefault(leaf.dtype, [])
                source = ("packed", (leaf.dtype, sum(x.size for x in group), leaf.shape))
                group.append(leaf)
            else:
                source = ("saved", len(saved))
                saved.append(leaf)
            seen[id(leaf)] = source
            sources.append(source)
        packs = {dtype: len(saved) + i for i, dtype in enumerate(small)}
        saved += [jnp.concatenate([x.ravel() for x in group]) for group in small.values()]
        self._plans[_signature(args)] = (tree, tuple(sources), packs)
        return (y, aux), tuple(saved)

    def _backward(self, args, saved, dy):
        tree, sources, packs = self._plans[_signature(args)]
        inputs = jax.tree.leaves(args)

        def value(kind, ref):
            if kind == "input":
                return inputs[ref]
            if kind == "saved":
                return saved[ref]
            if kind == "empty":
                return jnp.zeros(*ref)
            if kind == "packed":
                dtype, offset, shape = ref
                return saved[packs[dtype]][offset:offset + int(np.prod(shape))].reshape(shape)
            return ref  # a constant

        pullback = jax.tree.unflatten(tree, [value(kind, ref) for kind, ref in sources])
        return pullback(dy)


def _signature(args) -> tuple:
    leaves, tree = jax.tree.flatten(args)
    return tree, tuple((tuple(x.shape), str(x.dtype)) for x in leaves)


class StagedUpdate:
    """`__call__(trainable, opt_state, frozen, batch (A, G, ...), media) -> (trainable, opt_state, metrics)`,
    the update of `TrainStep` when only the world projector trains. `apply(trainable, opt_state, terms)`:
    the jitted optimizer update from each micro-batch's (gradients, summed loss, target count), with `lower`."""

    def __init__(self, split, apply: Callable, *, layout, remat: str, compiler_options: dict, on_trace: Callable):
        self.split = split
        self.layout = layout
        self.policy = REMAT_POLICIES[check_remat(remat)]
        self.options = tuple(sorted(compiler_options.items()))
        self._on_trace = on_trace
        self.inputs = Staged(self._inputs, (0,), "inputs", compiler_options)
        self.head = jax.jit(self._head, compiler_options=compiler_options)
        self.apply = apply
        self._model = None

    def __call__(self, trainable, opt_state, frozen, batch, media):
        terms = []
        for a in range(jax.tree.leaves(batch)[0].shape[0]):
            inputs_args = (trainable, frozen, batch, media, np.int32(a))
            ((x, aux), inputs_saved) = self.inputs.forward(*inputs_args)
            ropes, mask, rows, keep = aux
            tape = []
            for stage, values, last in self._groups(trainable, frozen):
                args = (values, x, ropes, mask, rows if last else None)
                (x, _), saved = stage.forward(*args)
                tape.append((stage, args, saved))
            total, count, dx = self.head(trainable, frozen, batch, np.int32(a), x, keep)
            while tape:
                stage, args, saved = tape.pop()
                (dx,) = stage.backward(args, saved, dx)
            (grads,) = self.inputs.backward(inputs_args, inputs_saved, dx)
            terms.append((grads, total, count))
        return self.apply(trainable, opt_state, tuple(terms))

    def lower(self, trainable, opt_state, frozen, batch, media, sharding) -> list[jax.stages.Lowered]:
        """The update's programs lowered for these arguments (arrays, or ShapeDtypeStructs); the arrays
        between programs are taken to lie as `sharding` puts them (a one-device mesh's)."""
        lowered = []

        def outputs(program, *args):
            lowered.append(program.lower(*args))
            return jax.tree.map(lambda o: jax.ShapeDtypeStruct(o.shape, o.dtype, sharding=sharding),
                                jax.eval_shape(program, *args))

        def later(program, *args):
            lowered.append(program.lower(*args))

        self._walk(trainable, opt_state, frozen, batch, media, outputs, later)
        return lowered

    def compile_in_turn(self, trainable, opt_state, frozen, batch, media, pool) -> list:
        """For a mesh of several devices, where the placement of the arrays between the programs is known
        only once the program that makes them is compiled: the programs whose outputs others take compiled
        in turn (the caller's thread), the backward programs of the groups and the optimizer's submitted to
        `pool`. Returns the futures of the submitted compiles."""
        futures = []

        def outputs(program, *args):
            return jax.tree.map(lambda o: jax.ShapeDtypeStruct(o.shape, o.dtype, sharding=o.sharding),
                                program.lower(*args).compile().out_info)

        def later(program, *args):
            futures.append(pool.submit(program.lower(*args).compile))

        self._walk(trainable, opt_state, frozen, batch, media, outputs, later)
        return futures

    def _walk(self, trainable, opt_state, frozen, batch, media, outputs, later) -> None:
        """The update's programs in the order of a step, for one micro-batch's shapes: `outputs(program,
        *args)` for those whose outputs others take (it returns them, as ShapeDtypeStructs with their
        placement), `later(program, *args)` for the others."""
        inputs_args = (trainable, frozen, batch, media, np.int32(0))
        (x, (ropes, mask, rows, keep)), inputs_saved = outputs(self.inputs.forward, *inputs_args)
        (grads,) = outputs(self.inputs.backward, inputs_args, inputs_saved, x)
        forwards = {}
        for stage, values, last in self._groups(trainable, frozen):
            args = (values, x, ropes, mask, rows if last else None)
            key = (id(stage), _signature(args))
            if key not in forwards:
                forwards[key] = outputs(stage.forward, *args)
                (y, _), saved = forwards[key]
                later(stage.backward, args, saved, y)
            (x, _), _ = forwards[key]
        total, count, _ = outputs(self.head, trainable, frozen, batch, np.int32(0), x, keep)
        later(self.apply, trainable, opt_state, ((grads, total, count),) * jax.tree.leaves(batch)[0].shape[0])

    def _merged(self, trainable, frozen):
        """The model with these frozen values (merged once per frozen tuple: its decoder layers' values are
        what the group programs read)."""
        if self._model is None or self._model[0] is not frozen:
            self._model = (frozen, self.split.merge(trainable, frozen))
        return self._model[1]

    def _groups(self, trainable, frozen) -> list[tuple[Staged, list, bool]]:
        """(the group's Staged program, its layers' values, whether it ends with the last layer) of each
        layer group, in order."""
        decoder = self._merged(trainable, frozen).language_model
        out = []
        for group, module in decoder.groups(split_last=True):
            bound = jit.bind(module, (Staged, self.policy, self.options),
                             lambda graphdef, paths: _group_stage(graphdef, paths, self.policy, self.options))
            out.append((bound.program, bound.values(), group[-1] == len(decoder.layers) - 1))
        return out

    def _inputs(self, trainable, frozen, batch, media, a):
        """x (B, L, D), the decoder's input, and (ropes, mask, rows, keep) of micro-batch `a`."""
        self._on_trace()
        model = self.split.merge(trainable, frozen)
        micro = {k: v[a] for k, v in batch.items()}
        media = None if media is None else jax.tree.map(lambda m: m[a], media)
        fused = model.fused_inputs(micro["input_ids"], micro["attention_mask"],
                                   token_type_ids=micro.get("token_type_ids"), labels=micro["labels"],
                                   logits_to_keep=micro["keep"], layout=self.layout, media=media)
        x, ropes, rows = model.language_model.prologue(fused.embeds, fused.positions, fused.keep)
        return x, (ropes, fused.mask, rows, fused.keep)

    def _head(self, trainable, frozen, batch, a, x, keep):
        """(summed cross-entropy, target tokens, its gradient with respect to x) of micro-batch `a` from the
        last layer's output x (B, K, D) at the fused labelled positions `keep`."""
        decoder = self.split.merge(trainable, frozen).language_model
        labels, positions = batch["labels"][a], batch["keep"][a]

        def loss(x):  # (summed cross-entropy, its token count as aux)
            return causal_lm_loss_terms_at(decoder.logits(decoder.epilogue(x, keep)), labels, positions)

        (total, count), dx = jax.value_and_grad(loss, has_aux=True)(x)
        return total, count, dx


@functools.lru_cache(maxsize=64)
def _group_stage(graphdef, paths: tuple, policy, options: tuple) -> Staged:
    """One Staged program per layer group structure (and remat policy), shared by the groups of it."""
    def group(values, x, ropes, mask, rows):
        module = jit.merge(graphdef, paths, values)
        x, _ = module(x, ropes, mask, (None,) * len(module.layers), rows, prefilled=False, implementation=None,
                      twin=False, layer_remat=policy)
        return x, None

    return Staged(group, (1,), "LayerGroup", dict(options) or None)
