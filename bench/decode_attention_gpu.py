"""The fused decode kernel against XLA's decode attention at the full model's shapes, on a GPU.

For each (batch, cache): random bf16 queries, keys and values, a prefilled cache's slot indices (the ring of
a sliding layer, the slots of a full layer after a 4,400-token prompt, a few padding slots); the kernel's
bf16 output and XLA's bf16 attention (the oracle's code in bf16) against the oracle in float32 (max |err|
and relative Frobenius error), and the time of one call of each (median of 200 calls in one program after
a warm-up).

    python -m bench.decode_attention_gpu --out /tmp/da          # on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from theworld_jax import decode_attention
from theworld_jax.attention import AttentionMask, _xla_attention

# (name, slots, window): gemma-3-4b's sliding layers (1,024-slot ring) and full layers (4,608 slots)
CACHES = [("sliding", 1024, 1024), ("full", 4608, None)]
KV_HEADS, GROUP, HEAD_DIM, PROMPT = 4, 2, 256, 4400


def case(batch: int, slots: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((batch, 1, KV_HEADS * GROUP, HEAD_DIM))
    k, v = (rng.standard_normal((batch, KV_HEADS, slots, HEAD_DIM)) for _ in range(2))
    q_index = np.full((batch, 1), PROMPT, np.int32)
    tokens = np.arange(PROMPT + 1 - slots, PROMPT + 1) if slots < PROMPT else np.arange(slots)
    index = np.where(tokens <= PROMPT, tokens, -1)[np.argsort(tokens % slots)].astype(np.int32)
    index = np.broadcast_to(index, (batch, slots)).copy()
    index[:, :7] = np.where(index[:, :7] < 64, -1, index[:, :7])  # padding at the front of the prompt
    return [jnp.asarray(a, jnp.float32) for a in (q, k, v)] + [jnp.asarray(index), jnp.asarray(q_index)]


def xla(q, k, v, index, q_index, window):
    mask = AttentionMask(q_index=q_index, k_index=index, k_valid=index >= 0, q_block=jnp.zeros_like(q_index),
                         k_block=jnp.zeros_like(index))
    return _xla_attention(q, jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), mask, window=window, scale=HEAD_DIM ** -0.5)


def kernel(q, k, v, index, q_index, window):
    return decode_attention.decode_attention(q, k, v, index, q_index, window=window, scale=HEAD_DIM ** -0.5)


def per_call(fn, args, calls: int = 200) -> float:
    """Seconds per call of fn, `calls` calls chained in one program (each query depends on the last output)."""
    @jax.jit
    def chain(q, *rest):
        return jax.lax.fori_loop(0, calls, lambda i, q: q + 1e-3 * fn(q, *rest).astype(q.dtype), q)

    jax.block_until_ready(chain(*args))
    runs = []
    for _ in range(5):
        t0 = time.perf_counter()
        jax.block_until_ready(chain(*args))
        runs.append((time.perf_counter() - t0) / calls)
    return statistics.median(runs)


# The kernel's tuning constants tried by --sweep: (BLOCK_SLOTS, TARGET_PROGRAMS, NUM_WARPS, NUM_STAGES)
SWEEP = [(block, target, warps, stages) for block in (64, 128) for target in (132, 264)
         for warps in (4, 8) for stages in (2, 3)]


def sweep(args) -> int:
    rows = []
    for batch in args.batches:
        for name, slots, window in CACHES:
            bf16 = [a.astype(jnp.bfloat16) if a.dtype == jnp.float32 else a for a in case(batch, slots)]
            for block, target, warps, stages in SWEEP:
                for constant, value in (("BLOCK_SLOTS", block), ("TARGET_PROGRAMS", target), ("NUM_WARPS", warps),
                                        ("NUM_STAGES", stages)):
                    setattr(decode_attention, constant, value)
                row = dict(batch=batch, cache=name, block=block, target=target, warps=warps, stages=stages,
                           slices=decode_attention.slices_for(batch, KV_HEADS, slots))
                try:
                    row["kernel_us"] = 1e6 * per_call(lambda *a: kernel(*a, window), bf16[:5])
                    row["kernel_tb_s"] = 2 * int(np.prod(bf16[1].shape)) * 2 / row["kernel_us"] / 1e6
                except Exception as e:  # a tiling Triton rejects must not lose the others
                    row["error"] = str(e)[:300]
                rows.append(row)
                print(json.dumps(row), flush=True)
    with open(os.path.join(args.out, "decode_attention_sweep.json"), "w") as f:
        json.dump(dict(device=jax.devices()[0].device_kind, jax=jax.__version__, rows=rows), f, indent=1)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--sweep", action="store_true",
                        help="time the kernel alone over its tuning constants (SWEEP) instead")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.sweep:
        return sweep(args)
    rows = []
    for batch in args.batches:
        for name, slots, window in CACHES:
            f32 = case(batch, slots)
            bf16 = [a.astype(jnp.bfloat16) if a.dtype == jnp.float32 else a for a in f32]
            ref = np.asarray(jax.jit(xla, static_argnums=5)(*f32, window), np.float64)
            row = dict(batch=batch, cache=name, slots=slots, supported=decode_attention.supports(bf16[0], bf16[1]))
            for label, fn in (("kernel", kernel), ("xla", xla)):
                out = np.asarray(jax.jit(fn, static_argnums=5)(*bf16, window).astype(jnp.float32), np.float64)
                row[f"{label}_max_err"] = float(np.max(np.abs(out - ref)))
                row[f"{label}_rel_err"] = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
                row[f"{label}_us"] = 1e6 * per_call(lambda *a, fn=fn: fn(*a, window), bf16[:5])
            row["bytes"] = 2 * int(np.prod(bf16[1].shape)) * 2
            row["kernel_tb_s"] = row["bytes"] / row["kernel_us"] / 1e6
            rows.append(row)
            print(json.dumps(row), flush=True)
    report = dict(device=jax.devices()[0].device_kind, jax=jax.__version__, block_slots=decode_attention.BLOCK_SLOTS,
                  num_warps=decode_attention.NUM_WARPS, num_stages=decode_attention.NUM_STAGES, rows=rows)
    with open(os.path.join(args.out, "decode_attention_gpu.json"), "w") as f:
        json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
