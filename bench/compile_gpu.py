"""First-call (compile) and steady-state times of TheWorld's programs on one GPU, then the first calls
again in a fresh process served by JAX's persistent compilation cache.

bf16, random weights (drawn leaf by leaf, bench.theworld_speed_gpu.random_model), gemma-3-4b-it +
diffusers' default Wan VAE + an mlp world projector. Workloads, B=1:
- forward: the fused forward with full logits ([BOS, SOW, 4,096 world, EOW, 3 text, BOI, 256 image, EOI,
  40 text] = 4,400 tokens);
- train: the launcher's projector-only training step (theworld_jax.train.step.TrainStep, since the eleventh
  session; before, the same computation written here): value_and_grad of the loss from the logits at the 40
  labelled positions, and an optax AdamW update;
- prefill: generate's prefill of a 4,400-token text prompt (theworld_jax.generation.start, bucketed);
- decode: generate's decode loop, 127 more tokens (128 new tokens in all, no eos);
- forward_staged: the forward outside jit, as TheWorld.__call__ runs it since the tenth session: each
  stage a program of its own, the decoder's identical layer groups one program.
The programs get the XLA options the library gives them (theworld_jax.jit.LARGE_PROGRAM_OPTIONS,
theworld_jax.train.step.COMPILER_OPTIONS, and the command lines' theworld_jax.jit.PROCESS_XLA_FLAGS, where
the tree has them). Each is called once (first call:
trace + compile + run; compile times from jax.monitoring, with each program's XLA seconds), then
--warmup more calls and the median of --repeats timed calls (steady state). Then the same script runs
in a new process with --first-only on the same --cache-dir, now warm. The cache is on in both
processes (as the command lines have it), so the first process's first calls include writing it.

Runs on any tree since the tenth session's (c5c46e5) alike, so one device call can measure two: `code` in
the report says which decoder ran.

    python -m bench.compile_gpu --cache-dir /tmp/jit-cache --out bench/results/compile_gpu
    python -m bench.compile_gpu --cpu-smoke --cache-dir /tmp/jit-cache-smoke --out /tmp/compile_smoke
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
import traceback

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
try:  # the command lines' process-wide XLA flags (since the eleventh session), before JAX starts a backend
    from theworld_jax.jit import set_process_xla_flags
except ImportError:
    pass
else:
    set_process_xla_flags()

import numpy as np  # noqa: E402

from bench.common import log, write_report  # noqa: E402

WORKLOADS = ("forward", "train", "prefill", "decode", "forward_staged")
NEW_TOKENS = 128
_COMPILE_EVENTS = {"/jax/core/compile/jaxpr_trace_duration": "trace_s",
                   "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower_s",
                   "/jax/core/compile/backend_compile_duration": "compile_s"}


class CompileClock:
    """Sums JAX's trace / lowering / backend-compile durations and counts cache hits between `take()`s."""

    def __init__(self):
        import jax

        self.total = {}
        jax.monitoring.register_event_duration_secs_listener(self._duration)
        jax.monitoring.register_event_listener(self._event)

    def _duration(self, event, duration, **kwargs):
        if event in _COMPILE_EVENTS:
            key = _COMPILE_EVENTS[event]
            self.total[key] = self.total.get(key, 0.0) + duration
            if key == "compile_s" and duration >= 0.05:  # each program's backend compile, by name
                programs = self.total.setdefault("programs", [])
                programs.append((kwargs.get("fun_name", "?"), round(duration, 3)))

    def _event(self, event, **_):
        if "compilation_cache/cache_hits" in event or "compilation_cache/cache_misses" in event:
            key = "cache_hits" if "hits" in event else "cache_misses"
            self.total[key] = self.total.get(key, 0) + 1

    def take(self) -> dict:
        out, self.total = self.total, {}
        return {k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}


def use_cache(directory: str, xla_caches: str | None = None) -> None:
    """JAX's persistent cache in `directory`, every program cached (what theworld_jax.jit does; set here
    through jax.config so that older code, without that function, is measured the same way).
    xla_caches: jax_persistent_cache_enable_xla_caches (None keeps JAX's default)."""
    import jax

    jax.config.update("jax_compilation_cache_dir", directory)
    if xla_caches is not None:
        jax.config.update("jax_persistent_cache_enable_xla_caches", xla_caches)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


