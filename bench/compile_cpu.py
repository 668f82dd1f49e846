"""Full-size compile times on the CPU backend, nothing run: gemma-3-4b-it + the Cosmos VAE with abstract
(eval_shape) weights, bf16; each program traced, lowered and compiled by XLA:CPU, B=1 at 4,400 tokens.

Programs: the text decoder forward (last logits), the fused TheWorld forward (full logits) and the
projector-only training step (value_and_grad of the labelled-position loss + AdamW). It needs no GPU; it
recorded the Python-loop decoder (this code) against the scanned one (main at 88a8900, taken out since:
results/compile_gpu.md); XLA:GPU compiles differently (autotuning, cuDNN), so its seconds are a ratio.

    python -m bench.compile_cpu --out bench/results/compile_cpu_loop
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

L = 4400


def timed(out: dict, name: str, fn, *args) -> None:
    import jax

    t0 = time.perf_counter()
    lowered = jax.jit(fn).lower(*args)
    t1 = time.perf_counter()
    if out["lower_only"]:
        out[name] = dict(trace_lower_s=round(t1 - t0, 2), stablehlo_chars=len(lowered.as_text()))
    else:
        lowered.compile()
        t2 = time.perf_counter()
        out[name] = dict(trace_lower_s=round(t1 - t0, 2), compile_s=round(t2 - t1, 2), total_s=round(t2 - t0, 2))
    print(name, out[name], flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="path prefix of the .json report")
    parser.add_argument("--lower-only", action="store_true",
                        help="trace and lower only (no XLA compile): the part a warm compilation cache still pays")
    args = parser.parse_args(argv)
    import flax
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from bench.theworld_speed_gpu import make_batch, sizes
    from theworld_jax.attention import block_layout, make_attention_mask
    from theworld_jax.config.gemma3 import Gemma3Config
    from theworld_jax.config.theworld import TheWorldConfig
    from theworld_jax.config.wan_vae import WanVAEConfig
    from theworld_jax.modeling import gemma3_text
    from theworld_jax.modeling.fusion import labelled_positions
    from theworld_jax.modeling.theworld import TheWorldModel

    z = sizes(False)
    gemma_config = Gemma3Config.from_dict(z["config"].to_dict())
    text = gemma_config.text
    out = dict(jax=jax.__version__, flax=flax.__version__, cpus=os.cpu_count(), lower_only=args.lower_only,
               code="scan" if hasattr(gemma3_text, "Gemma3LayerStack") else "loop")

    graphdef, state = nnx.split(nnx.eval_shape(lambda: gemma3_text.Gemma3TextDecoder(
        text, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))))
    mask = make_attention_mask(jnp.ones((1, L), jnp.int32))

    def decoder(s, x):
        model = nnx.merge(graphdef, s)
        hidden, _ = model(x, positions=jnp.broadcast_to(jnp.arange(L), (1, L)), mask=mask)
        return model.logits(hidden[:, -1:])

    timed(out, "text_decoder_forward", decoder, state, jax.ShapeDtypeStruct((1, L, text.hidden_size), jnp.bfloat16))

    vae_config = WanVAEConfig.from_dict(z["vae"])
    config = TheWorldConfig(sow_token_id=z["sow"], eow_token_id=z["eow"], vae_image_size=(z["vae_size"],) * 2)
    model = nnx.eval_shape(lambda: TheWorldModel.create(config, gemma_config, vae_config, dtype=jnp.bfloat16,
                                                        rngs=nnx.Rngs(0)))
    graphdef2, state2 = nnx.split(model)
    batch = make_batch(z, 1)
    layout = block_layout(batch["token_type_ids"], batch["attention_mask"])
    x = {k: jax.ShapeDtypeStruct(v.shape, jnp.bfloat16 if v.dtype == np.float32 else jnp.int32)
         for k, v in batch.items()}
    timed(out, "fused_forward", lambda s, x: nnx.merge(graphdef2, s).forward(**x, layout=layout).logits, state2, x)

    graphdef3, params, frozen = nnx.split(model, lambda path, value: "world_projector" in path, ...)
    tx = optax.adamw(1e-5)
    keep = jax.ShapeDtypeStruct(labelled_positions(batch["labels"]).shape, jnp.int32)

    def step(params, opt_state, frozen, x, keep):
        def loss_fn(p):
            return nnx.merge(graphdef3, p, frozen).forward(**x, logits_to_keep=keep, layout=layout).loss

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    timed(out, "train_step", step, params, jax.eval_shape(tx.init, params), frozen, x, keep)
    print(json.dumps(out))
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out + ".json", "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
