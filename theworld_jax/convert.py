"""Convert checkpoints to TheWorld-JAX's Orbax format, and export back to the upstream PyTorch layout.

    theworld-convert gemma3     --src HF_DIR  --dst OUT [--dtype bfloat16|float32]
    theworld-convert cosmos-vae --src VAE_DIR --dst OUT [--dtype ...]
    theworld-convert theworld   --gemma HF_DIR --cosmos VAE_DIR [--projection UPSTREAM_CKPT_DIR] --dst OUT
    theworld-convert export     --src OUT --dst DIR      # back to the upstream PyTorch TheWorld layout

(`python -m convert ...` from the repository root is the same command.) Every output is written to a
temporary directory first and put in place when complete. An existing non-empty --dst is replaced only
with --overwrite, and never when it is (or holds) a source or the current directory.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from theworld_jax import cli, progress
from theworld_jax.config import ProjectionArchitecture, ProjectionMode
from theworld_jax.io_safety import atomic_directory, check_target

DTYPES = ("bfloat16", "float32")


def _dtype(name: str):
    import jax.numpy as jnp

    return {"bfloat16": jnp.bfloat16, "float32": jnp.float32}[name]


def _sources(args) -> list[str | None]:
    return [getattr(args, name, None) for name in ("src", "gemma", "cosmos", "projection")]


def convert_gemma3(args) -> None:
    from theworld_jax import TheWorld

    with progress.step(f"reading {args.src}"):
        model = TheWorld.from_pretrained(args.src, enable_world=False, dtype=_dtype(args.dtype))
    with progress.step(f"writing {args.dst}"):
        model.save_pretrained(args.dst, overwrite=args.overwrite)


def convert_cosmos_vae(args) -> None:
    from theworld_jax import CosmosVAE
    from theworld_jax.checkpoint import save_params

    with progress.step(f"reading {args.src}"):
        vae = CosmosVAE.from_pretrained(args.src, dtype=_dtype(args.dtype))
    with progress.step(f"writing {args.dst}"), \
            atomic_directory(args.dst, overwrite=args.overwrite, sources=_sources(args)) as tmp:
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(vae.config.to_dict(), f, indent=2)
        save_params(vae, tmp)


def convert_theworld(args) -> None:
    from theworld_jax import TheWorld

    settings = dict(world_projection_mode=args.mode, projection_architecture=args.architecture)
    settings = {k: v for k, v in settings.items() if v is not None}
    with progress.step("reading the models"):
        if args.projection:  # an upstream checkpoint: its projector, our base models
            model = TheWorld.from_pretrained(args.projection, gemma_model_name=args.gemma,
                                             cosmos_model_name=args.cosmos, dtype=_dtype(args.dtype), **settings)
        else:
            model = TheWorld.from_pretrained(args.gemma, enable_world=True, cosmos_model_name=args.cosmos,
                                             dtype=_dtype(args.dtype), seed=args.seed, **settings)
    with progress.step(f"writing {args.dst}"):
        model.save_pretrained(args.dst, overwrite=args.overwrite)


def export_upstream(args) -> None:
    """The projector and config of a converted TheWorld as an upstream PyTorch TheWorld checkpoint."""
    import jax.numpy as jnp
    from safetensors.numpy import save_file

    from theworld_jax import TheWorld
    from theworld_jax.weights.world_projector_keys import export_world_projector

    model = TheWorld.from_pretrained(args.src, dtype=jnp.float32)
    if not model.config.enable_world:
        raise ValueError(f"{args.src!r} has no world branch (enable_world=False): nothing to export")
    c = model.config
    config = {"model_type": "the_world", "gemma_model_name": c.gemma_model_name,
              "cosmos_model_name": c.cosmos_model_name, "enable_world": True,
              "world_projection_mode": c.world_projection_mode, "projection_architecture": c.projection_architecture,
              "freeze_gemma_vision": c.freeze_gemma_vision, "freeze_gemma_language": c.freeze_gemma_language,
              "freeze_cosmos_vae": c.freeze_cosmos_vae}
    with atomic_directory(args.dst, overwrite=args.overwrite, sources=[args.src, *model.sources]) as tmp:
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
        save_file(export_world_projector(model.model.world_projector), os.path.join(tmp, "model.safetensors"),
                  metadata={"format": "pt"})


def _outputs(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dst", required=True, help="the output directory (must not exist or be empty)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --dst, once the new output is complete (never a source or the cwd)")
    cli.add_common(p)


def parser() -> argparse.ArgumentParser:
    top = cli.Parser(prog="theworld-convert", description=__doc__.split("\n\n")[0])
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    dtype_help = "parameter dtype of the output (default: %(default)s)"
    p = sub.add_parser("gemma3", help="a HuggingFace Gemma 3 directory -> Orbax (TheWorld with enable_world=False)")
    p.add_argument("--src", required=True, type=cli.checkpoint, help="a HuggingFace Gemma 3 directory or hub id")
    p.add_argument("--dtype", choices=DTYPES, default="bfloat16", help=dtype_help)
    _outputs(p)
    p.set_defaults(run=convert_gemma3)
    p = sub.add_parser("cosmos-vae", help="a diffusers AutoencoderKLWan directory -> Orbax")
    p.add_argument("--src", required=True, type=cli.checkpoint,
                   help="a diffusers AutoencoderKLWan directory (or one with a vae/ subfolder) or hub id")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help=dtype_help)
    _outputs(p)
    p.set_defaults(run=convert_cosmos_vae)
    p = sub.add_parser("theworld", help="Gemma 3 + VAE (+ an upstream projector) -> an Orbax TheWorld")
    p.add_argument("--gemma", required=True, type=cli.checkpoint, help="a HuggingFace Gemma 3 directory or hub id")
    p.add_argument("--cosmos", required=True, type=cli.checkpoint, help="the Cosmos VAE (diffusers) directory or hub id")
    p.add_argument("--projection", type=cli.existing_dir,
                   help="an upstream PyTorch TheWorld checkpoint directory (its projector)")
    p.add_argument("--mode", choices=list(ProjectionMode), help="world_projection_mode of a new projector")
    p.add_argument("--architecture", choices=list(ProjectionArchitecture), help="projection_architecture of a new projector")
    p.add_argument("--seed", type=cli.nonnegative_int, default=0, help="initialisation seed of a new projector")
    p.add_argument("--dtype", choices=DTYPES, default="bfloat16", help=dtype_help)
    _outputs(p)
    p.set_defaults(run=convert_theworld)
    p = sub.add_parser("export", help="a converted TheWorld -> the upstream PyTorch layout (projector + config)")
    p.add_argument("--src", required=True, type=cli.existing_dir, help="a TheWorld-JAX checkpoint directory")
    _outputs(p)
    p.set_defaults(run=export_upstream)
    return top


def _work(args) -> int:
    check_target(args.dst, overwrite=args.overwrite, sources=_sources(args), what="--dst")  # before any loading
    args.run(args)
    print(f"wrote {os.path.abspath(args.dst)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli.run(parser(), _work, argv)


if __name__ == "__main__":
    sys.exit(main())
