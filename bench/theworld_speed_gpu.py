"""TheWorld speed on one GPU, the PyTorch reference (transformers + diffusers, sdpa) in the same process.

bf16, random weights, gemma-3-4b-it + diffusers' default AutoencoderKLWan + an mlp world projector. Fused
sequence per row: [BOS, SOW, 4,096 world, EOW, 3 text, BOI, 256 image, EOI, 40 text] = 4,400 tokens
(one 896x896 Gemma image, one 512x512 world image already in the VAE's [-1, 1] layout on both sides).
Parts:
- forward: fused forward B=1 with full logits, with the last logits only, with the 40 labelled
  positions only; prefill of a 4,400-token text prompt for generate (theworld_jax.generation, bucketed
  to 4,480; transformers: one forward with logits_to_keep=1 and a cache), B=1;
- train: projector-only training step (AdamW on the world projector, the rest frozen, loss on the 40
  answer tokens from their logits only: logits_to_keep) at B = 1, 2, 4 without remat and B = 8 with
  a named remat policy; the reference at B = 1, 2 (full logits) and B = 4 (logits_to_keep).
JAX is allowed XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 of the card (set before jax loads, printed).

    python -m bench.theworld_speed_gpu --part forward --out bench/results/theworld_speed_forward
    python -m bench.theworld_speed_gpu --tiny --part all            # CPU, tiny models: checks the path
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import traceback

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")

import numpy as np  # noqa: E402

from bench.common import GEMMA3_4B_CONFIG, log, timed, trace_call  # noqa: E402

ANSWER = 40
SOW, EOW = 262145, 262146


def sizes(tiny: bool) -> dict:
    if tiny:
        from tests.helpers.tiny_gemma import tiny_gemma3_config
        from tests.helpers.tiny_vae import TINY_CONFIGS

        return dict(config=tiny_gemma3_config(), vae=TINY_CONFIGS["cosmos_like"], vae_size=32, image=56, mm=4,
                    answer=8, prompt=64, sow=298, eow=299, text=(10, 250))
    import transformers

    return dict(config=transformers.Gemma3Config(**GEMMA3_4B_CONFIG), vae={}, vae_size=512, image=896, mm=256,
                answer=ANSWER, prompt=4400, sow=SOW, eow=EOW, text=(1000, 250000))


def make_batch(z: dict, b: int, seed: int = 0) -> dict:
    """NumPy inputs of one fused row repeated b times (ids with SOW/EOW, before the world splice)."""
    rng = np.random.RandomState(seed)
    cfg = z["config"]
    words = lambda n: list(rng.randint(*z["text"], n))  # noqa: E731
    ids = ([2, z["sow"], z["eow"]] + words(3) + [cfg.boi_token_index] + [cfg.image_token_index] * z["mm"]
           + [cfg.eoi_token_index] + words(z["answer"]))
    ids = np.asarray([ids] * b, np.int64)
    types = (ids == cfg.image_token_index).astype(np.int64)
    labels = np.full_like(ids, -100)
    labels[:, -z["answer"]:] = ids[:, -z["answer"]:]
    pixels = rng.standard_normal((b, 3, z["image"], z["image"])).astype(np.float32)
    video = rng.uniform(-1, 1, (b, 1, z["vae_size"], z["vae_size"], 3)).astype(np.float32)
    return dict(input_ids=ids, attention_mask=np.ones_like(ids), token_type_ids=types, labels=labels,
                pixel_values=pixels, video=video)


def med(fn, wait, warmup: int, repeats: int):
    """(first-call seconds, median seconds of `repeats` calls after `warmup` more)."""
    _, first, median, _ = timed(fn, wait, repeats=repeats, warmup=warmup)
    return first, median


# ------------------------------------------------------------------ PyTorch reference
def torch_side(z, parts, device, repeats):
    import torch

    from tests.helpers import theworld_reference as ref
    import transformers
    from diffusers import AutoencoderKLWan

    log("torch: building")
    cfg = z["config"]
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        gemma = transformers.Gemma3ForConditionalGeneration(cfg).to(torch.bfloat16).eval()
        vae = AutoencoderKLWan(**z["vae"]).to(torch.bfloat16).eval()
        projector = ref.TorchWorldProjector(vae.config.z_dim, cfg.text_config.hidden_size, "mlp").to(torch.bfloat16)
    for p in list(gemma.parameters()) + list(vae.parameters()):
        p.requires_grad_(False)
    model = ref.TheWorldReference(gemma, vae, projector, z["sow"], z["eow"])
    sync = (lambda _: torch.cuda.synchronize()) if device.type == "cuda" else (lambda _: None)

    def inputs(b):
        x = {k: torch.from_numpy(v).to(device) for k, v in make_batch(z, b).items()}
        x["pixel_values"] = x["pixel_values"].to(torch.bfloat16)
        return x

    def fused(x):
        embeds = model.text_and_image_embeddings(x["input_ids"], x["pixel_values"])
        video = x["video"].permute(0, 4, 1, 2, 3).to(torch.bfloat16)  # (B, C, T, H, W)
        world = projector(ref.latents_to_tokens(vae.encode(video).latent_dist.mode(), "spatial"))
        e, m, t, lab = model.splice(embeds, world, x["input_ids"], x["attention_mask"], x["token_type_ids"],
                                    x["labels"])
        return dict(inputs_embeds=e, attention_mask=m, token_type_ids=t, position_ids=ref.positions_from_mask(m)), lab

    out = {}
    if "forward" in parts:
        x = inputs(1)
        with torch.no_grad():
            first, ms = med(lambda: gemma(**fused(x)[0], use_cache=False).logits, sync, 1, repeats)
            out["forward_b1_full_ms"] = ms * 1e3
            first, ms = med(lambda: gemma(**fused(x)[0], use_cache=False, logits_to_keep=z["answer"] + 1).logits,
                            sync, 1, repeats)
            out["forward_b1_labelled_ms"] = ms * 1e3
            ids = torch.from_numpy(np.random.RandomState(1).randint(*z["text"], (1, z["prompt"]))).to(device)
            first, ms = med(lambda: gemma(input_ids=ids, use_cache=True, logits_to_keep=1).logits, sync, 1, repeats)
            out["prefill_b1_ms"] = ms * 1e3
        log(f"torch forward: {out}")
    if "train" in parts:
        projector.train()
        opt = torch.optim.AdamW(projector.parameters(), lr=1e-5)
        for b, keep in ((1, None), (2, None), (4, z["answer"] + 1)):
            x = inputs(b)

            def step():
                inp, lab = fused(x)
                kw = {} if keep is None else dict(logits_to_keep=keep)
                logits = gemma(**inp, use_cache=False, **kw).logits.float()
                loss = ref.causal_lm_loss(logits, lab if keep is None else lab[:, -keep:])
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                return loss

            name = f"train_b{b}_{'full' if keep is None else 'labelled'}"
            try:
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                first, s = med(step, sync, 1, max(2, repeats - 1))
                peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
                out[name] = dict(ms=s * 1e3, tok_s=b * z["prompt"] / s, peak_gib=peak)
            except torch.OutOfMemoryError as e:
                out[name] = dict(error=f"OOM: {str(e)[:120]}")
            gc.collect()
            torch.cuda.empty_cache() if device.type == "cuda" else None
            log(f"torch {name}: {out[name]}")
    del gemma, vae, projector, model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


# ------------------------------------------------------------------ theworld_jax
def jax_side(z, parts, repeats, remat8):
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from theworld_jax.generation import start
    from theworld_jax.inputs import Batch

    log(f"jax {jax.__version__} on {jax.devices()[0]}; XLA_PYTHON_CLIENT_MEM_FRACTION="
        f"{os.environ.get('XLA_PYTHON_CLIENT_MEM_FRACTION')}")
    t0 = time.perf_counter()
    model = random_model(model_factory(z))
    log(f"jax model built in {time.perf_counter() - t0:.1f} s")
    graphdef, state = nnx.split(model)
    wait = jax.block_until_ready
    out = {}

    def device_batch(b):
        x, layout, keep = jax_batch(z, b)
        return {k: jnp.asarray(v) for k, v in x.items()}, layout, jnp.asarray(keep)

    if "forward" in parts:
        x, layout, keep = device_batch(1)
        fwd = forward_program(graphdef, layout)
        for name, args in (("full", (None, None)), ("last", (None, 1)), ("labelled", (keep, None))):
            first, s = med(lambda: fwd(state, x, *args), wait, 1, repeats)
            out[f"forward_b1_{name}_ms"] = s * 1e3
            out[f"forward_b1_{name}_first_s"] = first
            log(f"jax forward {name}: {s * 1e3:.1f} ms (first call {first:.1f} s)")
            trace_call(lambda: fwd(state, x, *args), wait, f"forward_{name}")
        ids = np.random.RandomState(1).randint(*z["text"], (1, z["prompt"]))
        prompt = Batch(input_ids=ids.astype(np.int32), attention_mask=np.ones(ids.shape, np.int32))
        first, s = med(lambda: start(model.gemma, prompt, max_new_tokens=1).state.tokens, wait, 1,
                       repeats)
        out["prefill_b1_ms"], out["prefill_b1_first_s"] = s * 1e3, first
        log(f"jax prefill: {s * 1e3:.1f} ms (first {first:.1f} s)")
        trace_call(lambda: start(model.gemma, prompt, max_new_tokens=1).state.tokens, wait, "prefill")
    if "train" in parts:
        trainable = lambda path, value: "world_projector" in path  # noqa: E731
        tx = optax.adamw(1e-5)
        for b, remat in ((1, "none"), (2, "none"), (4, "none"), (8, remat8)):
            x, layout, keep = device_batch(b)
            graphdef2, params, frozen = nnx.split(model, trainable, ...)

            def loss_fn(params, frozen, x, keep):
                m = nnx.merge(graphdef2, params, frozen)
                return m.forward(**x, logits_to_keep=keep, layout=layout, remat=remat).loss

            @jax.jit
            def step(params, opt_state, frozen, x, keep):
                loss, grads = jax.value_and_grad(loss_fn)(params, frozen, x, keep)
                updates, opt_state = tx.update(grads, opt_state, params)
                return optax.apply_updates(params, updates), opt_state, loss

            opt_state = tx.init(params)
            name = f"train_b{b}_{remat}"
            try:
                t0 = time.perf_counter()
                compiled = step.lower(params, opt_state, frozen, x, keep).compile()
                compile_s = time.perf_counter() - t0
                mem = compiled.memory_analysis()
                carry = [params, opt_state]

                def run():
                    carry[0], carry[1], loss = compiled(carry[0], carry[1], frozen, x, keep)
                    return loss

                first, s = med(run, wait, 1, max(2, repeats - 1))
                loss = float(run())
                stats = jax.devices()[0].memory_stats() or {}
                out[name] = dict(ms=s * 1e3, tok_s=b * z["prompt"] / s, compile_s=compile_s, loss=loss,
                                 temp_gib=None if mem is None else mem.temp_size_in_bytes / 2**30,
                                 peak_gib=stats.get("peak_bytes_in_use", 0) / 2**30)
            except Exception as e:  # noqa: BLE001 - an OOM is a result to report
                out[name] = dict(error=f"{type(e).__name__}: {str(e)[:300]}")
            log(f"jax {name}: {out[name]}")
            del opt_state
            gc.collect()
    return out


def model_factory(z: dict):
    """() -> the bf16 TheWorldModel of sizes `z` (random init; under nnx.eval_shape: its shapes)."""
    import jax.numpy as jnp
    from flax import nnx

    from theworld_jax.config.gemma3 import Gemma3Config
    from theworld_jax.config.theworld import TheWorldConfig
    from theworld_jax.config.wan_vae import WanVAEConfig
    from theworld_jax.modeling.theworld import TheWorldModel

    gemma_config = Gemma3Config.from_dict(z["config"].to_dict())
    vae_config = WanVAEConfig.from_dict(z["vae"])
    config = TheWorldConfig(sow_token_id=z["sow"], eow_token_id=z["eow"], vae_image_size=(z["vae_size"],) * 2)
    return lambda: TheWorldModel.create(config, gemma_config, vae_config, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))


def jax_batch(z: dict, b: int):
    """(host inputs of `make_batch` as the JAX side takes them: float32 -> bfloat16, ints -> int32; the
    fast attention path's layout; the labelled positions (b, K))."""
    import ml_dtypes

    from theworld_jax.attention import block_layout
    from theworld_jax.modeling.fusion import labelled_positions

    x = make_batch(z, b)
    layout = block_layout(x["token_type_ids"], x["attention_mask"])
    keep = np.asarray(labelled_positions(x["labels"]))
    x = {k: v.astype(ml_dtypes.bfloat16 if v.dtype == np.float32 else np.int32) for k, v in x.items()}
    return x, layout, keep


def forward_program(graphdef, layout):
    """jit of (state, inputs, keep, last) -> the fused forward's logits at `keep` ((B, K) positions or None:
    all) or, when the static `last` is an int, at the last `last` positions."""
    import jax
    from flax import nnx

    return jax.jit(lambda s, x, keep, last: nnx.merge(graphdef, s).forward(
        **x, logits_to_keep=keep if last is None else last, layout=layout).logits, static_argnums=3)


def random_model(create):
    """The module `create` builds, every parameter drawn N(0, 0.02^2) by one small jit per shape (jitting
    the whole initialiser took minutes to compile)."""
    import jax
    from flax import nnx

    graphdef, abstract = nnx.split(nnx.eval_shape(create))
    leaves, treedef = jax.tree.flatten(abstract)
    draw = jax.jit(lambda key, shape, dtype: (0.02 * jax.random.normal(key, shape)).astype(dtype), static_argnums=(1, 2))
    keys = jax.random.split(jax.random.PRNGKey(0), len(leaves))
    leaves = [draw(key, leaf.shape, leaf.dtype) for key, leaf in zip(keys, leaves)]
    return nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))


