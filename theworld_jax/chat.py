"""Ask TheWorld about an image from the command line; the answer is printed as it is produced.

    theworld-chat --model DIR [--cosmos VAE_DIR] --image PATH --prompt "..." \\
        [--max-new-tokens N] [--dtype bfloat16] [--do-sample --temperature T --top-k K --top-p P --seed S]

The prompt goes through the processor's chat template (one user turn: the image, then the text, and the
generation prompt). The image is shown to Gemma's vision tower and, when the world branch is on, to the
Cosmos VAE as well. `--no-world` loads Gemma 3 alone. Arguments are checked before the model loads;
errors are one line (`--debug` shows the traceback). `python -m theworld_jax.chat` is the same command.
"""

from __future__ import annotations

import argparse
import sys

from theworld_jax import cli

DTYPES = ("bfloat16", "float32")


def parser() -> argparse.ArgumentParser:
    p = cli.Parser(prog="theworld-chat", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, type=cli.checkpoint,
                   help="a Gemma 3 / TheWorld directory or hub id")
    p.add_argument("--cosmos", type=cli.checkpoint,
                   help="the Cosmos VAE (diffusers directory, or one with a vae/ subfolder)")
    p.add_argument("--no-world", action="store_true", help="load Gemma 3 without the world branch")
    p.add_argument("--vae-image-size", type=cli.positive_int, nargs=2, metavar=("H", "W"),
                   help="size images are resized to for the VAE (default: the model's config)")
    p.add_argument("--image", type=cli.image_file, help="an image file; without it the prompt is text only")
    p.add_argument("--prompt", required=True, help="the user's question")
    p.add_argument("--max-new-tokens", type=cli.positive_int, default=256,
                   help="the most tokens to generate (default: %(default)s)")
    p.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="compute dtype (default: %(default)s)")
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=cli.positive_float, default=1.0,
                   help="sampling temperature, > 0 (default: %(default)s)")
    p.add_argument("--top-k", type=cli.positive_int, help="sample among the K most likely tokens")
    p.add_argument("--top-p", type=cli.probability, help="sample within top-p probability mass, in (0, 1]")
    p.add_argument("--seed", type=cli.nonnegative_int, default=0, help="sampling seed (default: %(default)s)")
    cli.add_common(p)
    return p


def chat_inputs(processor, prompt: str, image=None) -> dict:
    """The tokenized one-turn chat (input_ids, attention_mask, and pixel_values / token_type_ids with an image)."""
    content = ([{"type": "image", "image": image}] if image is not None else []) + [{"type": "text", "text": prompt}]
    enc = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                        tokenize=True, return_dict=True, return_tensors="np")
    return {k: enc[k] for k in ("input_ids", "attention_mask", "pixel_values", "token_type_ids") if k in enc}


def main(argv=None, out=None) -> int:
    return cli.run(parser(), lambda args: _chat(args, out or sys.stdout), argv)


def _chat(args: argparse.Namespace, out) -> int:
    if not args.prompt.strip():
        raise ValueError("--prompt is empty")
    import jax.numpy as jnp
    from PIL import Image

    from theworld_jax import TheWorld

    settings = {"enable_world": False} if args.no_world else {}
    if args.cosmos is not None:
        settings["cosmos_model_name"] = args.cosmos
    if args.vae_image_size is not None:
        settings["vae_image_size"] = tuple(args.vae_image_size)
    model = TheWorld.from_pretrained(args.model, dtype=getattr(jnp, args.dtype), **settings)
    if model.processor is None:
        raise ValueError(f"{args.model!r} holds no processor/tokenizer files; the chat needs them")
    image = None if args.image is None else Image.open(args.image).convert("RGB")
    inputs = chat_inputs(model.processor, args.prompt, image)
    world_images = [image] if image is not None and model.config.enable_world else None
    pieces = model.generate_stream(**inputs, images=world_images, max_new_tokens=args.max_new_tokens,
                                   do_sample=args.do_sample, temperature=args.temperature, top_k=args.top_k,
                                   top_p=args.top_p, seed=args.seed)
    for piece in pieces:
        out.write(piece)
        out.flush()
    out.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
