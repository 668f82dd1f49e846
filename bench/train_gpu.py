"""Projector-only training of the full-size TheWorld through the launcher's own step, and a PyTorch
reference step, on one GPU (issue 11, point 8).

Random weights in the real sizes: the gemma-3-4b-it config (tests/helpers/full_size.py), diffusers'
default AutoencoderKLWan (the Cosmos-Predict2 VAE), an mlp projector 16 -> 2560; bf16 compute, the
projector's float32 master weights trained with AdamW; everything else frozen. Each sample is one chat
row of the launcher's data pipeline: one 896x896 image (256 soft tokens), ~40 text tokens (the answer,
~20 tokens, is the target), the two world markers and 4,096 world tokens (512x512 -> 64x64 latents):
~4,400 fused tokens, padded to a multiple of 128 (what the cuDNN calls take; 16 or 64 in the pad variants).
Logits are computed at the labelled positions only.

JAX side: `theworld_jax.train.loop.setup` on configs/theworld-4b-projection.yaml (`model.random_init`:
the model is drawn in seconds), then the launcher's compiled `TrainStep` on the launcher's own batches.
Batches 1, 2, 4 without remat and 8 with `--remat8` (dots_saveable by default). PyTorch side:
transformers' Gemma3ForConditionalGeneration (sdpa) + diffusers' VAE + the projector, the same shapes
and target count, logits on the labelled tokens only, bf16 weights, the projector under autocast, AdamW;
gradient checkpointing where the JAX side remats. Every (side, batch) runs in its own subprocess, so the
peak memory is that run's and one side's memory never starves the other.

    python -m bench.train_gpu --out bench/results/train_gpu [--side jax|torch|both] [--batches 1,2,4,8]
    python -m bench.train_gpu --out /tmp/train_smoke --cpu-smoke      # the same code on CPU, tiny models

Reported per run: the first step's seconds (trace + compile + one step), the median step of the next
`--steps` - 1 (device-synchronised), the mean step of `--window` more steps run back to back (no
synchronisation between them, as a training loop runs), tokens/s (real fused tokens, world tokens included, padding not),
MFU = model FLOPs (`model_flops`, below) / step time / the card's dense bf16 peak, and peak device memory.
Writes train_gpu.json and train_gpu.md under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEAK_BF16 = {"H200": 989e12, "H100": 989e12}  # FLOP/s, NVIDIA's dense bf16 figures (SXM)
TARGET_WORDS = 20  # answer words: the target tokens of a row
PROMPT_WORDS = 16


# ---------------------------------------------------------------- FLOPs

def model_flops(text: dict, vision: dict, seq: int, targets: int) -> dict:
    """Model FLOPs of one projector-only training sample of `seq` fused tokens (2 FLOPs a multiply-add).

    The frozen LM still back-propagates to its inputs (the world tokens' gradient flows through every
    layer): the backward computes dX only, the forward's matmuls once more, and the attention backward
    about twice its forward. Attention counted as computed usefully: the causal half for full layers,
    the window for sliding ones. The LM head on the `targets` kept positions only, forward and dX. SigLIP
    forward (frozen, no backward). The VAE encoder and the projector are not counted (the VAE is
    convolutions at 512x512, the projector 16 -> 2560 -> 2560 on 4,096 tokens: <1 % of the total).
    Rematerialisation recomputes are not model FLOPs and are not counted.
    """
    d, hd, h, kv, ff = (text[k] for k in ("hidden_size", "head_dim", "num_attention_heads", "num_key_value_heads",
                                          "intermediate_size"))
    layers = text["num_hidden_layers"]
    per_token_layer = 2 * (d * hd * (2 * h + 2 * kv) + 3 * d * ff)
    matmul = per_token_layer * layers * seq
    full = sum(1 for x in text["layer_types"] if x == "full_attention")
    context = full * seq / 2 + (layers - full) * min(text["sliding_window"], seq / 2)
    attention = 4 * seq * h * hd * context  # QK^T and PV
    head = 2 * d * text["vocab_size"] * targets
    patches = (vision["image_size"] // vision["patch_size"]) ** 2
    vd = vision["hidden_size"]
    siglip = vision["num_hidden_layers"] * (2 * patches * (4 * vd * vd + 2 * vd * vision["intermediate_size"])
                                           + 4 * patches * patches * vd)
    forward = matmul + attention + head
    backward = matmul + 2 * attention + head
    return {"lm_forward": forward, "lm_backward_dx": backward, "siglip_forward": siglip,
            "total": forward + backward + siglip}


# ---------------------------------------------------------------- the work directory

def write_work(work: str, smoke: bool, rows: int) -> dict:
    """model/ (Gemma 3 config.json + processor files; no weights), vae.json, data/train.jsonl + images."""
    import transformers
    from PIL import Image

    from theworld_jax import tiny

    model_dir = os.path.join(work, "model")
    os.makedirs(model_dir, exist_ok=True)
    if smoke:
        gemma = tiny.gemma3_config_dict()
        processor = tiny.build_processor()
        vae = tiny.wan_vae_config().to_dict()
        side, vocab = 56, 250
    else:
        from bench.theworld_gpu_parity import full_processor
        from tests.helpers.full_size import GEMMA3_4B_CONFIG

        hf_config = transformers.Gemma3Config(**GEMMA3_4B_CONFIG)
        gemma = hf_config.to_dict()
        processor = full_processor()
        processor.chat_template = tiny.CHAT_TEMPLATE
        from theworld_jax.config.wan_vae import WanVAEConfig

        vae = WanVAEConfig().to_dict()
        side, vocab = 448, 250000
    processor.save_pretrained(model_dir)
    if smoke:
        with open(os.path.join(model_dir, "config.json"), "w") as f:
            json.dump(gemma, f, indent=1)
    else:
        hf_config.save_pretrained(model_dir)
    with open(os.path.join(work, "vae.json"), "w") as f:
        json.dump(vae, f, indent=1)
    rng = np.random.default_rng(0)
    os.makedirs(os.path.join(work, "data", "images"), exist_ok=True)
    words = (lambda n: " ".join(f"w{k}" for k in rng.integers(1000, vocab, n))) if not smoke else \
        (lambda n: " ".join(rng.choice(["red", "ball", "the", "over", "grass", "a", "cat"], n)))
    with open(os.path.join(work, "data", "train.jsonl"), "w") as f:
        for i in range(rows):
            name = f"images/img{i}.png"
            Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(
                os.path.join(work, "data", name))
            f.write(json.dumps({"image": name, "messages": [
                {"role": "user", "content": words(PROMPT_WORDS)},
                {"role": "assistant", "content": words(TARGET_WORDS)}]}) + "\n")
    return {"text": gemma["text_config"], "vision": gemma["vision_config"],
            "mm_tokens_per_image": gemma["mm_tokens_per_image"]}


# ---------------------------------------------------------------- the JAX side (a worker process)

def jax_worker(args) -> dict:
    from theworld_jax.jit import set_process_xla_flags

    set_process_xla_flags()  # as the launcher (cli.prepare_jax), before JAX starts its backend
    import jax

    from bench import train_variants
    from bench.common import ClockLog, trace_call

    train_variants.apply(args.variant)
    from theworld_jax.train import loop
    from theworld_jax.train.config import load_config

    overrides = [f"output_dir={os.path.join(args.work, f'run-{args.batch}-{args.variant}')}",
                 f"model.name={os.path.join(args.work, 'model')}", "model.random_init=true",
                 f"model.cosmos_model_name={os.path.join(args.work, 'vae.json')}",
                 f"data.train={os.path.join(args.work, 'data', 'train.jsonl')}", "data.eval=null",
                 f"steps={args.steps}", f"data.batch_size={args.batch}", "optimizer.accumulation=1",
                 f"model.remat={args.remat}", "data.pad_multiple=8", "progress_bar=false", "save_final=false",
                 "optimizer.warmup_steps=1", "data.num_threads=8"]
    if args.cpu_smoke:
        overrides += ["model.dtype=float32", "model.vae_image_size=[32,32]", "data.max_length=512"]
    config = load_config(os.path.join(REPO, "configs", "theworld-4b-projection.yaml"), overrides)
    t0 = time.perf_counter()
    run, state, _, _ = loop.setup(config)
    setup_s = time.perf_counter() - t0
    prepared = [loop.local_batch(run, s) for s in range(args.steps)]
    params, opt_state = state["params"], state["opt_state"]
    times, dispatch, losses, stamps = [], [], [], []
    with ClockLog() as clocks:
        for local, _ in prepared:
            batch = loop.to_global(run.mesh, local)
            stamps.append(time.time())
            t0 = time.perf_counter()
            params, opt_state, out = run.train_step.step(params, opt_state, run.split.frozen, batch)
            dispatch.append(time.perf_counter() - t0)
            jax.block_until_ready((params, out))
            times.append(time.perf_counter() - t0)
            losses.append(float(out["loss"]))
        stamps.append(time.time())
        placed = [loop.to_global(run.mesh, local) for local, _ in prepared]
        jax.block_until_ready(placed)
        window_start, t0 = time.time(), time.perf_counter()
        for i in range(args.window):  # as the launcher runs: no synchronisation between steps
            params, opt_state, out = run.train_step.step(params, opt_state, run.split.frozen, placed[i % len(placed)])
        jax.block_until_ready((params, out))
        window_step_s = (time.perf_counter() - t0) / max(args.window, 1)
        clock = {"steps": clocks.summary(stamps[min(1, len(stamps) - 2)], stamps[-1]),
                 "back_to_back": clocks.summary(window_start, time.time())}
    stats = jax.local_devices()[0].memory_stats() or {}
    local, tokens = prepared[0]
    world = run.theworld.num_world_tokens(1)
    result = {"side": "jax", "batch": args.batch, "remat": args.remat, "variant": args.variant,
              "setup_s": setup_s, "first_step_s": times[0],
              "step_s": times[1:], "median_step_s": statistics.median(times[1:] or times), "losses": losses,
              "median_dispatch_s": statistics.median(dispatch[1:] or dispatch),
              "window_step_s": window_step_s if args.window else None, "fused_tokens_per_row": tokens / args.batch, "padded_length": run.sampler.step(0).length,
              "world_tokens": world, "image_tokens": run.theworld.gemma_config.mm_tokens_per_image,
              "keep": run.keep, "target_tokens_per_row": int(out["target_tokens"]) / args.batch,
              "trained_parameters": sum(int(np.prod(v.shape)) for v in params.values()),
              "compiles": run.train_step.compiles, "peak_memory_gib": stats.get("peak_bytes_in_use", 0) / 2 ** 30,
              "clock": clock, "device": jax.devices()[0].device_kind, "jax": jax.__version__}
    batch = loop.to_global(run.mesh, prepared[-1][0])
    trace_call(lambda: run.train_step.step(params, opt_state, run.split.frozen, batch), jax.block_until_ready,
               f"train_b{args.batch}_{args.remat}_{args.variant}")
    return result


# ---------------------------------------------------------------- the PyTorch side (a worker process)

def torch_worker(args, shape: dict) -> dict:
    """One projector-only AdamW step per iteration: VAE encode (no grad), projector (autocast), world tokens
    spliced after <bos>, Gemma 3 with the image (sdpa, image blocks bidirectional through token_type_ids),
    hidden states at the labelled positions through the LM head, float32 cross-entropy, backward, step."""
    import torch
    import transformers
    from diffusers import AutoencoderKLWan

    from bench.common import ClockLog
    from tests.helpers.theworld_reference import TorchWorldProjector

    torch.manual_seed(0)
    device = "cpu" if args.cpu_smoke else "cuda"
    dtype = torch.float32 if args.cpu_smoke else torch.bfloat16
    with open(os.path.join(args.work, "model", "config.json")) as f:
        config = transformers.Gemma3Config.from_dict(json.load(f))
    config._attn_implementation = "sdpa"
    with open(os.path.join(args.work, "vae.json")) as f:
        vae_cfg = {k: v for k, v in json.load(f).items() if not k.startswith("_")}
    with torch.device(device):
        gemma = transformers.Gemma3ForConditionalGeneration(config).to(dtype)
        vae = AutoencoderKLWan(**vae_cfg).to(dtype)
        projector = TorchWorldProjector(vae_cfg["z_dim"], config.text_config.hidden_size, "mlp")
    gemma.requires_grad_(False)
    vae.requires_grad_(False)
    if args.remat != "none":
        gemma.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        gemma.train()
    opt = torch.optim.AdamW(projector.parameters(), lr=1e-4, weight_decay=0.01)
    b, n_world = args.batch, shape["world_tokens"]
    text_len = shape["text_tokens"]
    image_id, mm = config.image_token_index, config.mm_tokens_per_image
    ids = torch.randint(10, min(config.text_config.vocab_size - 10, 250000), (b, text_len), device=device)
    ids[:, 0] = config.text_config.bos_token_id
    ids[:, 5:5 + mm] = image_id
    labelled = torch.zeros((b, text_len), dtype=torch.bool, device=device)
    labelled[:, -shape["targets"] - 1:-1] = True  # position p predicts ids[p + 1]
    side = config.vision_config.image_size
    pixels = torch.randn(b, 3, side, side, device=device, dtype=dtype)
    vae_side = shape["vae_side"]
    video = torch.rand(b, 3, 1, vae_side, vae_side, device=device, dtype=dtype) * 2 - 1
    embed = gemma.get_input_embeddings()
    markers = embed(torch.tensor([[262145 % config.text_config.vocab_size, 262146 % config.text_config.vocab_size]],
                                 device=device)).expand(b, 2, -1)

    def step():
        with torch.no_grad():
            latents = vae.encode(video).latent_dist.mean  # (B, z, 1, h, w)
            embeds = embed(ids)
            feats = gemma.model.get_image_features(pixel_values=pixels)
            feats = getattr(feats, "pooler_output", feats)
            embeds = embeds.masked_scatter((ids == image_id)[..., None], feats.to(embeds.dtype))
        tokens = latents.flatten(2).transpose(1, 2).float()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=not args.cpu_smoke):
            world = projector(tokens).to(embeds.dtype)
        full = torch.cat([embeds[:, :1], markers[:, :1], world, markers[:, 1:], embeds[:, 1:]], 1)
        types = torch.cat([torch.zeros((b, n_world + 3), dtype=torch.long, device=device),
                           (ids[:, 1:] == image_id).long()], 1)
        hidden = gemma.model(inputs_embeds=full, token_type_ids=types).last_hidden_state
        hidden = hidden[:, n_world + 2:]  # back to the ids' positions (the markers and world tokens are no targets)
        logits = gemma.lm_head(hidden[labelled]).float()
        loss = torch.nn.functional.cross_entropy(logits, ids[:, 1:][labelled[:, :-1]])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, losses, stamps = [], [], []
    with ClockLog() as clocks:
        for _ in range(args.steps):
            sync()
            stamps.append(time.time())
            t0 = time.perf_counter()
            losses.append(step().item())
            sync()
            times.append(time.perf_counter() - t0)
        stamps.append(time.time())
        sync()
        window_start, t0 = time.time(), time.perf_counter()
        for _ in range(args.window):  # no .item() between steps
            step()
        sync()
        window_step_s = (time.perf_counter() - t0) / max(args.window, 1)
        clock = {"steps": clocks.summary(stamps[min(1, len(stamps) - 2)], stamps[-1]),
                 "back_to_back": clocks.summary(window_start, time.time())}
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device == "cuda" else 0.0
    remat = "none" if args.remat == "none" else "gradient checkpointing"
    return {"side": "torch", "batch": b, "remat": remat, "first_step_s": times[0], "step_s": times[1:],
            "median_step_s": statistics.median(times[1:] or times), "losses": losses,
            "window_step_s": window_step_s if args.window else None, "fused_tokens_per_row": text_len + n_world + 2, "target_tokens_per_row": shape["targets"],
            "peak_memory_gib": peak, "clock": clock, "torch": torch.__version__, "transformers": transformers.__version__,
            "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu"}


# ---------------------------------------------------------------- the driver

def result_name(side: str, batch: int, variant: str, process: int) -> str:
    """A worker's result file: jax_b1.json, jax_b1_pad16.json, jax_b1_p2.json (the third of --processes)."""
    return f"{side}_b{batch}{'' if variant == 'plain' else '_' + variant}{f'_p{process}' if process else ''}.json"


