"""TheWorld end to end, offline, in about a minute: `python -m theworld_jax.demo` (or `theworld-demo`).

With no arguments, on tiny random models built on the spot:
  build     a tiny Gemma 3 (with its processor) and a tiny Cosmos (Wan2.1) VAE, written in HuggingFace
            format by this package's own JAX code and export path (no torch, no network);
  load      TheWorld.from_pretrained on them: the same code a real checkpoint takes;
  ask       a question about the sample image, answered as it is produced (random weights: gibberish);
  save      save_pretrained (Orbax), reloaded with TheWorld.from_pretrained;
  train     the training launcher (configs/tiny.yaml, `init=` the saved model) for a few steps on the
            small dataset shipped with the package, the loss printed falling; the trained final/
            reloaded with TheWorld.from_pretrained;
  export    `theworld-convert export` of the trained model to the upstream PyTorch layout, and
            `theworld-convert theworld` back from it; the round trip keeps the projector bit for bit.
Everything is written under --workdir (default: a new temporary directory, kept for you to look at);
nothing that was there before is touched. `--model` / `--cosmos` run the same on real checkpoints
(local directories, or hub ids with a token).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from importlib import resources

from theworld_jax import cli

SAMPLE_IMAGE = resources.files("theworld_jax") / "assets" / "sample.jpg"
DEFAULT_PROMPT = "What is happening in this scene, and what happens next?"
REAL_GEMMA = "google/gemma-3-4b-it"
REAL_COSMOS = "nvidia/Cosmos-Predict2-2B-Video2World"
TINY_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "tiny.yaml")
TRAIN_STEPS = 30


def parse_args(argv=None) -> argparse.Namespace:
    p = cli.Parser(prog="python -m theworld_jax.demo", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--workdir", help="where everything is written: a new or empty directory "
                                     "(default: a new temporary directory)")
    p.add_argument("--model", type=cli.checkpoint, help="a real Gemma 3 / TheWorld checkpoint (directory or hub id) instead of the tiny one")
    p.add_argument("--cosmos", type=cli.checkpoint, help="a real Cosmos VAE (diffusers directory, one with vae/, or hub id)")
    p.add_argument("--image", type=cli.image_file, help="the image to ask about (default: the sample image shipped with the package)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="the question asked about the image")
    p.add_argument("--max-new-tokens", type=cli.positive_int, default=None, help="answer length cap (default: 24 tiny, 96 real)")
    cli.add_compile_cache(p)
    args = p.parse_args(argv)
    if (args.model is None) != (args.cosmos is None):
        p.error("--model and --cosmos go together (the real Gemma 3 and the real Cosmos VAE)")
    cli.prepare_jax(args)
    return args


class Stages:
    """Prints each stage as it starts, what it did and how long it took; keeps the timings."""

    def __init__(self, names: list[str], out):
        self.names, self.out, self.times = names, out, {}

    def say(self, text: str = "") -> None:
        self.out.write(text + "\n")
        self.out.flush()

    @contextlib.contextmanager
    def stage(self, name: str, what: str):
        self.say(f"\n[{self.names.index(name) + 1}/{len(self.names)}] {name}: {what}")
        start = time.perf_counter()
        yield
        self.times[name] = time.perf_counter() - start
        self.say(f"    ({self.times[name]:.1f} s)")

    def summary(self) -> None:
        self.say("\nstage      seconds")
        for name, seconds in self.times.items():
            self.say(f"{name:<10} {seconds:7.1f}")
        self.say(f"{'total':<10} {sum(self.times.values()):7.1f}")


def make_workdir(path: str | None) -> str:
    """A new directory for the run: `path` when it is new or empty, else a new temporary directory."""
    if path is None:
        return tempfile.mkdtemp(prefix="theworld-demo-")
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise SystemExit(f"--workdir {path!r} exists and is not an empty directory; the demo writes only into "
                         "a new or empty one")
    os.makedirs(path, exist_ok=True)
    return os.path.abspath(path)


def run(args: argparse.Namespace, out) -> dict[str, float]:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # no notice that torch is absent: it is not needed
    import jax
    import jax.numpy as jnp
    import numpy as np
    from PIL import Image

    from theworld_jax import TheWorld, tiny

    real = args.model is not None
    workdir = make_workdir(args.workdir)
    stages = Stages(["build", "load", "ask", "save", "train", "export"] if not real else
                    ["load", "ask", "save", "export"], out)
    stages.say(f"TheWorld demo on {jax.devices()[0].platform.upper()} ({jax.device_count()} device(s)), "
               f"writing under {workdir}")
    dtype = jnp.bfloat16 if real else jnp.float32
    settings = {} if real else {"vae_image_size": tiny.VAE_IMAGE_SIZE}

    if real:
        gemma, cosmos = args.model, args.cosmos
    else:
        gemma, cosmos = os.path.join(workdir, "gemma3-tiny"), os.path.join(workdir, "cosmos-vae-tiny")
        with stages.stage("build", "a tiny random Gemma 3 + Cosmos VAE, written in HuggingFace format by JAX"):
            tiny.write_tiny_gemma3(gemma)
            tiny.write_tiny_vae(cosmos)
            for path in (gemma, cosmos):
                stages.say(f"    {path}: {', '.join(sorted(os.listdir(path)))}")

    with stages.stage("load", "TheWorld.from_pretrained(gemma, cosmos_model_name=vae): Gemma 3 + VAE + "
                              "a new world projector"):
        model = TheWorld.from_pretrained(gemma, cosmos_model_name=cosmos, dtype=dtype, **settings)
        stages.say(f"    {_count(model.model.gemma):,} Gemma 3 + {_count(model.model.vae):,} VAE + "
                   f"{_count(model.model.world_projector):,} projector parameters; "
                   f"{model.num_world_tokens()} world tokens per image ({model.config.world_projection_mode} mode)")

    image_path = args.image or str(SAMPLE_IMAGE)
    with stages.stage("ask", f"{args.prompt!r} about {os.path.basename(image_path)}, streamed"):
        image = Image.open(image_path).convert("RGB")
        _ask(model, image, args.prompt, args.max_new_tokens or (96 if real else 24), stages)
        if not real:
            stages.say("    (random weights: the answer is gibberish by design; the real models answer the question)")

    saved = os.path.join(workdir, "theworld")
    with stages.stage("save", "save_pretrained (Orbax) and TheWorld.from_pretrained again"):
        model.save_pretrained(saved)
        again = TheWorld.from_pretrained(saved, dtype=dtype)
        stages.say(f"    {saved}: {', '.join(sorted(os.listdir(saved)))}")
        stages.say(f"    reloaded; every parameter equal: {_same_params(model.model, again.model)}")

    if not real:
        with stages.stage("train", f"{TRAIN_STEPS} steps of configs/tiny.yaml from the saved model "
                                   "(the world projector and the random language model)"):
            final = _train(saved, workdir, stages)
            trained = TheWorld.from_pretrained(final, dtype=dtype)
            moved = not _same_params(model.model.world_projector, trained.model.world_projector)
            stages.say(f"    reloaded {final}; the projector moved: {moved}")
        model, saved = trained, final

    with stages.stage("export", "to the upstream PyTorch layout and back (theworld-convert export / theworld)"):
        exported, back = _export_round_trip(saved, gemma, cosmos, workdir, stages)
        projector = np.asarray(model.model.world_projector.layers[0].kernel[...], np.float32)
        returned = TheWorld.from_pretrained(back, dtype=jnp.float32)
        kept = np.array_equal(projector, np.asarray(returned.model.world_projector.layers[0].kernel[...]))
        stages.say(f"    upstream checkpoint {exported}: {', '.join(sorted(os.listdir(exported)))}")
        stages.say(f"    converted back to {back}; projector kept bit for bit: {kept}")

    stages.summary()
    _closing(stages, workdir, real, image_path)
    return stages.times


def _train(saved: str, workdir: str, stages: Stages) -> str:
    """`theworld-train --config configs/tiny.yaml init=SAVED ...` in this process; returns its final/."""
    from theworld_jax import tiny
    from theworld_jax.train.config import load_config
    from theworld_jax.train.loop import train

    if not os.path.isfile(TINY_CONFIG):
        raise SystemExit(f"{TINY_CONFIG} is missing: the train stage runs from a checkout of the repository")
    overrides = [f"output_dir={os.path.join(workdir, 'train-run')}", f"init={saved}", f"steps={TRAIN_STEPS}",
                 f"log_every={TRAIN_STEPS // 6}", f"checkpoint_every={TRAIN_STEPS}", "eval_every=0", "progress_bar=false",
                 f"data.train={os.path.join(tiny.DATA_DIR, 'train.jsonl')}", "data.eval=null"]
    stages.say("    theworld-train --config configs/tiny.yaml " + " ".join(overrides[1:3]))
    with contextlib.redirect_stdout(_Indented(stages.out)):
        return train(load_config(TINY_CONFIG, overrides))


class _Indented:
    """A text stream that indents every line it passes on."""

    def __init__(self, out):
        self.out, self.start = out, True

    def write(self, text: str) -> int:
        for piece in text.splitlines(keepends=True):
            self.out.write(("    " if self.start else "") + piece)
            self.start = piece.endswith("\n")
        return len(text)

    def flush(self) -> None:
        self.out.flush()


def _ask(model, image, prompt: str, max_new_tokens: int, stages: Stages) -> str:
    """The model's answer about `image`, printed piece by piece as it is produced."""
    from theworld_jax.chat import chat_inputs

    inputs = chat_inputs(model.processor, prompt, image)
    pieces = []
    stages.out.write("    > ")
    for piece in model.generate_stream(**inputs, images=[image], max_new_tokens=max_new_tokens):
        pieces.append(piece)
        stages.out.write(piece.replace("\n", "\n      "))
        stages.out.flush()
    stages.say()
    return "".join(pieces)


