"""One decoder layer's attention under Gemma 3's mask on one GPU: speed and parity of the fast path.

Shape (gemma-3-4b-it): B=2, T=4,400, 8 query heads over 4 KV heads, head_dim 256, window 1,024 on sliding
layers; a 256-token bidirectional image block at real token 300 (the sliding layers' block rows then come
from the reversed call), at real token 4,000 (as in TheWorld's rows, after the world tokens: the band call),
or the 4,096-token bidirectional world block at real token 2; row 1 left-padded by 100. Rows:
- cuDNN causal (+ window) at T = 4,480 (the multiple of 128 the fast path pads to; cuDNN's backward
  refuses 4,400 and 4,399): the floor, not the Gemma mask;
- the fast path (`theworld_jax.attention.dot_product_attention` on GPU: interval decomposition over cuDNN);
- the XLA einsum path (the oracle) in bf16.
Parity: the decomposition's logic in float32 (jax.nn's XLA backend: cuDNN has no float32 kernel) against
the float32 oracle, outputs and gradients, max |diff| over real rows; the bf16 fast path and the bf16
oracle against the float32 oracle, relative L2 (the bf16 bound of docs/design.md: 2e-2).

    python -m bench.attention_layer_gpu --out bench/results/attention_layer_gpu   # GPU
    python -m bench.attention_layer_gpu --tiny                                     # CPU, small shapes
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from bench.common import timed  # noqa: E402
from theworld_jax.attention import (_xla_attention, block_layout, dot_product_attention,  # noqa: E402
                                    make_attention_mask)
from theworld_jax.interval_attention import interval_attention  # noqa: E402


def shapes(tiny: bool) -> dict:
    if tiny:
        return dict(B=2, T=120, N=4, K=2, H=32, W=16, image=(10, 12), late_image=(60, 12), world=(2, 64), pad=7,
                    multiple=32)
    return dict(B=2, T=4400, N=8, K=4, H=256, W=1024, image=(300, 256), late_image=(4000, 256), world=(2, 4096),
                pad=100, multiple=128)


def make_mask(s: dict, block: tuple[int, int]):
    attention_mask = np.ones((s["B"], s["T"]), np.int32)
    attention_mask[1, :s["pad"]] = 0
    types = np.zeros_like(attention_mask)
    start, length = block
    types[0, start:start + length] = 1
    types[1, s["pad"] + start:s["pad"] + start + length] = 1
    layout = block_layout(types, attention_mask, window=s["W"])  # block_start W - 1 for the late image
    return attention_mask, make_attention_mask(attention_mask, types, layout=layout)


def median_ms(fn, args, iters: int) -> float:
    """Median milliseconds of `iters` calls of fn(*args) after two untimed ones (compile, warm-up)."""
    _, _, median, _ = timed(lambda: fn(*args), jax.block_until_ready, repeats=iters, warmup=1)
    return median * 1e3


def fwd_and_grad(fn, cotangent):
    """(jit(fn), q, k, v -> (value, grads) of sum(fn(q, k, v) * cotangent)); the cotangent is an argument of
    the compiled gradient, not a constant folded into it (folding a float32 (B, T, N, H) array took XLA
    minutes)."""
    fwd = jax.jit(fn)
    loss = lambda q, k, v, c: jnp.sum(fn(q, k, v).astype(jnp.float32) * c)  # noqa: E731
    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    return fwd, lambda q, k, v: grad(q, k, v, cotangent)


def rel_l2(x, ref, real):
    x, ref = np.asarray(x, np.float64)[real], np.asarray(ref, np.float64)[real]
    return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--out", default=None, help="path prefix for .json and .md")
    args = parser.parse_args(argv)
    s = shapes(args.tiny)
    iters = 3 if args.tiny else args.iters
    on_gpu = jax.default_backend() == "gpu"
    backend = "cudnn" if on_gpu else "xla"
    scale = s["H"] ** -0.5
    b, t, n, kv, h = s["B"], s["T"], s["N"], s["K"], s["H"]
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    q32 = jax.random.normal(keys[0], (b, t, n, h), jnp.float32)
    k32 = jax.random.normal(keys[1], (b, t, kv, h), jnp.float32)
    v32 = jax.random.normal(keys[2], (b, t, kv, h), jnp.float32)
    cot = jax.random.normal(keys[3], (b, t, n, h), jnp.float32)
    q16, k16, v16 = (x.astype(jnp.bfloat16) for x in (q32, k32, v32))
    tp = -(-t // s["multiple"]) * s["multiple"]
    rows, parity = [], []
    report = dict(device=str(jax.devices()[0]), jax=jax.__version__, shapes=s, iters=iters, rows=rows,
                  parity=parity, method="jit; 2 warm-up calls, then the median of `iters` calls, each closed by "
                                        "block_until_ready; fwd+bwd = value_and_grad of sum(out * cotangent) "
                                        "w.r.t. q, k, v")
    for layer, window in (("global", None), ("sliding", s["W"])):
        lw = None if window is None else (window - 1, 0)
        pad = lambda x: jnp.pad(x, ((0, 0), (0, tp - t), (0, 0), (0, 0)))  # noqa: E731
        cotp = pad(cot)
        floor = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True,  # noqa: E731
                                                               local_window_size=lw, implementation=backend)
        f, g = fwd_and_grad(floor, cotp)
        rows.append(dict(layer=layer, case=f"cuDNN causal{' + window' if window else ''} (floor), T={tp}",
                         fwd_ms=median_ms(f, (pad(q16), pad(k16), pad(v16)), iters),
                         fwdbwd_ms=median_ms(g, (pad(q16), pad(k16), pad(v16)), iters)))
        blocks = ((f"image block {s['image'][1]} at {s['image'][0]}", s["image"]),
                  (f"image block {s['late_image'][1]} at {s['late_image'][0]}", s["late_image"]),
                  (f"world block {s['world'][1]}", s["world"]))
        for block_name, block in blocks:
            attention_mask, mask = make_mask(s, block)
            real = attention_mask.astype(bool)
            fast = lambda q, k, v: (dot_product_attention(q, k, v, mask, window=window, scale=scale)  # noqa: E731
                                    if on_gpu else interval_attention(q, k, v, mask, window=window, scale=scale,
                                                                      backend="xla", multiple=s["multiple"]))
            f, g = fwd_and_grad(fast, cot)
            rows.append(dict(layer=layer, case=f"fast path, {block_name}", fwd_ms=median_ms(f, (q16, k16, v16), iters),
                             fwdbwd_ms=median_ms(g, (q16, k16, v16), iters)))
            if block_name.startswith("image"):
                oracle = lambda q, k, v: _xla_attention(q, k, v, mask, window=window, scale=scale)  # noqa: E731
                fo, go = fwd_and_grad(oracle, cot)
                rows.append(dict(layer=layer, case=f"XLA einsum (oracle), {block_name}",
                                 fwd_ms=median_ms(fo, (q16, k16, v16), iters), fwdbwd_ms=median_ms(go, (q16, k16, v16), iters)))
                ref_out = fo(q32, k32, v32)
                _, ref_grads = go(q32, k32, v32)
                logic = lambda q, k, v: interval_attention(q, k, v, mask, window=window, scale=scale,  # noqa: E731
                                                           backend="xla", multiple=s["multiple"])
                fl, gl = fwd_and_grad(logic, cot)
                out32 = fl(q32, k32, v32)
                _, grads32 = gl(q32, k32, v32)
                out16, (_, grads16) = f(q16, k16, v16), g(q16, k16, v16)
                xla16, (_, xgrads16) = fo(q16, k16, v16), go(q16, k16, v16)
                diff = lambda x, y: float(np.max(np.abs(np.asarray(x, np.float32) - np.asarray(y))[real]))  # noqa: E731
                parity.append(dict(
                    layer=layer, block=block_name,
                    f32_logic_max_out_diff=diff(out32, ref_out),
                    f32_logic_max_grad_diff=max(diff(x, y) for x, y in zip(grads32, ref_grads)),
                    max_abs_ref_out=float(np.max(np.abs(np.asarray(ref_out)[real]))),
                    bf16_fast_rel_l2_out=rel_l2(out16, ref_out, real),
                    bf16_fast_rel_l2_grad=max(rel_l2(x, y, real) for x, y in zip(grads16, ref_grads)),
                    bf16_xla_rel_l2_out=rel_l2(xla16, ref_out, real),
                    bf16_xla_rel_l2_grad=max(rel_l2(x, y, real) for x, y in zip(xgrads16, ref_grads))))
                print(json.dumps(parity[-1]), flush=True)
            print(json.dumps(rows[-1]), flush=True)
    lines = [f"device: {report['device']}, jax {report['jax']}; {report['method']}", "",
             "| layer | case | fwd ms | fwd+bwd ms |", "|---|---|---|---|"]
    lines += [f"| {r['layer']} | {r['case']} | {r['fwd_ms']:.3f} | {r['fwdbwd_ms']:.3f} |" for r in rows]
    lines += ["", "| layer | block | f32 logic max|dout| | f32 logic max|dgrad| | max|ref out| | bf16 fast rel L2 out / grad "
              "| bf16 XLA rel L2 out / grad |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {p['layer']} | {p['block']} | {p['f32_logic_max_out_diff']:.2e} | {p['f32_logic_max_grad_diff']:.2e} | "
              f"{p['max_abs_ref_out']:.2f} | {p['bf16_fast_rel_l2_out']:.2e} / {p['bf16_fast_rel_l2_grad']:.2e} | "
              f"{p['bf16_xla_rel_l2_out']:.2e} / {p['bf16_xla_rel_l2_grad']:.2e} |" for p in parity]
    text = "\n".join(lines)
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out + ".json", "w") as f:
            json.dump(report, f, indent=2)
        with open(args.out + ".md", "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