def run_worker(args, side: str, batch: int, remat: str, shape: dict | None, variant: str = "plain",
               process: int = 0) -> dict:
    out = os.path.join(args.out, result_name(side, batch, variant, process))
    cmd = [sys.executable, "-m", "bench.train_gpu", "--worker", side, "--batch", str(batch), "--remat", remat,
           "--work", args.work, "--out", args.out, "--steps", str(args.steps), "--window", str(args.window),
           "--variant", variant, "--process", str(process)]
    if args.cpu_smoke:
        cmd.append("--cpu-smoke")
    if shape is not None:
        cmd += ["--shape", json.dumps(shape)]
    print(f"[{time.strftime('%H:%M:%S')}] {side} B={batch} remat={remat} variant={variant} process={process}",
          flush=True)
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), PYTHONUNBUFFERED="1")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, text=True, capture_output=True)
    if proc.returncode or not os.path.exists(out):
        tail = (proc.stdout + proc.stderr)[-3000:]
        print(tail, flush=True)
        lines = [line for line in tail.splitlines() if line.strip()]
        return {"side": side, "batch": batch, "remat": remat, "variant": variant, "process": process,
                "error": lines[-1] if lines else f"rc {proc.returncode}"}
    with open(out) as f:
        result = json.load(f)
    result["process"] = process
    result["process_s"] = time.perf_counter() - t0
    print(json.dumps({k: v for k, v in result.items() if k not in ("step_s", "losses")}), flush=True)
    return result