def build(z: dict):
    import jax.numpy as jnp
    from flax import nnx

    from bench.theworld_speed_gpu import random_model
    from theworld_jax.config.gemma3 import Gemma3Config
    from theworld_jax.config.theworld import TheWorldConfig
    from theworld_jax.config.wan_vae import WanVAEConfig
    from theworld_jax.modeling.theworld import TheWorldModel

    gemma_config = Gemma3Config.from_dict(z["config"].to_dict())
    vae_config = WanVAEConfig.from_dict(z["vae"])
    config = TheWorldConfig(sow_token_id=z["sow"], eow_token_id=z["eow"], vae_image_size=(z["vae_size"],) * 2)
    return random_model(lambda: TheWorldModel.create(config, gemma_config, vae_config, dtype=jnp.bfloat16,
                                                     rngs=nnx.Rngs(0)))


def workloads(model, z: dict, one_program: bool = False) -> dict:
    """{name: (call, wait, prepare)}: `call()` runs the workload once, `wait(result)` blocks on it,
    `prepare()` (or None) runs untimed before each call. one_program: the training step's update as one
    program even where the tree stages it (TrainStep.staged, since the twelfth session)."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from bench.theworld_speed_gpu import make_batch
    from theworld_jax import jit
    from theworld_jax.attention import block_layout
    from theworld_jax.generation import start
    from theworld_jax.inputs import Batch
    from theworld_jax.modeling.fusion import labelled_positions

    x = make_batch(z, 1)
    layout = block_layout(x["token_type_ids"], x["attention_mask"])
    keep = jnp.asarray(labelled_positions(x["labels"]))
    x = {k: jnp.asarray(v, jnp.bfloat16 if v.dtype == np.float32 else jnp.int32) for k, v in x.items()}
    # the XLA options the library gives these programs (none before the tenth session)
    large = getattr(jit, "LARGE_PROGRAM_OPTIONS", {})
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda s, x: nnx.merge(graphdef, s).forward(**x, layout=layout).logits,
                      compiler_options=large or None)

    def forward_staged():  # outside jit, as TheWorld.__call__ runs it: each stage a program of its own
        with jit.compiler_options(large):
            return model.forward(**x, layout=layout).logits

    # the launcher's step (theworld_jax.train.step.TrainStep), projector only, on one step's batch (A=1, G=1)
    from theworld_jax.train import model as model_lib
    from theworld_jax.train.step import TrainStep

    from jax.sharding import NamedSharding, PartitionSpec

    from theworld_jax.sharding import make_mesh
    from theworld_jax.train.loop import to_global

    split = model_lib.split_trainable(model, model_lib.trainable_paths(model, model.config))
    train_step = TrainStep(split, optax.adamw(1e-5), layout=layout)
    if one_program and getattr(train_step, "staged", False):
        train_step.staged = False
    mesh = make_mesh(1, 1)  # the batch and the trained parameters on the launcher's one-device mesh
    batch = to_global(mesh, {k: np.asarray(v)[None] for k, v in {**x, "keep": keep}.items()})
    replicated = NamedSharding(mesh, PartitionSpec())
    carry = [jax.device_put(split.initial_trainable(), replicated)]
    carry.append(jax.device_put(jax.jit(train_step.optimizer.init)(carry[0]), replicated))

    def train():
        carry[0], carry[1], metrics = train_step.step(carry[0], carry[1], split.frozen, batch)
        return metrics["loss"]

    ids = np.random.RandomState(1).randint(*z["text"], (1, z["prompt"])).astype(np.int32)
    prompt = Batch(input_ids=ids, attention_mask=np.ones(ids.shape, np.int32))
    decoding = [None]

    def prefill():
        decoding[0] = start(model.gemma, prompt, max_new_tokens=NEW_TOKENS, eos_token_id=())
        return decoding[0]

    def fresh_prefill():
        if decoding[0] is None or decoding[0].finished:
            prefill().new_tokens()

    def decode():
        tokens = decoding[0].advance()
        decoding[0] = None
        return tokens

    block = jax.block_until_ready
    return {"forward": (lambda: forward(state, x), block, None),
            "train": (train, block, None),
            "forward_staged": (forward_staged, block, None),
            "prefill": (prefill, lambda d: d.new_tokens(), None),
            "decode": (decode, lambda t: np.asarray(t), fresh_prefill),
            "census": lambda: decode_census(prefill(), min_bytes=128 * z["config"].text_config.hidden_size)}


_SHAPE = re.compile(r"= (\w+)\[([\d,]*)\]")
_BYTES = {"bf16": 2, "f16": 2, "f32": 4, "s32": 4, "u32": 4, "s8": 1, "u8": 1, "pred": 1, "f64": 8, "s64": 8}


def copy_census(hlo: str, min_bytes: int = 1 << 20) -> dict:
    """Copies of at least `min_bytes` in an optimized HLO text: plain copies, dynamic slices, and fusions
    or memcpy thunks named after them (a scanned layer's weights read through a copy show up here)."""
    out = {"count": 0, "bytes": 0}
    for line in hlo.splitlines():
        head = line.split("(", 1)[0]
        if not any(k in line for k in (" copy(", "dynamic-slice(", "dynamic_slice", "memcpy", "fused_copy")):
            continue
        match = _SHAPE.search(head + "(")
        if match is None or match.group(1) not in _BYTES:
            continue
        size = _BYTES[match.group(1)] * math.prod(int(d) for d in match.group(2).split(",") if d)
        if size >= min_bytes:
            out["count"] += 1
            out["bytes"] += size
    return out


def decode_census(decoding, min_bytes: int) -> dict:
    """copy_census of the compiled decode loop of a `theworld_jax.generation.Decoding` (private fields:
    the bench reads how its program copies memory; {} when this code's layout differs)."""
    import jax

    try:
        bound = decoding._decode
        values = [v.get_value() for v in bound._variables]
        state = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), decoding.state)
        lowered = bound.program.lower(values, state, jax.numpy.int32(2), *decoding._dynamic, **decoding._static)
        return {**copy_census(lowered.compile().as_text(), min_bytes), "min_bytes": min_bytes}
    except Exception as err:  # noqa: BLE001 - a census is optional
        return {"error": f"{type(err).__name__}: {str(err)[:200]}"}


