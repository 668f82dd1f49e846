"""Generation speed on one GPU: theworld_jax (jit prefill + on-device decode loop) against transformers.

The gemma-3-4b-it config (bench/common.py) with random bfloat16 weights on both sides
(transformers' init with the tied embedding at std 0.02; every JAX parameter N(0, 0.02^2)): speed does not
depend on the values, so the two sides need not share them. Same card, same run, each side in its own
process (theworld_jax first, then transformers), so neither's allocator, autotuning or CUDA state is the
other's: the seventh session measured B=1 decode 8 % slower in this script's process, which then ran
transformers first, than the same program in `bench.decode_profile`'s (`decode_profile.md`).

- Prefill: a --prompt-len (default 4,400) token text prompt at batch 1 and 8: transformers
  `generate(max_new_tokens=1)` against theworld_jax `generation.start` (prefill + first token; the
  prompt is left-padded to its bucket, 4,480). Plus, JAX only, the fused TheWorld prompt of the same
  length: [BOS, <sow>, 4096 world, <eow>, text, BOI, 256 image, EOI, text], VAE (512x512) and SigLIP
  (896x896) run inside the prefill.
- Decode: --new-tokens (128) greedy tokens, all of them forced (transformers: min_new_tokens; ours: no eos
  ids). transformers: (T(generate 128) - T(generate 1)) / 127 per step; ours: the decode loop alone.
- Roofline: bytes read per decode step (LM weights incl. the tied head, plus the whole KV cache, which
  the step reads) over the copy bandwidth measured in the same run (x + 1 on 2 GiB, read + write); the
  transformers rows show the same floor (same weights, a KV cache of about the same size).
- --sampling: the batch-1 decode again with do_sample (top_k=64 top_p=0.95, then top_p=0.95 alone).

Every timing: one warm-up call (its time is reported as the first call), then the median of --repeats.

    python -m bench.generation_gpu --out bench/results/generation_gpu        # on a GPU
    python -m bench.generation_gpu --tiny --out /tmp/generation_gpu           # same path, CPU, tiny
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import numpy as np  # noqa: E402

from bench.common import TEXT_IDS, hf_config, log, timed, write_report  # noqa: E402


def prompt_ids(batch: int, length: int, bos: int, tiny: bool, seed: int) -> np.ndarray:
    low, high = (9, 280) if tiny else TEXT_IDS
    ids = np.random.default_rng(seed).integers(low, high, (batch, length))
    ids[:, 0] = bos
    return ids.astype(np.int64)


def run_torch(args, config, device: str) -> dict:
    import torch
    import transformers

    log(f"building transformers Gemma3ForConditionalGeneration (bfloat16) on {device}")
    torch.manual_seed(args.seed)
    config._attn_implementation = "sdpa"
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):
        model = transformers.Gemma3ForConditionalGeneration(config)
    torch.set_default_dtype(torch.float32)
    model.eval()
    with torch.no_grad():
        model.model.language_model.embed_tokens.weight.normal_(0.0, args.embed_std)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    out = {}
    for b in args.torch_batches:
        ids = torch.from_numpy(prompt_ids(b, args.prompt_len, config.text_config.bos_token_id, args.tiny,
                                          args.seed)).to(device)
        mask = torch.ones_like(ids)

        def gen(n):
            with torch.no_grad():
                res = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                     do_sample=False, pad_token_id=0)
            sync()
            assert res.shape == (b, args.prompt_len + n), res.shape
            return res

        log(f"transformers B={b}: prefill (generate 1)")
        _, p_first, prefill, p_all = timed(lambda: gen(1), repeats=args.repeats)
        log(f"transformers B={b}: generate {args.new_tokens}")
        _, g_first, full, g_all = timed(lambda: gen(args.new_tokens), repeats=args.repeats)
        step = (full - prefill) / (args.new_tokens - 1)
        out[b] = dict(prefill_s=prefill, prefill_first_s=p_first, prefill_all_s=p_all, generate_s=full,
                      generate_first_s=g_first, generate_all_s=g_all, decode_step_s=step,
                      decode_tokens_per_s=b / step, prefill_tokens_per_s=b * args.prompt_len / prefill)
        log(f"  prefill {1e3 * prefill:.1f} ms, decode {1e3 * step:.2f} ms/step, {b / step:.1f} tok/s")
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    del model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return dict(device=device, batches=out, peak_gib=peak, attn_implementation="sdpa")


# ---------------------------------------------------------------- theworld_jax


def copy_bandwidth(tiny: bool) -> dict:
    """Bytes per second of y = y + 1 over a bfloat16 array (read + write), 20 chained calls, median of 5.

    The calls are chained on one buffer: keeping 20 separate 2 GiB outputs alive made every call
    allocate fresh device memory and measured the allocator (0.066 TB/s on an H100), not HBM."""
    import jax
    import jax.numpy as jnp

    n = (2**24 if tiny else 2**30)  # elements: 2 GiB of bfloat16 on the GPU
    add = jax.jit(lambda a: a + 1, donate_argnums=0)
    y = add(jnp.ones((n,), jnp.bfloat16)).block_until_ready()
    calls, runs = 20, []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(calls):
            y = add(y)
        y.block_until_ready()
        runs.append((time.perf_counter() - t0) / calls)
    del y
    seconds = statistics.median(runs)
    return dict(array_bytes=2 * n, seconds_per_call=seconds, bytes_per_s=2 * 2 * n / seconds)


def tree_bytes(tree) -> int:
    import jax

    return int(sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree) if hasattr(x, "dtype")))


def random_model(make, seed: int, std: float):
    """The module `make()` builds, its parameters all drawn N(0, std^2): one small jitted draw per
    distinct (shape, dtype), reused across leaves (one flat draw for 4B parameters compiles for minutes)."""
    import jax
    from flax import nnx

    graphdef, params, rest = nnx.split(nnx.eval_shape(make), nnx.Param, ...)
    if jax.tree_util.tree_leaves(rest):
        raise ValueError("random_model fills parameters only; this module holds other state")
    leaves, treedef = jax.tree_util.tree_flatten(params)
    draw = jax.jit(lambda key, shape, dtype: (std * jax.random.normal(key, shape, jax.numpy.float32)).astype(dtype),
                   static_argnums=(1, 2))
    base = jax.random.key(seed)
    filled = [draw(jax.random.fold_in(base, i), tuple(leaf.shape), leaf.dtype) for i, leaf in enumerate(leaves)]
    return nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, filled))


def run_jax(args, config) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from theworld_jax import generation
    from theworld_jax.config.gemma3 import Gemma3Config
    from theworld_jax.inputs import InputSpec, prepare_batch
    from theworld_jax.modeling.gemma3 import Gemma3Model

    device = jax.devices()[0]
    log(f"building theworld_jax Gemma3Model (bfloat16) on {device}")
    cfg = Gemma3Config.from_dict(config.to_dict())
    t0 = time.perf_counter()
    model = random_model(lambda: Gemma3Model(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)), args.seed, args.param_std)
    jax.block_until_ready(nnx.state(model))
    build_s = time.perf_counter() - t0
    bandwidth = copy_bandwidth(args.tiny)
    log(f"copy bandwidth {bandwidth['bytes_per_s'] / 1e12:.3f} TB/s")
    weight_bytes = tree_bytes(nnx.state(model.language_model, nnx.Param))
    kw = dict(max_new_tokens=args.new_tokens, eos_token_id=())
    spec = InputSpec(cfg, dtype=jnp.bfloat16)
    out = {}
    for b in args.batches:
        batch = prepare_batch(spec, prompt_ids(b, args.prompt_len, cfg.text.bos_token_id, args.tiny, args.seed))
        log(f"theworld_jax B={b}: prefill")
        _, p_first, prefill, p_all = timed(lambda: generation.start(model, batch, **kw), repeats=args.repeats)
        decodings = [generation.start(model, batch, **kw) for _ in range(args.repeats + 1)]
        cache_bytes = tree_bytes(decodings[0].state.cache)
        log(f"theworld_jax B={b}: decode {args.new_tokens - 1} steps")
        _, d_first, decode, d_all = timed(lambda: _advance_all(decodings.pop()), repeats=args.repeats)
        step = decode / (args.new_tokens - 1)
        bytes_per_step = weight_bytes + cache_bytes
        floor = bytes_per_step / bandwidth["bytes_per_s"]
        out[b] = dict(prefill_s=prefill, prefill_first_s=p_first, prefill_all_s=p_all, decode_s=decode,
                      decode_first_s=d_first, decode_all_s=d_all, decode_step_s=step, decode_tokens_per_s=b / step,
                      prefill_tokens_per_s=b * args.prompt_len / prefill,
                      bucket_length=generation.BucketPolicy().length(args.prompt_len),
                      roofline=dict(weight_bytes=weight_bytes, cache_bytes=cache_bytes, bytes_per_step=bytes_per_step,
                                    floor_step_s=floor, fraction_of_floor=floor / step))
        log(f"  prefill {1e3 * prefill:.1f} ms, decode {1e3 * step:.2f} ms/step ({b / step:.1f} tok/s), "
            f"roofline {1e3 * floor:.2f} ms/step")
        del decodings
    sampled = {} if not args.sampling else run_sampling(args, model, spec, kw, out)
    world = None if args.skip_world else run_world(args, model, cfg)
    stats = device.memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return dict(device=str(device), device_kind=device.device_kind, build_s=build_s, copy_bandwidth=bandwidth,
                batches=out, sampling=sampled, world_prefill=world, peak_gib=None if peak is None else peak / 2**30,
                jax_version=jax.__version__)


def run_sampling(args, model, spec, kw: dict, greedy: dict) -> dict:
    """Decode ms/step at batch 1 with sampling on, against the greedy step of the same run."""
    from theworld_jax import generation
    from theworld_jax.inputs import prepare_batch

    batch = prepare_batch(spec, prompt_ids(1, args.prompt_len, spec.gemma.text.bos_token_id, args.tiny, args.seed))
    out = {}
    for name, extra in (("top_k=64 top_p=0.95", dict(top_k=64, top_p=0.95)), ("top_p=0.95", dict(top_p=0.95))):
        sample_kw = dict(kw, do_sample=True, temperature=1.0, **extra)
        decodings = [generation.start(model, batch, **sample_kw) for _ in range(args.repeats + 1)]
        log(f"theworld_jax B=1 sampling {name}: decode {args.new_tokens - 1} steps")
        _, first, decode, times = timed(lambda: _advance_all(decodings.pop()), repeats=args.repeats)
        step = decode / (args.new_tokens - 1)
        base = greedy[1]["decode_step_s"] if 1 in greedy else None
        out[name] = dict(decode_step_s=step, decode_all_s=times, greedy_step_s=base,
                         extra_fraction=None if base is None else (step - base) / step)
        log(f"  {1e3 * step:.3f} ms/step" + ("" if base is None else f" (greedy {1e3 * base:.3f})"))
        del decodings
    return out


def _advance_all(decoding) -> None:
    decoding.advance()
    if decoding.produced != decoding.max_new_tokens:
        raise RuntimeError(f"decoding stopped after {decoding.produced} tokens, expected {decoding.max_new_tokens}")


def run_world(args, model, cfg) -> dict:
    """Prefill of the fused TheWorld prompt (VAE + SigLIP + splice + LM) at batch 1, JAX only."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from theworld_jax import generation
    from theworld_jax.config.theworld import TheWorldConfig
    from theworld_jax.config.wan_vae import WanVAEConfig
    from theworld_jax.inputs import Batch
    from theworld_jax.modeling.cosmos_vae import CosmosVAE
    from theworld_jax.modeling.theworld import TheWorldModel, make_world_projector
    from theworld_jax.modeling.world_projector import num_world_tokens

    size = (32, 32) if args.tiny else (512, 512)
    vae_cfg = (WanVAEConfig(base_dim=8, z_dim=4, dim_mult=(1, 2, 2, 2), num_res_blocks=1) if args.tiny
               else WanVAEConfig())
    vocab = cfg.text.vocab_size
    sow, eow = (vocab - 2, vocab - 1) if args.tiny else (262145, 262146)
    world_cfg = TheWorldConfig(gemma_model_name=None, cosmos_model_name=None, vae_image_size=size,
                               sow_token_id=sow, eow_token_id=eow)
    log("building the Cosmos VAE and the world projector (bfloat16)")
    vae = random_model(lambda: CosmosVAE(vae_cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)), args.seed + 1,
                       args.param_std)
    projector = random_model(lambda: make_world_projector(world_cfg, cfg, vae_cfg, dtype=jnp.bfloat16,
                                                          rngs=nnx.Rngs(0)), args.seed + 2, args.param_std)
    world_model = TheWorldModel(world_cfg, model, vae, projector)
    n_world = num_world_tokens("spatial", vae_cfg, size)
    n_img = cfg.mm_tokens_per_image
    rest = args.prompt_len - n_world - n_img - 6
    if rest < 2:
        raise SystemExit(f"--prompt-len {args.prompt_len} leaves no room for text around {n_world} world and "
                         f"{n_img} image tokens")
    text = prompt_ids(1, rest, cfg.text.bos_token_id, args.tiny, args.seed)[0, 1:]
    ids = np.concatenate([[cfg.text.bos_token_id, sow, eow], text[:3], [cfg.boi_token_id],
                          np.full(n_img, cfg.image_token_id), [cfg.eoi_token_id], text[3:]])[None]
    types = (ids == cfg.image_token_id).astype(np.int32)
    rng = np.random.default_rng(args.seed)
    side = cfg.vision.image_size
    pixels = rng.uniform(-1, 1, (1, 3, side, side)).astype(np.float32)
    video = rng.uniform(-1, 1, (1, 1, *size, 3)).astype(np.float32)
    batch = Batch(ids.astype(np.int32), np.ones_like(ids, np.int32), types,
                  pixel_values=jnp.asarray(pixels, jnp.bfloat16), video=jnp.asarray(video, jnp.bfloat16),
                  world_tokens=n_world)
    kw = dict(max_new_tokens=args.new_tokens, eos_token_id=())
    log(f"theworld_jax fused prefill: {ids.shape[1]} ids + {n_world} world tokens")
    _, first, prefill, times = timed(lambda: generation.start(world_model, batch, **kw), repeats=args.repeats)
    log(f"  fused prefill {1e3 * prefill:.1f} ms")
    del world_model, vae
    jax.clear_caches()
    return dict(fused_length=int(ids.shape[1] + n_world), world_tokens=n_world, image_tokens=n_img,
                vae_image_size=list(size), prefill_s=prefill, prefill_first_s=first, prefill_all_s=times)


