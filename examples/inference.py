"""Ask TheWorld about an image: upstream's examples/inference.py, with theworld_jax.

    python examples/inference.py                                   # the real models (a token for Gemma 3)
    python examples/inference.py --model DIR --cosmos DIR --image photo.jpg --question "..."

Upstream loads with `dtype=torch.bfloat16, device_map="auto"` and calls `.to("cuda")` on the inputs;
here JAX places the model on the accelerator it finds (or `mesh=` shards it), and the inputs stay NumPy.
"""

from __future__ import annotations

import argparse
from importlib import resources

import jax.numpy as jnp
from PIL import Image

from theworld_jax import TheWorld

SAMPLE_IMAGE = str(resources.files("theworld_jax") / "assets" / "sample.jpg")


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="google/gemma-3-4b-it", help="Gemma 3 / TheWorld directory or hub id")
    p.add_argument("--cosmos", default="nvidia/Cosmos-Predict2-2B-Video2World", help="Cosmos VAE directory or hub id")
    p.add_argument("--image", default=SAMPLE_IMAGE)
    p.add_argument("--question", default="What will happen next in this scene?")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--vae-image-size", type=int, nargs=2, default=(512, 512), metavar=("H", "W"),
                   help="what images are resized to for the VAE (512 x 512 as upstream)")
    args = p.parse_args(argv)

    # Load the model with world reasoning enabled.
    model = TheWorld.from_pretrained(args.model, enable_world=True, cosmos_model_name=args.cosmos,
                                     vae_image_size=tuple(args.vae_image_size), dtype=jnp.bfloat16)

    # Prepare the image and the question.
    image = Image.open(args.image).convert("RGB")
    messages = [{"role": "user", "content": [{"type": "image", "image": image},
                                             {"type": "text", "text": args.question}]}]

    # Generate a response (the HuggingFace interface; `images=` feeds the world branch).
    inputs = model.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                 return_dict=True, return_tensors="np")
    outputs = model.generate(**inputs, images=[image], max_new_tokens=args.max_new_tokens)
    prompt_length = inputs["input_ids"].shape[1] + 2  # the prompt and the <start_of_world><end_of_world> added
    response = model.processor.decode(outputs[0, prompt_length:], skip_special_tokens=True)
    print(response)
    return response


if __name__ == "__main__":
    main()