def measure(z: dict, first_only: bool, warmup: int, repeats: int, names=WORKLOADS, profile: bool = False,
            one_program: bool = False) -> dict:
    """profile: the first call of each workload runs under jax.profiler, its host events (the compiler's
    passes, autotuning, code generation; from a warm cache, loading) summed per name into the row's
    `compile_profile`. one_program: see `workloads`."""
    import tempfile

    import jax

    from bench.common import host_event_table, host_trace

    clock = CompileClock()
    t0 = time.perf_counter()
    model = build(z)
    jax.block_until_ready(jax.tree.leaves(__import__("flax").nnx.state(model)))
    out = {"build_s": round(time.perf_counter() - t0, 2), "build_compile": clock.take()}
    log(f"model built in {out['build_s']} s")
    work = workloads(model, z, one_program)
    census = work.pop("census")
    for name, (call, wait, prepare) in work.items():
        if name not in names:
            continue
        if prepare:
            prepare()
        clock.take()
        with tempfile.TemporaryDirectory() as trace_dir:
            with host_trace(trace_dir) if profile else contextlib.nullcontext():
                t0 = time.perf_counter()
                wait(call())
                first = time.perf_counter() - t0
            row = {"first_s": round(first, 3), **clock.take()}
            if profile:
                row["compile_profile"] = host_event_table(trace_dir)
        log(f"{name}: first call {first:.2f} s {row}")
        if not first_only:
            times = []
            for i in range(warmup + repeats):
                if prepare:
                    prepare()
                t0 = time.perf_counter()
                wait(call())
                if i >= warmup:
                    times.append(time.perf_counter() - t0)
            row.update(median_ms=round(statistics.median(times) * 1e3, 3),
                       times_ms=[round(t * 1e3, 3) for t in times])
            log(f"{name}: median {row['median_ms']:.2f} ms of {repeats}")
        out[name] = row
    if not first_only and "decode" in names:
        out["decode_copies"] = census()
        log(f"decode loop's large copies: {out['decode_copies']}")
    return out


def sizes(cpu_smoke: bool) -> dict:
    from bench.theworld_speed_gpu import sizes as speed_sizes

    return speed_sizes(cpu_smoke)


def code_kind() -> str:
    from theworld_jax import jit
    from theworld_jax.modeling import gemma3_text

    if hasattr(gemma3_text, "Gemma3LayerStack"):
        return "scan"
    if hasattr(gemma3_text, "LayerGroup"):
        return "loop over layer groups, each kind traced once (shared_call)"
    return "loop, each kind of layer traced once (shared_call)" if hasattr(jit, "shared_call") else "loop"


def versions() -> dict:
    import flax
    import jax
    import optax

    device = jax.devices()[0]
    return dict(jax=jax.__version__, flax=flax.__version__, optax=optax.__version__, device=str(device),
                device_kind=getattr(device, "device_kind", None), code=code_kind(),
                xla_flags=os.environ.get("XLA_FLAGS", ""),
                theworld_jax=os.path.relpath(os.path.dirname(__import__("theworld_jax").__file__)))


