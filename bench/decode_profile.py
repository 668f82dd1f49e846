"""Where a decode step's time goes: the decode loop on a synthetic prefilled cache, timed and traced.

The state is what a prefill of --prompt-len tokens (left-padded to its bucket) leaves: random bf16 keys
and values, the slot indices a prefill writes (ring slots on sliding layers), so only the decode program
is compiled. For each compiler-option variant and batch: the loop's time per step (median of --repeats
runs of --steps - 1 steps), and with --trace the GPU kernels of one run from a jax.profiler trace,
summed per HLO op (`hlo_op` of each kernel) and written with the optimized HLO text, so each op can be
looked up. Also the copy bandwidth (the roofline's denominator) and, with --sampling, the cost of
`sampling.choose` alone on (B, V) logits, and with --generate the same decode through `generate`
(`Decoding.advance` after a real prefill) in the same process.

    python -m bench.decode_profile --out /tmp/profile --label after --trace      # on a GPU
    python -m bench.decode_profile --tiny --out /tmp/profile --trace             # CPU, tiny config
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

from theworld_jax.jit import set_process_xla_flags  # noqa: E402

set_process_xla_flags()  # as the command lines run, before JAX starts a backend

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from bench.common import hf_config, kernel_table, log  # noqa: E402
from bench.generation_gpu import copy_bandwidth, random_model, tree_bytes  # noqa: E402

from theworld_jax import attention, decode_attention, generation, jit, sampling  # noqa: E402
from theworld_jax.config.gemma3 import Gemma3Config  # noqa: E402
from theworld_jax.modeling import gemma3_text  # noqa: E402
from theworld_jax.modeling.gemma3 import Gemma3Model  # noqa: E402
from theworld_jax.modeling.kv_cache import KVCache  # noqa: E402

# The library's command-buffer kinds without the loop's: XLA's defaults (the loop on the host, which reads its
# predicate back and launches the body's graph every step).
_BODY_KINDS = ",".join(kind for kind in jit.DECODE_LOOP_OPTIONS["xla_gpu_enable_command_buffer"].split(",")
                       if kind not in ("CONDITIONAL", "WHILE"))

# XLA options on top of the library's (theworld_jax.jit.DECODE_LOOP_OPTIONS: the whole loop as one CUDA graph).
VARIANTS = {
    "plain": {},
    "host_loop": {"xla_gpu_enable_command_buffer": _BODY_KINDS},
    "graph_body": {"xla_gpu_enable_command_buffer": "FUSION,CUBLAS,CUBLASLT,CUDNN,CUSTOM_CALL",
                   "xla_gpu_graph_min_graph_size": 1},  # graphs for the loop body's kernels, the loop on the host
    "cublas": {"xla_gpu_enable_triton_gemm": False},  # every matrix product through cuBLAS, none through Triton
    "exhaustive": {"xla_gpu_exhaustive_tiling_search": True},  # the autotuner tries every Triton GEMM tiling
    "einsum_logits": {},  # the library's code, its single-query logits as the einsum of longer queries (PATCHES)
    "products_logits": {},  # ... the single-query products form at every batch size (PATCHES)
    "no_twin": {},  # ... batch 1's token through the layers once, not as two copies (PATCHES)
    "xla_attention": {},  # ... the decode attention as XLA's einsums, not the fused kernel (PATCHES)
}


def _einsum_logits(q, k):
    return jnp.einsum("BTKGH,BSKH->BKGTS", q, k, preferred_element_type=jnp.float32)


PATCHES = {"einsum_logits": (attention, "_query_key_logits", _einsum_logits),  # variant -> (module, name, value)
           "products_logits": (attention, "_query_key_logits", attention._single_query_logits),
           "no_twin": (gemma3_text, "TWIN_ONE_TOKEN", False),
           "xla_attention": (decode_attention, "supports", lambda q, k: False)}


def ring_indices(slots: int, length: int, pad: int) -> np.ndarray:
    """(slots,) the sequence index a prefill of `length` tokens (the first `pad` padding) leaves in each slot."""
    s = np.arange(slots)
    if slots >= length:
        index = s
    else:
        first = length - slots
        index = first + (s - first) % slots
    return np.where((index >= pad) & (index < length), index, -1).astype(np.int32)


_draw = jax.jit(lambda key, shape: jax.random.normal(key, shape, jnp.bfloat16), static_argnums=1)


def synthetic_state(cfg, batch: int, length: int, pad: int, capacity: int, seed: int) -> generation.DecodeState:
    """A DecodeState as a prefill of `length` tokens (`pad` of them left padding) leaves it: random keys and
    values, one small draw program per cache shape (one program for the whole state took minutes to compile)."""
    empty = jax.eval_shape(lambda: KVCache.init(cfg, batch, length + capacity, dtype=jnp.bfloat16))
    key = jax.random.key(seed)
    keys, values = [], []
    for i, k in enumerate(empty.keys):
        k1, k2 = jax.random.split(jax.random.fold_in(key, i))
        keys.append(_draw(k1, k.shape))
        values.append(_draw(k2, k.shape))
    index = tuple(jnp.asarray(np.ascontiguousarray(np.broadcast_to(ring_indices(i.shape[1], length, pad), i.shape)))
                  for i in empty.index)
    cache = KVCache(keys=tuple(keys), values=tuple(values), index=index, prefilled=True)
    last = np.random.default_rng(seed).integers(3, 1000, batch).astype(np.int32)
    tokens = np.zeros((batch, capacity), np.int32)
    tokens[:, 0] = last
    return generation.DecodeState(
        cache=cache, tokens=jnp.asarray(tokens), last=jnp.asarray(last),
        position=jnp.full((batch,), length - pad, jnp.int32), done=jnp.zeros((batch,), bool), step=jnp.int32(1),
        index=jnp.int32(length), key=jax.random.fold_in(key, 1001))


def decode_program(graphdef, sampling_config, options: dict):
    """The library's decode loop, jitted with the library's XLA options updated by `options` (state donated)."""
    def run(params, state, limit, temperature, top_p, eos):
        lm = nnx.merge(graphdef, params).language_model
        return generation._decode(lm, state, limit, temperature, top_p, eos, sampling=sampling_config,
                                  pad_token_id=0)
    return jax.jit(run, donate_argnums=1, compiler_options={**jit.DECODE_LOOP_OPTIONS, **options})


def time_decode(args, graphdef, params, cfg, batch: int, variant: str, out_dir: str) -> dict:
    bucket = generation.BucketPolicy().length(args.prompt_len)
    capacity = generation.BucketPolicy().length(args.steps)
    make = lambda seed: synthetic_state(cfg, batch, bucket, bucket - args.prompt_len, capacity, seed)  # noqa: E731
    config = sampling.SamplingConfig.make(vocab_limit=cfg.vocab_size, vocab_size=cfg.vocab_size)
    program = decode_program(graphdef, config, VARIANTS[variant])
    dyn = (jnp.int32(args.steps), jnp.float32(1.0), jnp.float32(1.0), jnp.full((8,), -1, jnp.int32))
    state = jax.block_until_ready(make(0))
    cache_bytes = tree_bytes(state.cache)
    log(f"B={batch} {variant}: state ready ({cache_bytes / 1e9:.3f} GB of cache), compiling")
    t0 = time.perf_counter()
    compiled = program.lower(params, state, *dyn).compile()
    compile_s = time.perf_counter() - t0
    tag = f"{args.label}_{variant}_B{batch}"
    with open(os.path.join(out_dir, f"hlo_{tag}.txt"), "w") as f:
        f.write(compiled.as_text())
    times = []
    for r in range(args.repeats + 1):
        state = jax.block_until_ready(make(r))
        t0 = time.perf_counter()
        result = compiled(params, state, *dyn)
        steps = int(result.step)
        times.append(time.perf_counter() - t0)
        if steps != args.steps:
            raise RuntimeError(f"the loop ran to step {steps}, expected {args.steps}")
    step_s = statistics.median(times[1:]) / (args.steps - 1)
    record = dict(batch=batch, variant=variant, label=args.label, compile_s=compile_s, first_s=times[0],
                  runs_s=times[1:], step_s=step_s, cache_bytes=cache_bytes)
    if args.trace:
        state = jax.block_until_ready(make(99))
        record.update(trace_kernels(lambda: jax.block_until_ready(compiled(params, state, *dyn)), args.steps,
                                    os.path.join(out_dir, f"kernels_{tag}.json")))
    log(f"{tag}: {1e3 * step_s:.3f} ms/step (compile {compile_s:.1f} s){kernel_summary(record)}")
    return record


def trace_kernels(run, steps: int, path: str) -> dict:
    """One traced `run()` (a decode of `steps` - 1 steps that blocks until done): its kernel table written
    to `path`; returns kernels_per_step, kernel_ms_per_step, span_ms_per_step."""
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            run()
        table = kernel_table(trace_dir)
    with open(path, "w") as f:
        json.dump(table, f, indent=1)
    n = steps - 1
    return dict(kernels_per_step=table["kernel_count"] / n, kernel_ms_per_step=table["kernels_ns"] / n / 1e6,
                span_ms_per_step=table["span_ns"] / n / 1e6)


def kernel_summary(record: dict) -> str:
    """", kernels ... per step" for a log line when `record` has a trace, else ""."""
    if "kernels_per_step" not in record:
        return ""
    return (f", kernels {record['kernel_ms_per_step']:.3f} ms/step ({record['kernels_per_step']:.0f} per step), "
            f"span {record['span_ms_per_step']:.3f}")


def sampling_settings(vocab: int) -> list[tuple[str, object]]:
    """(name, choose(logits, key) -> tokens) of the settings time_sampling times (temperature 0.8)."""
    def chooser(**kw):
        config = sampling.SamplingConfig.make(vocab_limit=vocab, vocab_size=vocab, **kw)
        return lambda x, key: sampling.choose(x, key, config, jnp.float32(0.8), jnp.float32(0.95))

    def radix_after_top_k(x, key):  # the path before: top-p's radix search over the vocabulary after top-k
        first = sampling.SamplingConfig.make(vocab_limit=vocab, vocab_size=vocab, do_sample=True, top_k=64)
        then = sampling.SamplingConfig.make(vocab_limit=vocab, vocab_size=vocab, do_sample=True, top_p=0.95)
        x = sampling.filter_logits(x, first, jnp.float32(0.8), jnp.float32(1.0))
        return sampling.choose(x, key, then, jnp.float32(1.0), jnp.float32(0.95))

    return [("greedy", chooser()), ("top_k=64 top_p=0.95", chooser(do_sample=True, top_k=64, top_p=0.95)),
            ("top_k=64 then top_p=0.95 by radix (before)", radix_after_top_k),
            ("top_p=0.95", chooser(do_sample=True, top_p=0.95)), ("top_k=50", chooser(do_sample=True, top_k=50)),
            ("plain sampling", chooser(do_sample=True))]


def time_sampling(args, vocab: int) -> list[dict]:
    """`sampling.choose` alone, 64 chained calls in one program, per call."""
    out = []
    for batch in args.batches:
        logits = 3.0 * jax.random.normal(jax.random.key(0), (batch, vocab), jnp.float32)
        for name, choose in sampling_settings(vocab):

            @jax.jit
            def chain(logits, key):
                def body(i, carry):
                    token, key = carry
                    key, sub = jax.random.split(key)
                    x = logits.at[:, 0].add(token.astype(jnp.float32) * 1e-9)  # a dependency on the last draw
                    return choose(x, sub), key
                return jax.lax.fori_loop(0, 64, body, (jnp.zeros((batch,), jnp.int32), key))[0]

            jax.block_until_ready(chain(logits, jax.random.key(1)))
            runs = []
            for r in range(3):
                t0 = time.perf_counter()
                jax.block_until_ready(chain(logits, jax.random.key(r)))
                runs.append((time.perf_counter() - t0) / 64)
            out.append(dict(batch=batch, setting=name, call_s=statistics.median(runs)))
            log(f"sampling B={batch} {name}: {1e6 * out[-1]['call_s']:.1f} us per call")
    return out


def time_generate(args, model, cfg, batch: int, out_dir: str) -> dict:
    """generate's own decode in this process: `Decoding.advance()` over --steps - 1 steps after a real
    prefill of --prompt-len tokens (the same `generation._decode` program as the loop variants, with the
    host's call around it), so the two can be compared without a second process or lease between them."""
    from bench.generation_gpu import prompt_ids
    from theworld_jax.inputs import InputSpec, prepare_batch

    prepared = prepare_batch(InputSpec(cfg, dtype=jnp.bfloat16),
                             prompt_ids(batch, args.prompt_len, cfg.text.bos_token_id, args.tiny, 0))

    def prefilled() -> generation.Decoding:
        decoding = generation.start(model, prepared, max_new_tokens=args.steps, eos_token_id=())
        jax.block_until_ready(decoding.state)
        return decoding

    times = []
    for _ in range(args.repeats + 1):
        decoding = prefilled()
        t0 = time.perf_counter()
        decoding.advance()
        times.append(time.perf_counter() - t0)
        if decoding.produced != args.steps:
            raise RuntimeError(f"generate stopped after {decoding.produced} tokens, expected {args.steps}")
    step_s = statistics.median(times[1:]) / (args.steps - 1)
    record = dict(batch=batch, variant="generate", label=args.label, first_s=times[0], runs_s=times[1:],
                  step_s=step_s, cache_bytes=tree_bytes(decoding.state.cache))
    if args.trace:
        decoding = prefilled()
        record.update(trace_kernels(decoding.advance, args.steps,
                                    os.path.join(out_dir, f"kernels_{args.label}_generate_B{batch}.json")))
    log(f"{args.label}_generate_B{batch}: {1e3 * step_s:.3f} ms/step (first call {times[0]:.1f} s)"
        f"{kernel_summary(record)}")
    return record


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--label", default="run", help="a name for this code version in file names")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--prompt-len", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="tokens per row (the loop runs steps - 1)")
    parser.add_argument("--batches", type=int, nargs="+", default=None)
    parser.add_argument("--variants", nargs="+", default=["plain"], choices=sorted(VARIANTS))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--trace", action="store_true", help="trace one run of each and sum its kernels")
    parser.add_argument("--sampling", action="store_true", help="also time sampling.choose alone")
    parser.add_argument("--generate", action="store_true",
                        help="also time generate's decode (Decoding.advance after a real prefill) per batch")
    parser.add_argument("--bandwidth", action="store_true", help="also measure the copy bandwidth")
    parser.add_argument("--budget-s", type=float, default=240.0,
                        help="start no new (variant, batch) after this many seconds of decode work")
    args = parser.parse_args(argv)
    args.prompt_len = args.prompt_len or (48 if args.tiny else 4400)
    args.steps = args.steps or (8 if args.tiny else 128)
    args.batches = args.batches or ([1, 2] if args.tiny else [1, 8])
    os.makedirs(args.out, exist_ok=True)

    raw = hf_config(args.tiny).to_dict()
    cfg = Gemma3Config.from_dict(raw)
    log(f"building the Gemma 3 decoder (bfloat16) on {jax.devices()[0]}")
    model = random_model(lambda: Gemma3Model(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)), 0, 0.02)
    graphdef, params = nnx.split(model)
    jax.block_until_ready(params)
    log("built")
    report = dict(label=args.label, device=jax.devices()[0].device_kind, jax=jax.__version__,
                  prompt_len=args.prompt_len, steps=args.steps, repeats=args.repeats,
                  weight_bytes=tree_bytes(nnx.state(model.language_model, nnx.Param)), decode=[])
    if args.bandwidth:
        report["copy_bandwidth"] = copy_bandwidth(args.tiny)
        log(f"copy bandwidth {report['copy_bandwidth']['bytes_per_s'] / 1e12:.3f} TB/s")
    started = time.perf_counter()
    for variant in args.variants:
        for batch in args.batches:
            if time.perf_counter() - started > args.budget_s:
                log(f"skipping {variant} B={batch}: past --budget-s {args.budget_s}")
                continue
            patch = PATCHES.get(variant)
            saved = patch and getattr(patch[0], patch[1])
            jax.clear_caches()  # the layers' traced programs (jit.shared_call) are cached: trace each variant anew
            try:
                if patch:
                    setattr(patch[0], patch[1], patch[2])
                report["decode"].append(time_decode(args, graphdef, params, cfg.text, batch, variant, args.out))
            except Exception as e:  # a variant the compiler rejects must not lose the others
                log(f"{variant} B={batch} failed: {type(e).__name__}: {str(e)[:300]}")
                report.setdefault("failed", []).append(dict(variant=variant, batch=batch, error=str(e)[:2000]))
            finally:
                if patch:
                    setattr(patch[0], patch[1], saved)
            with open(os.path.join(args.out, f"profile_{args.label}.json"), "w") as f:
                json.dump(report, f, indent=1)
    if args.generate:
        for batch in args.batches:
            report["decode"].append(time_generate(args, model, cfg, batch, args.out))
    if args.sampling:
        report["sampling"] = time_sampling(args, cfg.text.vocab_size)
    with open(os.path.join(args.out, f"profile_{args.label}.json"), "w") as f:
        json.dump(report, f, indent=1)
    for r in report["decode"]:
        print(f"{args.label:8s} {r['variant']:6s} B={r['batch']:<3d} {1e3 * r['step_s']:.3f} ms/step"
              + (f"  kernels {r['kernel_ms_per_step']:.3f} ms ({r['kernels_per_step']:.0f})" if args.trace else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
