"""Full-size Gemma 3 parity on one GPU: transformers' Gemma3ForConditionalGeneration against theworld_jax.

The gemma-3-4b-it config (bench/common.py) with random weights (transformers'
init; norms, SigLIP biases and the projector re-drawn; small tied embeddings), float32 with TF32 off on
both sides. transformers builds the model on the GPU and computes the reference logits; the weights are
written to a temp dir as safetensors in the hub key layout; the torch model is freed; theworld_jax loads
the directory through `load_gemma3` and computes its logits. One prompt of --seq-len tokens holding one
896x896 random image (256 soft tokens, token_type_ids given).

    python -m bench.gemma3_gpu_parity --out bench/results/gemma3_gpu_parity      # on a GPU
    python -m bench.gemma3_gpu_parity --tiny --out /tmp/gemma3_parity             # same path, CPU, tiny

Reports max |logit diff|, max |ref|, relative errors, top-1 agreement over all positions, and each
side's forward wall time (first call, median of 3 warm calls), as JSON and markdown under --out.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch holds GPU memory first

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.common import TEXT_IDS, hf_config, log, randomize_gemma, timed, write_report  # noqa: E402

IMAGE_AT = 100  # the image's <start_of_image> position: most text lies further than a window behind it


def make_inputs(config, seq_len: int, seed: int, tiny: bool) -> dict[str, np.ndarray]:
    """[bos, words..., boi, image x mm_tokens, eoi, words...] of seq_len tokens, one random image."""
    rng = np.random.default_rng(seed)
    n_img = config.mm_tokens_per_image
    low, high = (9, 280) if tiny else TEXT_IDS
    at = min(IMAGE_AT, seq_len // 4)
    n_after = seq_len - at - n_img - 2
    if n_after < 1:
        raise SystemExit(f"--seq-len {seq_len} is too short for an image of {n_img} tokens")
    ids = np.concatenate([[config.text_config.bos_token_id], rng.integers(low, high, at - 1), [config.boi_token_id],
                          np.full(n_img, config.image_token_id), [config.eoi_token_id],
                          rng.integers(low, high, n_after)])[None].astype(np.int64)
    size = config.vision_config.image_size
    pixels = rng.integers(0, 256, (1, 3, size, size)).astype(np.float32)
    return dict(input_ids=ids, attention_mask=np.ones_like(ids), pixel_values=pixels / 127.5 - 1.0,
                token_type_ids=(ids == config.image_token_id).astype(np.int64))


def run_torch(args, config, inputs, workdir: str) -> tuple[np.ndarray, dict]:
    import transformers
    from tests.helpers.tiny_gemma import save_tiny_gemma3

    device = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    config._attn_implementation = args.attn
    log(f"building transformers Gemma3ForConditionalGeneration on {device}")
    torch.manual_seed(args.seed)
    with torch.device(device):
        model = transformers.Gemma3ForConditionalGeneration(config)
    model = randomize_gemma(model.float().eval(), args.seed + 1, args.embed_std)
    log(f"saving the hub layout under {workdir}")
    save_tiny_gemma3(model, None, workdir, layout="hub", shards=1 if args.tiny else 4)
    batch = {k: torch.from_numpy(v).to(device) for k, v in inputs.items()}
    sync = (lambda _: torch.cuda.synchronize()) if device == "cuda" else (lambda _: None)
    log("torch forward")
    with torch.no_grad():
        out, first, warm, _ = timed(lambda: model(**batch).logits, sync)
    logits = out.float().cpu().numpy()
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    del model, out, batch
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return logits, dict(device=device, first_s=first, warm_median_s=warm, peak_gib=peak,
                        attn_implementation=args.attn)


def run_jax(args, inputs, workdir: str) -> tuple[np.ndarray, dict]:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from theworld_jax.weights.gemma3_keys import load_gemma3

    jax.config.update("jax_default_matmul_precision", "highest")
    log(f"loading {workdir} with load_gemma3 on {jax.devices()[0]}")
    t0 = time.perf_counter()
    _, model = load_gemma3(workdir, dtype=jnp.float32)
    load_s = time.perf_counter() - t0
    forward = nnx.jit(lambda m, ids, mask, px, types: m(ids, attention_mask=mask, pixel_values=px,
                                                           token_type_ids=types))
    batch = [jnp.asarray(inputs[k]) for k in ("input_ids", "attention_mask", "pixel_values", "token_type_ids")]
    batch[0], batch[1], batch[3] = (x.astype(jnp.int32) for x in (batch[0], batch[1], batch[3]))
    log("jax forward")
    out, first, warm, _ = timed(lambda: forward(model, *batch), jax.block_until_ready)
    logits = np.asarray(out)
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return logits, dict(device=str(jax.devices()[0]), load_s=load_s, first_s=first, warm_median_s=warm,
                        peak_gib=None if peak is None else peak / 2**30, jax_version=jax.__version__)


def compare(ours: np.ndarray, ref: np.ndarray) -> dict:
    diff = np.abs(ours.astype(np.float64) - ref.astype(np.float64))
    max_ref = float(np.abs(ref).max())
    max_diff = float(diff.max())
    return dict(max_abs_diff=max_diff, max_abs_ref=max_ref, max_diff_over_max1_ref=max_diff / max(1.0, max_ref),
                rel_fro=float(np.linalg.norm(ours - ref) / np.linalg.norm(ref)),
                top1_agreement=float((ours.argmax(-1) == ref.argmax(-1)).mean()),
                within_design_tolerance=bool(max_diff <= 1e-4 * max(1.0, max_ref)))


def markdown(report: dict) -> str:
    c, t, j = report["comparison"], report["torch"], report["jax"]
    fmt = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
    return "\n".join([
        f"# Gemma 3 parity: transformers vs theworld_jax ({report['config']})", "",
        f"float32, TF32 off on both sides; one prompt of {report['seq_len']} tokens with one "
        f"{report['image_size']}x{report['image_size']} image ({report['image_tokens']} soft tokens, "
        "token_type_ids given); random weights, hub key layout.", "",
        "| metric | value |", "|---|---|",
        f"| max abs logit diff | {c['max_abs_diff']:.3e} |",
        f"| max abs ref logit | {c['max_abs_ref']:.3f} |",
        f"| max diff / max(1, max ref) | {c['max_diff_over_max1_ref']:.3e} (docs/design.md bound 1e-4: "
        f"{'within' if c['within_design_tolerance'] else 'OUTSIDE'}) |",
        f"| norm(diff) / norm(ref) | {c['rel_fro']:.3e} |",
        f"| top-1 agreement (all positions) | {100 * c['top1_agreement']:.3f} % |", "",
        "| side | device | first call (s) | warm median of 3 (s) | peak GPU GiB |", "|---|---|---|---|---|",
        f"| transformers {report['versions']['transformers']} ({t['attn_implementation']}) | {t['device']} | "
        f"{t['first_s']:.3f} | {t['warm_median_s']:.4f} | {fmt(t['peak_gib'])} |",
        f"| theworld_jax (jax {j['jax_version']}) | {j['device']} | {j['first_s']:.3f} | "
        f"{j['warm_median_s']:.4f} | {fmt(j['peak_gib'])} |", "",
        f"JAX load from safetensors: {j['load_s']:.1f} s.", ""])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="directory for gemma3_gpu_parity.json and .md")
    parser.add_argument("--tiny", action="store_true", help="the tiny test config on CPU (checks the script)")
    parser.add_argument("--seq-len", type=int, default=None, help="prompt length (default 2048; tiny 64)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--embed-std", type=float, default=0.03, help="std of the tied embedding")
    parser.add_argument("--attn", default="sdpa", choices=("sdpa", "eager"), help="transformers attention")
    args = parser.parse_args(argv)
    if args.tiny:
        torch.set_num_threads(1)
    seq_len = args.seq_len or (64 if args.tiny else 2048)
    config = hf_config(args.tiny)
    inputs = make_inputs(config, seq_len, args.seed, args.tiny)
    import transformers

    with tempfile.TemporaryDirectory(prefix="gemma3_parity_") as workdir:
        ref, torch_info = run_torch(args, config, inputs, workdir)
        ours, jax_info = run_jax(args, inputs, workdir)
    report = dict(
        config="tiny test config" if args.tiny else "gemma-3-4b-it config, random weights",
        seq_len=seq_len, image_size=config.vision_config.image_size, image_tokens=config.mm_tokens_per_image,
        comparison=compare(ours, ref), torch=torch_info, jax=jax_info,
        versions=dict(torch=torch.__version__, transformers=transformers.__version__,
                      python=platform.python_version()),
        gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
    log(json.dumps(report["comparison"]))
    text = markdown(report)
    print(text)
    if args.out:
        write_report(args.out, "gemma3_gpu_parity", report, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