def add_rates(result: dict, flops_of, peak: float | None) -> dict:
    if "error" in result:
        return result
    seq = result["fused_tokens_per_row"]
    flops = flops_of(seq, result["target_tokens_per_row"])
    result["tokens_per_s"] = seq * result["batch"] / result["median_step_s"]
    window = result.get("window_step_s")
    result["window_tokens_per_s"] = seq * result["batch"] / window if window else None
    result["model_tflop_per_row"] = flops["total"] / 1e12
    result["mfu"] = flops["total"] * result["batch"] / result["median_step_s"] / peak if peak else None
    return result


def markdown(report: dict) -> str:
    lines = ["# Projector-only training of the full-size TheWorld (bench/train_gpu.py)", "",
             f"Machine: {report['device']}; {report['versions']}. Command: `{report['command']}`.",
             f"Each row: {report['shape']['fused_tokens']} fused tokens ({report['shape']['world_tokens']} world, "
             f"{report['shape']['image_tokens']} image, the rest text; {report['shape']['targets']} target tokens), "
             "padded on the JAX side to a multiple of 128 (pad16 / pad64: 16 / 64; PyTorch: unpadded). "
             "Step = median of the timed steps after the first (device-synchronised); first step = trace + "
             "compile + one step; MFU = model FLOPs / step time / "
             f"{report['peak_flops'] / 1e12 if report['peak_flops'] else 'n/a'} TFLOP/s dense bf16. "
             "Back-to-back = --window more steps dispatched without a synchronisation between them (as a training "
             "loop runs them: the host's dispatch overlaps the device's work), total time / steps. SM clock = "
             "median of nvidia-smi's 100 ms samples over the timed steps / the back-to-back ones, with the share "
             "of samples under the software power cap.", "",
             "| side | batch | remat | step (ms) | tokens/s | back-to-back step (ms) | tokens/s | MFU | "
             "peak memory (GiB) | first step (s) | SM clock (MHz; power-capped) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["runs"]:
        if "error" in r:
            lines.append(f"| {_side(r)} | {r['batch']} | {r['remat']} | error: {r['error'][:160]} | | | | | | | |")
            continue
        mfu = f"{100 * r['mfu']:.1f} %" if r.get("mfu") is not None else "n/a"
        window = (f"{1000 * r['window_step_s']:.1f} | {r['window_tokens_per_s']:,.0f}" if r.get("window_step_s")
                  else "n/a | n/a")
        lines.append(f"| {_side(r)} | {r['batch']} | {r['remat']} | {1000 * r['median_step_s']:.1f} | "
                     f"{r['tokens_per_s']:,.0f} | {window} | {mfu} | {r['peak_memory_gib']:.1f} | "
                     f"{r['first_step_s']:.1f} | {_clock(r.get('clock'))} |")
    return "\n".join(lines + summary_lines(report["runs"])) + "\n"


def _clock(clock: dict | None) -> str:
    """'1,665 (100 %) / 1,650 (100 %)': the timed steps' and the back-to-back steps' clock summaries."""
    parts = [f"{c['sm_clock_mhz']:,.0f} ({100 * c['power_capped_share']:.0f} %)" if c else "n/a"
             for c in ((clock or {}).get("steps"), (clock or {}).get("back_to_back"))]
    return " / ".join(parts)


def summary_lines(runs: list[dict]) -> list[str]:
    """With --processes N > 1: per (side, batch, variant) the median and range of tokens/s over the
    processes, and each JAX median against the reference's best median (synchronised / back to back)."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        if "error" not in r:
            groups.setdefault((_side(r), r["batch"], r["remat"]), []).append(r)
    if not any(len(group) > 1 for group in groups.values()):
        return []

    def median(group, key):  # None when no run of the group has the figure (--window 0: no back to back)
        values = [r[key] for r in group if r.get(key)]
        return statistics.median(values) if values else None

    keys = ("tokens_per_s", "window_tokens_per_s")
    best = {key: max((m for (side, _, _), g in groups.items() if side == "torch" and (m := median(g, key))),
                     default=None) for key in keys}
    lines = ["", "Over the processes (each run in its own process, the runs interleaved):", "",
             "| side | batch | remat | processes | tokens/s median (min-max) | back to back median (min-max) | "
             "vs the reference's best |", "|---|---|---|---|---|---|---|"]
    for (side, batch, remat), group in groups.items():
        cells, ratios = [], []
        for key in keys:
            values = [r[key] for r in group if r.get(key)]
            cells.append(f"{median(group, key):,.0f} ({min(values):,.0f}-{max(values):,.0f})" if values else "n/a")
            ratios.append(f"{median(group, key) / best[key]:.3f}x" if values and best[key] else "n/a")
        ratio = "" if side.startswith("torch") else " / ".join(ratios)
        lines.append(f"| {side} | {batch} | {remat} | {len(group)} | {cells[0]} | {cells[1]} | {ratio} |")
    return lines


def _side(run: dict) -> str:
    """The side, and a training variant other than plain (bench.train_variants)."""
    variant = run.get("variant", "plain")
    return run["side"] if variant == "plain" else f"{run['side']} ({variant})"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.train_gpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="where train_gpu.json / train_gpu.md (and per-run JSON) go")
    p.add_argument("--side", choices=("jax", "torch", "both"), default="both", help="which implementation(s) to run")
    p.add_argument("--batches", default="1,2,4,8", help="comma-separated batch sizes")
    p.add_argument("--remat8", default="dots_saveable", help="the remat policy of batch 8 (others: none)")
    p.add_argument("--steps", type=int, default=6, help="steps per run (the first is compile + warm-up)")
    p.add_argument("--window", type=int, default=16,
                   help="then this many steps back to back, timed together (the pipeline's fill, the first "
                        "step's dispatch before the device starts, is spread over them)")
    p.add_argument("--work", default=None, help="scratch directory (default: OUT/work)")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny models on CPU: checks the code path end to end")
    p.add_argument("--variants", default="plain", help="JAX side: comma-separated bench.train_variants names, "
                   "each undoing or trying one change for an A/B (plain: the code as it is)")
    p.add_argument("--processes", type=int, default=1,
                   help="run every (side, batch, variant) this many times, each in a new process, in rounds "
                        "(the same program moves 1-2 %% between processes: autotuning, clocks); the report adds "
                        "medians and ranges")
    p.add_argument("--process", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--variant", default="plain", help=argparse.SUPPRESS)
    p.add_argument("--worker", choices=("jax", "torch"), help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    p.add_argument("--remat", default="none", help=argparse.SUPPRESS)
    p.add_argument("--shape", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    args.work = args.work or os.path.join(args.out, "work")
    if args.worker:
        result = jax_worker(args) if args.worker == "jax" else torch_worker(args, json.loads(args.shape))
        name = result_name(args.worker, args.batch, args.variant, args.process)
        with open(os.path.join(args.out, name), "w") as f:
            json.dump(result, f, indent=1)
        return
    if args.processes < 1:
        raise SystemExit(f"--processes must be at least 1, got {args.processes}")
    batches = [int(b) for b in args.batches.split(",")]
    cfg = write_work(args.work, args.cpu_smoke, rows=max(batches) * args.steps)
    from theworld_jax import tiny

    world = 16 if args.cpu_smoke else 4096
    vae_side = tiny.VAE_IMAGE_SIZE[0] if args.cpu_smoke else 512
    runs, shape = [], None
    sides = ["jax", "torch"] if args.side == "both" else [args.side]
    for process in range(args.processes):
        for side in sides:
            for batch in batches:
                remat = args.remat8 if batch >= 8 else "none"
                if side == "torch" and shape is None:  # the JAX runs' row shape, or the data's when only torch runs
                    shape = data_shape(args, cfg, world, vae_side, runs)
                for variant in (args.variants.split(",") if side == "jax" else ["plain"]):
                    runs.append(run_worker(args, side, batch, remat, shape if side == "torch" else None, variant,
                                           process))
    peak = None if args.cpu_smoke else next((v for k, v in PEAK_BF16.items()
                                             if any(k in str(r.get("device", "")) for r in runs)), None)
    flops_of = lambda seq, targets: model_flops(cfg["text"], cfg["vision"], seq, targets)  # noqa: E731
    runs = [add_rates(r, flops_of, peak) for r in runs]
    shape = shape or data_shape(args, cfg, world, vae_side, runs)
    versions = sorted({f"jax {r['jax']}" for r in runs if "jax" in r} |
                      {f"torch {r['torch']}, transformers {r['transformers']}" for r in runs if "torch" in r})
    report = {"device": next((r["device"] for r in runs if "device" in r), "?"), "versions": "; ".join(versions),
              "command": "python -m bench.train_gpu " + " ".join(argv if argv is not None else sys.argv[1:]),
              "peak_flops": peak, "shape": shape, "runs": runs,
              "model_flops_per_row": flops_of(shape["fused_tokens"], shape["targets"])}
    with open(os.path.join(args.out, "train_gpu.json"), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(args.out, "train_gpu.md"), "w") as f:
        f.write(markdown(report))
    print(markdown(report), flush=True)


def data_shape(args, cfg: dict, world: int, vae_side: int, runs: list[dict]) -> dict:
    """The row shape the PyTorch side reproduces: the JAX runs' fused and target token counts."""
    done = next((r for r in runs if r.get("side") == "jax" and "error" not in r), None)
    if done is not None:
        fused, targets = round(done["fused_tokens_per_row"]), round(done["target_tokens_per_row"])
    else:  # estimated from the data: the chat template's text around the two turns
        fused = world + 2 + cfg["mm_tokens_per_image"] + 4 + PROMPT_WORDS + TARGET_WORDS + 12
        targets = TARGET_WORDS + 1
    return {"fused_tokens": fused, "world_tokens": world, "text_tokens": fused - world - 2, "targets": targets,
            "vae_side": vae_side, "image_tokens": cfg["mm_tokens_per_image"]}


if __name__ == "__main__":
    main()
