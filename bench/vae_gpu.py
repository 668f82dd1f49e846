"""Full-size Wan2.1 (Cosmos) VAE on one GPU: diffusers' AutoencoderKLWan against theworld_jax's CosmosVAE.

diffusers' default AutoencoderKLWan config (base_dim 96, z_dim 16, dim_mult [1,2,4,4], 2 res blocks,
temperal_downsample [F,T,T]) with random weights (every tensor re-drawn, norm gammas included) is saved
to a temp dir and loaded through `CosmosVAE.from_pretrained` (the real loading path). Then:

1. float32 encode parity at 512x512 for T = 1 and T = 9, TF32 off on both sides:
   max |mean - diffusers mode()| <= 1e-4 * max(1, max |ref|);
2. bfloat16 encode time at 512x512, one frame, B = 1 and B = 8, JAX against diffusers on the same card:
   warm-up, then the median of --iters calls, each closed by block_until_ready / torch.cuda.synchronize;
   JAX's first call (trace + compile + run) is reported separately. Also the bf16 error of each side
   against the float32 reference (relative L2).

    python -m bench.vae_gpu --out bench/results/vae_gpu          # on a GPU
    python -m bench.vae_gpu --tiny --out /tmp/vae_gpu            # same path on CPU with a tiny VAE

Writes results.json and results.md under --out and prints the table.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch shares the card

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.common import log, timed, write_report  # noqa: E402

TINY = dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1, temperal_downsample=[False, True, True])
def video(b: int, t: int, size: int, seed: int) -> np.ndarray:
    """(B, T, H, W, 3) float32 uniform in [-1, 1]."""
    return np.random.default_rng(seed).uniform(-1, 1, (b, t, size, size, 3)).astype(np.float32)


def torch_mode(ref, x: np.ndarray, device, dtype) -> np.ndarray:
    xt = torch.from_numpy(x.transpose(0, 4, 1, 2, 3)).to(device, dtype)
    with torch.no_grad():
        mode = ref.encode(xt).latent_dist.mode()
    return mode.float().cpu().numpy().transpose(0, 2, 3, 4, 1)


def rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def time_calls(fn, sync, iters: int, warmup: int) -> list[float]:
    """Milliseconds of `iters` calls after `warmup` untimed ones."""
    return [1e3 * t for t in timed(fn, sync, repeats=iters, warmup=warmup - 1)[3]]


def parity(ref, vae, device, size: int, frames: int) -> dict:
    import jax

    x = video(1, frames, size, seed=frames)
    expected = torch_mode(ref, x, device, torch.float32)
    start = time.perf_counter()
    ours = np.asarray(jax.block_until_ready(vae.encode(x)))
    first = time.perf_counter() - start
    diff = float(np.abs(ours - expected).max())
    bound = 1e-4 * max(1.0, float(np.abs(expected).max()))
    row = dict(frames=frames, size=size, latent_shape=list(ours.shape), max_abs_diff=diff,
               max_abs_ref=float(np.abs(expected).max()), tolerance=bound, passed=diff <= bound,
               rel_l2=rel_l2(ours, expected), jax_first_call_s=first)
    log(f"float32 T={frames}: max|diff| {diff:.3g} (tolerance {bound:.3g}) "
        f"{'PASS' if row['passed'] else 'FAIL'}; rel L2 {row['rel_l2']:.3g}")
    return row, (x, expected)


def timing(ref_bf16, vae_bf16, device, size: int, batch: int, iters: int) -> dict:
    import jax
    import jax.numpy as jnp

    x = video(batch, 1, size, seed=100 + batch)
    xj = jax.device_put(jnp.asarray(x, jnp.bfloat16))
    start = time.perf_counter()
    jax.block_until_ready(vae_bf16.encode(xj))
    first = time.perf_counter() - start
    jax_ms = time_calls(lambda: vae_bf16.encode(xj), jax.block_until_ready, iters, warmup=3)

    xt = torch.from_numpy(x.transpose(0, 4, 1, 2, 3)).to(device, torch.bfloat16)
    sync = (lambda _: torch.cuda.synchronize()) if device.type == "cuda" else (lambda _: None)
    with torch.no_grad():
        torch_ms = time_calls(lambda: ref_bf16.encode(xt).latent_dist.mode(), sync, iters, warmup=3)
    row = dict(batch=batch, size=size, frames=1, iters=iters,
               jax_first_call_s=first, jax_median_ms=statistics.median(jax_ms), jax_min_ms=min(jax_ms),
               torch_median_ms=statistics.median(torch_ms), torch_min_ms=min(torch_ms))
    row["speedup"] = row["torch_median_ms"] / row["jax_median_ms"]
    row["jax_img_per_s"] = 1e3 * batch / row["jax_median_ms"]
    row["torch_img_per_s"] = 1e3 * batch / row["torch_median_ms"]
    log(f"bf16 B={batch}: JAX {row['jax_median_ms']:.2f} ms (first call {first:.1f} s), "
        f"diffusers {row['torch_median_ms']:.2f} ms, speedup {row['speedup']:.2f}x")
    return row


def markdown(results: dict) -> str:
    env = results["environment"]
    lines = [f"# Wan2.1 VAE encode: theworld_jax vs diffusers ({env['device_name']})", "",
             f"jax {env['jax']} ({env['jax_backend']}), torch {env['torch']}, diffusers {env['diffusers']}; "
             f"config {'tiny' if results['tiny'] else 'full (diffusers defaults)'}, random weights, "
             f"load via CosmosVAE.from_pretrained {results['load_s']:.1f} s.", "",
             "## float32 parity (TF32 off on both sides)", "",
             "| T | size | latent | max abs diff | max abs ref | tolerance | rel L2 | pass |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results["parity"]:
        lines.append(f"| {r['frames']} | {r['size']}² | {tuple(r['latent_shape'])} | {r['max_abs_diff']:.3g} | "
                     f"{r['max_abs_ref']:.3g} | {r['tolerance']:.3g} | {r['rel_l2']:.3g} | "
                     f"{'yes' if r['passed'] else '**NO**'} |")
    lines += ["", f"## bfloat16 encode time, one frame (median of {results['timing'][0]['iters']})", "",
              "| B | size | JAX ms | diffusers ms | speedup | JAX img/s | diffusers img/s | JAX first call s |",
              "|---|---|---|---|---|---|---|---|"]
    for r in results["timing"]:
        lines.append(f"| {r['batch']} | {r['size']}² | {r['jax_median_ms']:.2f} | {r['torch_median_ms']:.2f} | "
                     f"{r['speedup']:.2f}x | {r['jax_img_per_s']:.1f} | {r['torch_img_per_s']:.1f} | "
                     f"{r['jax_first_call_s']:.1f} |")
    err = results["bf16_error"]
    lines += ["", f"bf16 error against the float32 diffusers mean (the T=1 parity input), relative L2: "
                  f"JAX {err['jax']:.3g}, diffusers {err['diffusers']:.3g}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="directory for results.json and results.md")
    parser.add_argument("--tiny", action="store_true", help="tiny VAE at 32x32 on CPU: validates the script")
    parser.add_argument("--size", type=int, default=None, help="square resolution (default 512, tiny 32)")
    parser.add_argument("--iters", type=int, default=None, help="timed calls per case (default 20, tiny 3)")
    args = parser.parse_args()
    size = args.size or (32 if args.tiny else 512)
    iters = args.iters or (3 if args.tiny else 20)

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    import diffusers
    import jax
    import jax.numpy as jnp
    from diffusers import AutoencoderKLWan
    from tests.helpers.tiny_vae import randomize

    from theworld_jax.cosmos_vae import CosmosVAE

    jax.config.update("jax_default_matmul_precision", "highest")
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    if args.tiny:
        torch.set_num_threads(1)
    env = dict(python=platform.python_version(), jax=jax.__version__, jax_backend=jax.default_backend(),
               jax_devices=[str(d) for d in jax.devices()], torch=torch.__version__,
               diffusers=diffusers.__version__,
               device_name=torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu")
    log(f"environment: {env}")

    ref = randomize(AutoencoderKLWan(**(TINY if args.tiny else {})), seed=0).eval()
    log(f"diffusers AutoencoderKLWan: {sum(p.numel() for p in ref.parameters()) / 1e6:.1f} M parameters")
    results = dict(tiny=args.tiny, environment=env, config=dict(ref.config), parity=[], timing=[])
    with tempfile.TemporaryDirectory() as tmp:
        ref.save_pretrained(tmp)
        start = time.perf_counter()
        vae = CosmosVAE.from_pretrained(tmp)
        results["load_s"] = time.perf_counter() - start
        vae_bf16 = CosmosVAE.from_pretrained(tmp, dtype=jnp.bfloat16)
    ref = ref.to(device)

    references = {}
    for frames in (1, 9):
        row, references[frames] = parity(ref, vae, device, size, frames)
        results["parity"].append(row)
    del vae
    gc.collect()

    jax.config.update("jax_default_matmul_precision", "default")
    ref_bf16 = ref.to(torch.bfloat16)
    for batch in (1, 8):
        results["timing"].append(timing(ref_bf16, vae_bf16, device, size, batch, iters))
    x1, expected = references[1]
    ours = vae_bf16.encode(jnp.asarray(x1, jnp.bfloat16)).astype(jnp.float32)
    results["bf16_error"] = dict(jax=rel_l2(np.asarray(ours), expected),
                                 diffusers=rel_l2(torch_mode(ref_bf16, x1, device, torch.bfloat16), expected))
    log(f"bf16 error vs the float32 reference: {results['bf16_error']}")

    table = markdown(results)
    write_report(args.out, "results", results, table)
    print(table)
    if not all(r["passed"] for r in results["parity"]):
        sys.exit(1)


if __name__ == "__main__":
    main()