def table(report: dict) -> str:
    v = report["versions"]
    lines = [f"# Compile times: {v.get('device_kind')} ({v['code']} decoder)", "",
             f"jax {v['jax']}, flax {v['flax']}, XLA_FLAGS={v.get('xla_flags') or '(none)'}; {report['method']}", "",
             "| workload | first call | of which compile | steady state (median) | first call, warm cache (new process) |",
             "|---|---|---|---|---|"]
    cold, warm = report.get("cold", {}), report.get("warm", {})
    for name in WORKLOADS:
        c, w = cold.get(name, {}), warm.get(name, {})
        lines.append(f"| {name} | {c.get('first_s', '-')} s | {c.get('compile_s', '-')} s | "
                     f"{c.get('median_ms', '-')} ms | {w.get('first_s', '-')} s |")
    copies = cold.get("decode_copies", {})
    if "count" in copies:
        lines += ["", f"Compiled decode loop: {copies['count']} copies of >= {copies['min_bytes']} bytes, "
                      f"{copies['bytes'] / 2**20:.1f} MiB in all (inside the loop, each runs once per step)."]
    if "error" in report:
        lines += ["", "```", report["error"][-3000:], "```"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny models on the CPU: checks the script")
    parser.add_argument("--cache-dir", required=True, help="the persistent compilation cache (new or empty)")
    parser.add_argument("--out", help="path prefix of the .json and .md reports")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workloads", default=",".join(WORKLOADS),
                        help="comma-separated subset of " + ", ".join(WORKLOADS))
    parser.add_argument("--profile", action="store_true",
                        help="trace each first call (cold and warm) with jax.profiler: host time per event")
    parser.add_argument("--one-program", action="store_true",
                        help="the training step's update as one program (not staged)")
    parser.add_argument("--xla-caches", help="jax_persistent_cache_enable_xla_caches: XLA's own caches kept in the "
                                             "cache directory ('all' adds the kernel cache to the autotuning cache)")
    parser.add_argument("--first-only", action="store_true", help="(internal) first calls only, report as JSON")
    parser.add_argument("--json", help="(internal) where --first-only writes its result")
    args = parser.parse_args(argv)
    if args.cpu_smoke:
        os.environ["JAX_PLATFORMS"] = "cpu"
    cache = os.path.abspath(args.cache_dir)
    if not args.first_only and os.path.isdir(cache) and os.listdir(cache):
        parser.error(f"--cache-dir {cache} is not empty: the first process must start from a cold cache")
    os.makedirs(cache, exist_ok=True)
    use_cache(cache, args.xla_caches)
    z = sizes(args.cpu_smoke)
    names = tuple(args.workloads.split(","))
    if not set(names) <= set(WORKLOADS):
        parser.error(f"--workloads: unknown {sorted(set(names) - set(WORKLOADS))}; expected some of {WORKLOADS}")
    if args.first_only:
        result = measure(z, True, 0, 0, names, args.profile, args.one_program)
        with open(args.json, "w") as f:
            json.dump(result, f)
        return 0
    report = dict(versions=versions(), cache_dir=cache, cpu_smoke=args.cpu_smoke, xla_caches=args.xla_caches,
                  one_program=args.one_program,
                  mem_fraction=os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION"),
                  method=f"B=1, bf16; first call = wall time of the first call (trace + compile + run, the "
                         f"persistent cache on and cold); steady state = median of {args.repeats} calls after "
                         f"{args.warmup} warm-up calls, each closed by block_until_ready; warm cache = the first "
                         f"calls again in a new process on the same cache")
    log(f"{report['versions']}")
    try:
        report["cold"] = measure(z, False, args.warmup, args.repeats, names, args.profile, args.one_program)
        result = os.path.join(cache, "..", f"compile_gpu_warm_{os.getpid()}.json")
        # the same interpreter, environment and working directory: the same theworld_jax as this process
        cmd = [sys.executable, "-m", "bench.compile_gpu", "--first-only", "--cache-dir", cache, "--json", result,
               "--workloads", args.workloads] + (["--xla-caches", args.xla_caches] if args.xla_caches else [])
        cmd += [flag for flag, on in (("--profile", args.profile), ("--one-program", args.one_program)) if on]
        t0 = time.perf_counter()
        child = subprocess.run(cmd + (["--cpu-smoke"] if args.cpu_smoke else []), text=True, capture_output=True)
        print(child.stdout + child.stderr, flush=True)
        if child.returncode:
            raise RuntimeError(f"the warm-cache process failed ({child.returncode}): {child.stderr[-2000:]}")
        with open(result) as f:
            report["warm"] = json.load(f)
        os.remove(result)
        report["warm"]["process_s"] = round(time.perf_counter() - t0, 2)
    except Exception:  # noqa: BLE001 - keep what was measured
        report["error"] = traceback.format_exc()
        print(report["error"], flush=True)
    print(json.dumps(report, indent=2, default=str))
    if args.out:
        write_report(os.path.dirname(args.out) or ".", os.path.basename(args.out), report, table(report))
    return 0 if "error" not in report else 1


if __name__ == "__main__":
    sys.exit(main())