def flops(z: dict, keep: int | None) -> dict:
    """TFLOP per sample, lm_head counted at `keep` positions (None = all). The LM does no weight gradients
    (only the projector trains): train = 2 x (2 N_body L + 2 N_head K) + 3 A + SigLIP + VAE + 6 N_proj 4096,
    A = sum over layers of 4 heads head_dim pairs (causal / window-aware); SigLIP 5.456 and VAE 1.771 TFLOP
    per image as counted by torch.utils.flop_counter on an H100."""
    L, n_body, n_head, w = 4400, 3.209e9, 2560 * 262208, 1024
    attention = 4 * 8 * 256 * (5 * L * (L + 1) / 2 + 29 * (w * (w + 1) / 2 + (L - w) * w))
    head_rows = L if keep is None else keep
    lm = 2 * n_body * L + 2 * n_head * head_rows
    fwd = lm + attention + 5.456e12 + 1.771e12 + 2 * 16 * 2560 * 4096
    train = 2 * lm + 3 * attention + 5.456e12 + 1.771e12 + 6 * (16 * 2560 + 2560 * 2560) * 4096
    return dict(forward=fwd / 1e12, train=train / 1e12)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--part", default="all", choices=("forward", "train", "all"))
    parser.add_argument("--side", default="both", choices=("torch", "jax", "both"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--remat8", default="dots_saveable", help="remat policy of the B=8 training step")
    parser.add_argument("--out", default=None, help="path prefix for .json and .md")
    args = parser.parse_args(argv)
    import torch

    z = sizes(args.tiny)
    parts = ("forward", "train") if args.part == "all" else (args.part,)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    report = dict(part=args.part, tiny=args.tiny, torch=torch.__version__, device=str(device),
                  gpu=torch.cuda.get_device_name() if device.type == "cuda" else None,
                  mem_fraction=os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"],
                  flops_full=flops(z, None), flops_labelled=flops(z, ANSWER),
                  method="first call (compile) reported apart; then 1 warm-up and the median of --repeats calls "
                         "(training: repeats - 1), each closed by block_until_ready / cuda.synchronize")
    try:
        import transformers
        report["transformers"] = transformers.__version__
        if args.side in ("torch", "both"):
            report["torch_side"] = torch_side(z, parts, device, args.repeats)
        if args.side in ("jax", "both"):
            import flax
            import jax
            report.update(jax=jax.__version__, flax=flax.__version__)
            report["jax_side"] = jax_side(z, parts, args.repeats, args.remat8)
    except Exception:  # noqa: BLE001 - keep what was measured
        report["error"] = traceback.format_exc()
        print(report["error"], flush=True)
    text = json.dumps(report, indent=2, default=str)
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out + ".json", "w") as f:
            f.write(text)
    return 0 if "error" not in report else 1


if __name__ == "__main__":
    sys.exit(main())
