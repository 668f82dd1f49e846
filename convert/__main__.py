"""Convert checkpoints to TheWorld-JAX's Orbax format, and export back to the upstream PyTorch layout.

    python -m convert gemma3     --src HF_DIR  --dst OUT [--dtype bfloat16|float32]
    python -m convert cosmos-vae --src VAE_DIR --dst OUT [--dtype ...]
    python -m convert theworld   --gemma HF_DIR --cosmos VAE_DIR [--projection UPSTREAM_CKPT_DIR] --dst OUT
    python -m convert export     --src OUT --dst DIR      # back to the upstream PyTorch TheWorld layout

Every output is written to a temporary directory first and renamed into place when complete.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from theworld_jax.config.theworld import PROJECTION_ARCHITECTURES, PROJECTION_MODES

DTYPES = ("bfloat16", "float32")


def _dtype(name: str):
    import jax.numpy as jnp

    return {"bfloat16": jnp.bfloat16, "float32": jnp.float32}[name]


def convert_gemma3(args) -> None:
    from theworld_jax import TheWorld

    TheWorld.from_pretrained(args.src, enable_world=False, dtype=_dtype(args.dtype)).save_pretrained(args.dst)


def convert_cosmos_vae(args) -> None:
    from theworld_jax import CosmosVAE
    from theworld_jax.checkpoint import atomic_directory, save_params

    vae = CosmosVAE.from_pretrained(args.src, dtype=_dtype(args.dtype))
    with atomic_directory(args.dst) as tmp:
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(vae.config.to_dict(), f, indent=2)
        save_params(vae, tmp)


def convert_theworld(args) -> None:
    from theworld_jax import TheWorld

    settings = dict(world_projection_mode=args.mode, projection_architecture=args.architecture)
    settings = {k: v for k, v in settings.items() if v is not None}
    if args.projection:  # an upstream checkpoint: its projector, our base models
        model = TheWorld.from_pretrained(args.projection, gemma_model_name=args.gemma,
                                         cosmos_model_name=args.cosmos, dtype=_dtype(args.dtype), **settings)
    else:
        model = TheWorld.from_pretrained(args.gemma, enable_world=True, cosmos_model_name=args.cosmos,
                                         dtype=_dtype(args.dtype), seed=args.seed, **settings)
    model.save_pretrained(args.dst)


def export_upstream(args) -> None:
    """The projector and config of a converted TheWorld as an upstream PyTorch TheWorld checkpoint."""
    from safetensors.numpy import save_file

    from theworld_jax import TheWorld
    from theworld_jax.checkpoint import atomic_directory
    from theworld_jax.weights.world_projector_keys import export_world_projector

    import jax.numpy as jnp

    model = TheWorld.from_pretrained(args.src, dtype=jnp.float32)
    if not model.config.enable_world:
        raise SystemExit(f"{args.src!r} has no world branch (enable_world=False): nothing to export")
    c = model.config
    config = {"model_type": "the_world", "gemma_model_name": c.gemma_model_name,
              "cosmos_model_name": c.cosmos_model_name, "enable_world": True,
              "world_projection_mode": c.world_projection_mode, "projection_architecture": c.projection_architecture,
              "freeze_gemma_vision": c.freeze_gemma_vision, "freeze_gemma_language": c.freeze_gemma_language,
              "freeze_cosmos_vae": c.freeze_cosmos_vae}
    with atomic_directory(args.dst) as tmp:
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
        save_file(export_world_projector(model.model.world_projector), os.path.join(tmp, "model.safetensors"),
                  metadata={"format": "pt"})


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="python -m convert", description=__doc__.split("\n\n")[0])
    sub = top.add_subparsers(dest="command", required=True)
    p = sub.add_parser("gemma3", help="a HuggingFace Gemma 3 directory -> Orbax (TheWorld with enable_world=False)")
    p.add_argument("--src", required=True)
    p.add_argument("--dst", required=True)
    p.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    p.set_defaults(run=convert_gemma3)
    p = sub.add_parser("cosmos-vae", help="a diffusers AutoencoderKLWan directory -> Orbax")
    p.add_argument("--src", required=True)
    p.add_argument("--dst", required=True)
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.set_defaults(run=convert_cosmos_vae)
    p = sub.add_parser("theworld", help="Gemma 3 + VAE (+ an upstream projector) -> an Orbax TheWorld")
    p.add_argument("--gemma", required=True)
    p.add_argument("--cosmos", required=True)
    p.add_argument("--projection", help="an upstream PyTorch TheWorld checkpoint directory (its projector)")
    p.add_argument("--mode", choices=PROJECTION_MODES, help="world_projection_mode of a new projector")
    p.add_argument("--architecture", choices=PROJECTION_ARCHITECTURES)
    p.add_argument("--seed", type=int, default=0, help="initialisation seed of a new projector")
    p.add_argument("--dst", required=True)
    p.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    p.set_defaults(run=convert_theworld)
    p = sub.add_parser("export", help="a converted TheWorld -> the upstream PyTorch layout (projector + config)")
    p.add_argument("--src", required=True)
    p.add_argument("--dst", required=True)
    p.set_defaults(run=export_upstream)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    args.run(args)
    print(f"wrote {os.path.abspath(args.dst)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
