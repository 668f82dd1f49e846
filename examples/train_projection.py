"""Train the world projector: upstream's examples/simple_training.py, with theworld_jax.

    python examples/train_projection.py                         # the real models (a token for Gemma 3)
    python examples/train_projection.py --model DIR --cosmos DIR [--mode channel] [--steps 5]

As upstream: load TheWorld with Gemma 3 and the VAE frozen, count what trains, make a batch of one
{"image", "text", "label"} row, run the forward pass with labels, then take gradients and a few AdamW
steps on the projector. Upstream's loss covers the prompt too; here the labels are the answer's tokens
only, and the logits are computed at the labelled positions only (`logits_to_keep`). For real training
(data files, accumulation, checkpoints, resume, many devices) use the launcher, whose step this is:

    theworld-train --config configs/theworld-4b-projection.yaml data.train=DATA.jsonl
"""

from __future__ import annotations

import argparse
from importlib import resources

import jax
import jax.numpy as jnp
import numpy as np
import optax
from PIL import Image

from theworld_jax import TheWorld
from theworld_jax.inputs import prepare_batch
from theworld_jax.modeling.fusion import labelled_positions
from theworld_jax.train.model import split_trainable, trainable_paths

SAMPLE_IMAGE = str(resources.files("theworld_jax") / "assets" / "sample.jpg")


def main(argv=None) -> list[float]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="google/gemma-3-4b-it", help="Gemma 3 / TheWorld directory or hub id")
    p.add_argument("--cosmos", default="nvidia/Cosmos-Predict2-2B-Video2World", help="Cosmos VAE directory or hub id")
    p.add_argument("--mode", choices=("spatial", "channel"), default="spatial", help="world_projection_mode")
    p.add_argument("--image", default=SAMPLE_IMAGE)
    p.add_argument("--text", default="What is in this image?")
    p.add_argument("--label", default="A ball flying over a green field.")
    p.add_argument("--steps", type=int, default=5, help="AdamW steps on this one row")
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--vae-image-size", type=int, nargs=2, default=(512, 512), metavar=("H", "W"))
    p.add_argument("--save", help="save the trained model here (TheWorld.save_pretrained)")
    args = p.parse_args(argv)

    # 1. The model with the projection layers trainable only (the freeze flags are upstream's).
    model = TheWorld.from_pretrained(args.model, enable_world=True, cosmos_model_name=args.cosmos,
                                     world_projection_mode=args.mode, vae_image_size=tuple(args.vae_image_size),
                                     freeze_gemma_vision=True, freeze_gemma_language=True, freeze_cosmos_vae=True,
                                     dtype=jnp.bfloat16 if jax.default_backend() != "cpu" else jnp.float32)

    # 2. What trains: the parameters the freeze flags leave (the world projector always trains).
    split = split_trainable(model.model, trainable_paths(model.model, model.config))
    params = split.initial_trainable()  # {path: float32 master copy}
    trainable = sum(int(np.prod(v.shape)) for v in params.values())
    total = trainable + sum(int(np.prod(v.shape)) for v in jax.tree.leaves(split.frozen))
    print(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.4f} %): "
          f"{sorted({k.split('.')[0] for k in params})}")

    # 3. One {"image", "text", "label"} row as a chat; the labels are the answer's tokens.
    image = Image.open(args.image).convert("RGB")
    user = {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": args.text}]}
    answer = {"role": "assistant", "content": [{"type": "text", "text": args.label}]}
    inputs = model.processor.apply_chat_template([user, answer], tokenize=True, return_dict=True,
                                                 return_tensors="np")
    prompt = model.processor.apply_chat_template([user], add_generation_prompt=True, tokenize=True,
                                                 return_dict=True, return_tensors="np")["input_ids"]
    labels = np.where(np.arange(inputs["input_ids"].shape[1]) < prompt.shape[1], -100, inputs["input_ids"])
    inputs = {k: inputs[k] for k in ("input_ids", "attention_mask", "pixel_values", "token_type_ids")}

    # 4. The forward pass with labels (upstream's `model.forward(**inputs)`): the loss.
    out = model(**inputs, labels=labels, images=[image])
    print(f"loss before training: {float(out.loss):.4f}")

    # 5. Gradients of the trainable parameters and AdamW steps, compiled once. The batch is prepared on
    # the host (world markers injected, the VAE input built), then only the labelled logits are computed.
    batch = prepare_batch(model.input_spec, **inputs, labels=labels, images=[image]).model_inputs()
    batch["logits_to_keep"] = labelled_positions(batch["labels"])
    optimizer = optax.adamw(args.learning_rate, weight_decay=0.01)
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params, opt_state, frozen):
        loss, grads = jax.value_and_grad(lambda p: split.merge(p, frozen).forward(**batch).loss)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, optax.tree.norm(grads)

    losses = []
    for i in range(args.steps):
        params, opt_state, loss, grad_norm = step(params, opt_state, split.frozen)
        losses.append(float(loss))
        print(f"step {i + 1}: loss {losses[-1]:.4f}, gradient norm {float(grad_norm):.4f}")

    model.model = split.merge(params, cast=True)  # back to the model's dtype
    if args.save:
        model.save_pretrained(args.save)  # TheWorld.from_pretrained(args.save) loads it
        print(f"saved to {args.save}")
    print("Unfreeze more with the freeze flags, e.g. TheWorld.from_pretrained(..., freeze_gemma_language=False),\n"
          "or train with the launcher: theworld-train --config configs/theworld-4b-projection.yaml ...")
    return losses


if __name__ == "__main__":
    main()