# ---------------------------------------------------------------- report


def markdown(r: dict) -> str:
    t, j = r.get("torch"), r["jax"]
    lines = [f"# Generation speed: theworld_jax vs transformers ({r['config']})", "",
             f"Device: {r['gpu'] or j['device']} ({j['device_kind']}); jax {j['jax_version']}, torch "
             f"{r['versions']['torch']}, transformers {r['versions']['transformers']}. bfloat16, random weights, "
             f"greedy; prompt {r['prompt_len']} text tokens (JAX pads it to its bucket), {r['new_tokens']} new tokens "
             f"forced. Median of {r['repeats']} after one warm-up.", "",
             "| batch | side | prefill ms | prefill tok/s | decode ms/step | decode tok/s | decode roofline ms/step "
             "(roofline / measured) | first call s (prefill / rest) |",
             "|---|---|---|---|---|---|---|---|"]
    for b in r["batches"]:
        jb = j["batches"][b]
        floor = jb["roofline"]["floor_step_s"]
        lines.append(f"| {b} | theworld_jax | {1e3 * jb['prefill_s']:.1f} | {jb['prefill_tokens_per_s']:,.0f} | "
                     f"{1e3 * jb['decode_step_s']:.2f} | {jb['decode_tokens_per_s']:,.1f} | "
                     f"{1e3 * floor:.2f} ({100 * floor / jb['decode_step_s']:.0f}%) | "
                     f"{jb['prefill_first_s']:.1f} / {jb['decode_first_s']:.1f} |")
        if t is not None and b in t["batches"]:
            tb = t["batches"][b]
            lines.append(f"| {b} | transformers ({t['attn_implementation']}) | {1e3 * tb['prefill_s']:.1f} | "
                         f"{tb['prefill_tokens_per_s']:,.0f} | {1e3 * tb['decode_step_s']:.2f} | "
                         f"{tb['decode_tokens_per_s']:,.1f} | {1e3 * floor:.2f} ({100 * floor / tb['decode_step_s']:.0f}%) | "
                         f"{tb['prefill_first_s']:.1f} / {tb['generate_first_s']:.1f} |")
            lines.append(f"| {b} | speed-up | {tb['prefill_s'] / jb['prefill_s']:.2f}x | | "
                         f"{tb['decode_step_s'] / jb['decode_step_s']:.2f}x | | | |")
    bw = j["copy_bandwidth"]
    lines += ["", f"Roofline (decode, bytes read per step / copy bandwidth {bw['bytes_per_s'] / 1e12:.3f} TB/s):", "",
              "| batch | weights GB | KV cache GB | floor ms/step | measured ms/step | measured / floor |",
              "|---|---|---|---|---|---|"]
    for b, jb in j["batches"].items():
        rf = jb["roofline"]
        lines.append(f"| {b} | {rf['weight_bytes'] / 1e9:.3f} | {rf['cache_bytes'] / 1e9:.3f} | "
                     f"{1e3 * rf['floor_step_s']:.2f} | {1e3 * jb['decode_step_s']:.2f} | "
                     f"{jb['decode_step_s'] / rf['floor_step_s']:.2f}x |")
    for name, sv in (j.get("sampling") or {}).items():
        lines += ["", f"Sampling at batch 1 ({name}, temperature 1): {1e3 * sv['decode_step_s']:.2f} ms/step against "
                  f"greedy {1e3 * sv['greedy_step_s']:.2f} ms/step: {100 * sv['extra_fraction']:.1f}% of the step."]
    w = j.get("world_prefill")
    if w:
        lines += ["", f"TheWorld fused prefill (JAX, batch 1): {w['fused_length']} tokens ({w['world_tokens']} world "
                  f"from a {w['vae_image_size'][0]}x{w['vae_image_size'][1]} VAE input, {w['image_tokens']} image): "
                  f"{1e3 * w['prefill_s']:.1f} ms including VAE and SigLIP (first call {w['prefill_first_s']:.1f} s)."]
    lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="directory for generation_gpu.json and .md")
    parser.add_argument("--tiny", action="store_true", help="the tiny test config on CPU (checks the script)")
    parser.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (default 4400; tiny 48)")
    parser.add_argument("--new-tokens", type=int, default=None, help="new tokens (default 128; tiny 8)")
    parser.add_argument("--batches", type=int, nargs="+", default=None, help="batch sizes (default 1 8 32; tiny 1 2)")
    parser.add_argument("--torch-batches", type=int, nargs="+", default=None,
                        help="batch sizes for transformers (default: --batches without 32)")
    parser.add_argument("--sampling", action="store_true", help="also decode with sampling at batch 1")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--embed-std", type=float, default=0.02, help="std of transformers' tied embedding")
    parser.add_argument("--param-std", type=float, default=0.02, help="std of every JAX parameter")
    parser.add_argument("--skip-torch", action="store_true")
    parser.add_argument("--skip-world", action="store_true", help="skip the fused TheWorld prefill")
    parser.add_argument("--worker", choices=("jax", "torch"), help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.prompt_len = args.prompt_len or (48 if args.tiny else 4400)
    args.new_tokens = args.new_tokens or (8 if args.tiny else 128)
    args.batches = args.batches or ([1, 2] if args.tiny else [1, 8, 32])
    args.torch_batches = args.torch_batches or [b for b in args.batches if b != 32]
    if args.new_tokens < 2:
        raise SystemExit("--new-tokens must be at least 2 (decode time is measured over new_tokens - 1 steps)")
    import torch

    if args.tiny:
        torch.set_num_threads(1)
    import transformers

    config = hf_config(args.tiny)
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    report = dict(config="tiny test config" if args.tiny else "gemma-3-4b-it config, random weights",
                  prompt_len=args.prompt_len, new_tokens=args.new_tokens, batches=args.batches, repeats=args.repeats,
                  versions=dict(torch=torch.__version__, transformers=transformers.__version__,
                                python=platform.python_version()),
                  gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
    if args.worker:
        result = run_jax(args, config) if args.worker == "jax" else run_torch(args, config, device)
        with open(args.result, "w") as f:
            json.dump(result, f, default=str)
        return 0
    argv = list(sys.argv[1:] if argv is None else argv)
    report["jax"] = _in_own_process(argv, "jax")
    report["torch"] = None if args.skip_torch else _in_own_process(argv, "torch")
    text = markdown(report)
    print(text)
    if args.out:
        write_report(args.out, "generation_gpu", report, text)
    return 0


def _in_own_process(argv: list[str], side: str) -> dict:
    """This script's `side` run in a child process with the same arguments -> its result."""
    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, f"{side}.json")
        cmd = [sys.executable, "-m", "bench.generation_gpu", *argv, "--worker", side, "--result", result]
        subprocess.run(cmd, check=True)
        with open(result) as f:
            out = json.load(f)
    out["batches"] = {int(b): v for b, v in out["batches"].items()}  # JSON made the batch keys strings
    return out


if __name__ == "__main__":
    raise SystemExit(main())