def _export_round_trip(saved: str, gemma: str, cosmos: str, workdir: str, stages: Stages) -> tuple[str, str]:
    """`theworld-convert export` of `saved`, then `theworld-convert theworld --projection` from it."""
    from theworld_jax.convert import main as convert

    exported, back = os.path.join(workdir, "theworld-upstream"), os.path.join(workdir, "theworld-from-upstream")
    for argv in (["export", "--src", saved, "--dst", exported],
                 ["theworld", "--gemma", gemma, "--cosmos", cosmos, "--projection", exported, "--dst", back,
                  "--dtype", "float32"]):
        stages.say("    theworld-convert " + " ".join(argv))
        with contextlib.redirect_stdout(None):
            status = convert(argv)
        if status:
            raise SystemExit(f"theworld-convert {argv[0]} failed (exit status {status})")
    return exported, back


def _same_params(a, b) -> bool:
    import numpy as np
    from flax import nnx

    left, right = (dict(nnx.to_flat_state(nnx.state(m, nnx.Param))) for m in (a, b))
    return left.keys() == right.keys() and all(
        np.array_equal(np.asarray(left[k].get_value()), np.asarray(right[k].get_value())) for k in left)


def _count(module) -> int:
    from flax import nnx

    return sum(int(v.get_value().size) for _, v in nnx.to_flat_state(nnx.state(module, nnx.Param)))


def _closing(stages: Stages, workdir: str, real: bool, image: str) -> None:
    say = stages.say
    say(f"\nEverything is under {workdir} (delete it when you are done).")
    if real:
        return
    say("The same on the real models (a GPU or TPU; a HuggingFace token with access to Gemma 3):")
    say(f"  theworld-demo --model {REAL_GEMMA} --cosmos {REAL_COSMOS}")
    say(f"  theworld-chat --model {REAL_GEMMA} --cosmos {REAL_COSMOS} \\\n"
        f"      --image {image} --prompt \"{DEFAULT_PROMPT}\"")
    say(f"  theworld-convert theworld --gemma {REAL_GEMMA} --cosmos {REAL_COSMOS} --dst theworld-4b")
    say("  theworld-train --config configs/theworld-4b-projection.yaml data.train=DATA.jsonl")
    say("  theworld-convert export --src runs/theworld-4b-projection/final --dst theworld-4b-upstream")


def main(argv=None, out=None) -> int:
    args = parse_args(argv)
    run(args, out or sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
