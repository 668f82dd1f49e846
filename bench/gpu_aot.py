"""The library's programs compiled for an NVIDIA H200 on a machine without a GPU, and their kernel census.

XLA:GPU compiles for a described device (deviceless ahead-of-time compilation): `h200_target_config.txtpb`
beside this file is the H200's GpuTargetConfig, jax's compile-only CUDA topology holds one such device,
and every argument is an abstract array (ShapeDtypeStruct) placed on it: no weights, no GPU. Each program
is the one the GPU benchmarks build (full-size gemma-3-4b-it config, bf16): `decode` is
`bench.decode_profile`'s decode loop (4,400-token prompt, 128-token buffer), `prefill` generate's prefill
of a 4,400-token text prompt, `forward` and `train` `bench.theworld_speed_gpu`'s fused TheWorld forward
and `bench.train_gpu`'s launcher step (theworld_jax.train.step.TrainStep, projector only). Written under
--out: the optimized HLO (gzipped) and the kernel census (`bench.hlo_census.kernel_census`).

Without the card XLA does not autotune: every GEMM is a Triton fusion with the default tiles (the card
picks cuBLAS for most large GEMMs: `--xla-flag xla_gpu_enable_triton_gemm=false` for prefill, forward,
train), fusions keep the native emitter, sorts XLA's own kernels (bench/README.md, caveats).

    # CUDA-plugin venv (bench/README.md): jax[cuda13]==0.11.2 on Python 3.12
    python -m bench.gpu_aot smoke                    # x * x and a matrix product: prints the optimized HLO
    python -m bench.gpu_aot decode --batch 1 --out aot_out
    python -m bench.gpu_aot decode --batch 8 --sampling --xla-flag xla_gpu_enable_triton_gemm=false --out aot_out
    python -m bench.gpu_aot choose --batch 1 --sampling --top-k 64 --top-p 0.95   # sampling.choose alone
    python -m bench.gpu_aot --census bench/results/decode_hlo_s3_final_B1_h200.txt.gz   # any HLO text, any venv
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import os
import tempfile
import time
from unittest import mock

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the H200 is a compile-only topology, not a backend

TARGET = os.path.join(os.path.dirname(os.path.abspath(__file__)), "h200_target_config.txtpb")
PROGRAMS = ("smoke", "decode", "prefill", "forward", "train", "choose")


def h200_sharding(target: str = TARGET):
    """A replicated NamedSharding on the one device of a compile-only CUDA topology described by `target`."""
    import jax
    from jax.experimental import topologies

    with open(target) as f:
        topology = topologies.get_topology_desc(platform="cuda", target_config=f.read(), topology="1x1x1")
    mesh = topologies.make_mesh(topo=topology, mesh_shape=(1,), axis_names=("x",))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def placed(tree, sharding):
    """The array leaves of `tree` (arrays or ShapeDtypeStructs) as ShapeDtypeStructs on `sharding`."""
    import jax

    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def _gemma_config():
    from bench.common import hf_config
    from theworld_jax.config.gemma3 import Gemma3Config

    return Gemma3Config.from_dict(hf_config(False).to_dict())


def smoke(args):
    """x * x, then a (B, 2560) x (2560, 10240) bf16 matrix product: the setup's check."""
    import jax
    import jax.numpy as jnp

    def run(x, w):
        return (x * x) @ w

    shapes = (jax.ShapeDtypeStruct((args.batch, 2560), jnp.bfloat16), jax.ShapeDtypeStruct((2560, 10240), jnp.bfloat16))
    return jax.jit(run), shapes


def decode(args):
    """decode_profile's decode loop on a prefilled cache: (jitted program, abstract arguments)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from bench.decode_profile import decode_program, synthetic_state
    from theworld_jax import generation, sampling
    from theworld_jax.modeling.gemma3 import Gemma3Model

    cfg = _gemma_config()
    graphdef, params = nnx.split(nnx.eval_shape(lambda: Gemma3Model(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))))
    bucket, capacity = (generation.BucketPolicy().length(n) for n in (args.prompt_len, args.steps))
    state = jax.eval_shape(lambda: synthetic_state(cfg.text, args.batch, bucket, bucket - args.prompt_len,
                                                   capacity, 0))
    kw = dict(do_sample=True, top_k=args.top_k, top_p=args.top_p) if args.sampling else {}
    config = sampling.SamplingConfig.make(vocab_limit=cfg.text.vocab_size, vocab_size=cfg.text.vocab_size, **kw)
    dyn = (jnp.int32(args.steps), jnp.float32(1.0), jnp.float32(args.top_p), jnp.full((8,), -1, jnp.int32))
    return decode_program(graphdef, config, {}), (params, state, *dyn)


def prefill(args):
    """generate's prefill (theworld_jax.generation._prefill) of a text prompt of --prompt-len tokens, left
    padded to its bucket, for max_new_tokens=1 (as theworld_speed_gpu times it)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from theworld_jax import generation, sampling
    from theworld_jax.modeling.gemma3 import Gemma3Model

    cfg = _gemma_config()
    graphdef, params = nnx.split(nnx.eval_shape(lambda: Gemma3Model(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))))
    length = generation.BucketPolicy().length(args.prompt_len)
    batch = dict(input_ids=np.zeros((args.batch, length), np.int32), attention_mask=np.ones((args.batch, length),
                 np.int32), token_type_ids=None, pixel_values=None, video=None)
    config = sampling.SamplingConfig.make(vocab_limit=cfg.text.vocab_size, vocab_size=cfg.text.vocab_size)
    static = dict(sampling=config, pad_token_id=0, capacity=generation.BucketPolicy().length(1), layout=None)

    def run(params, batch, key, temperature, top_p, eos):
        return generation._prefill(nnx.merge(graphdef, params), batch, key, temperature, top_p, eos, **static)

    dyn = (jax.eval_shape(lambda: jax.random.key(0)), jnp.float32(1.0), jnp.float32(1.0),
           jnp.full((8,), -1, jnp.int32))
    return jax.jit(run), (params, batch, *dyn)


def forward(args):
    """theworld_speed_gpu's fused TheWorld forward (4,096 world + 256 image + text tokens = 4,400), the
    logits at the 40 labelled positions (--logits labelled), at every position (full) or the last (last)."""
    from flax import nnx

    from bench.theworld_speed_gpu import forward_program, jax_batch, model_factory, sizes

    z = sizes(False)
    graphdef, state = nnx.split(nnx.eval_shape(model_factory(z)))
    x, layout, keep = jax_batch(z, args.batch)
    keep, last = {"labelled": (keep, None), "full": (None, None), "last": (None, 1)}[args.logits]
    return forward_program(graphdef, layout), (state, x, keep, last)


def train(args):
    """train_gpu's step: the launcher's TrainStep on configs/theworld-4b-projection.yaml (projector only,
    AdamW, no accumulation, --remat), one batch of --batch rows of 4,480 fused tokens (384 ids + 4,096
    world tokens), the logits of 24 labelled positions."""
    import types

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from bench.train_gpu import REPO
    from theworld_jax.config.theworld import TheWorldConfig
    from theworld_jax.config.wan_vae import WanVAEConfig
    from theworld_jax.modeling.theworld import TheWorldModel
    from theworld_jax.train import model as model_lib
    from theworld_jax.train.config import load_config
    from theworld_jax.train.step import TrainStep, make_optimizer
    from theworld_jax.weights.loader import param_path

    config = load_config(os.path.join(REPO, "configs", "theworld-4b-projection.yaml"),
                         [f"model.remat={args.remat}", "optimizer.accumulation=1", "optimizer.warmup_steps=1"])
    gemma, vae = _gemma_config(), WanVAEConfig()
    world = TheWorldConfig(gemma_model_name=None, cosmos_model_name=None, sow_token_id=262145, eow_token_id=262146,
                           **model_lib._world_settings(config.model))
    model = nnx.eval_shape(lambda: TheWorldModel.create(world, gemma, vae, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
    split = model_lib.split_trainable(model, model_lib.trainable_paths(model, world))
    trainable = {param_path(p): jax.ShapeDtypeStruct(v.shape, jnp.float32)
                 for p, v in nnx.to_flat_state(split.template)}
    optimizer = make_optimizer(config.optimizer, 10, trainable)
    theworld = types.SimpleNamespace(gemma_config=gemma, config=world, num_world_tokens=lambda frames: 4096)
    layout = model_lib.attention_layout(theworld, image_start=4096 + 3)  # the launcher's rows: <bos>, markers, world
    step = TrainStep(split, optimizer, layout=layout, remat=config.model.remat)
    step.staged = False  # the update as one program (the launcher stages it since the twelfth session)
    rows, ids, image = (1, args.batch), 4480 - 4096, gemma.vision.image_size
    s = lambda *shape, dtype=jnp.int32: jax.ShapeDtypeStruct(rows + shape, dtype)  # noqa: E731
    batch = dict(input_ids=s(ids), attention_mask=s(ids), token_type_ids=s(ids), labels=s(ids), keep=s(24),
                 pixel_values=s(3, image, image, dtype=jnp.bfloat16), video=s(1, 512, 512, 3, dtype=jnp.float32))
    # the update's program (TrainStep.lower's last; the frozen encoders are a program of their own since the
    # eleventh session)
    update = types.SimpleNamespace(lower=lambda *arguments: step.lower(*arguments)[-1])
    return update, (trainable, jax.eval_shape(optimizer.init, trainable), split.frozen, batch)


def choose(args):
    """`sampling.choose` alone on (--batch, 262,208) float32 logits: greedy, or with --sampling a draw after
    --top-k (default none) and --top-p (1: none)."""
    import jax
    import jax.numpy as jnp

    from theworld_jax import sampling

    vocab = _gemma_config().text.vocab_size
    kw = dict(do_sample=True, top_k=args.top_k, top_p=args.top_p) if args.sampling else {}
    config = sampling.SamplingConfig.make(vocab_limit=vocab, vocab_size=vocab, **kw)

    def run(logits, key, temperature, top_p):
        return sampling.choose(logits, key, config, temperature, top_p)

    return jax.jit(run), (jax.ShapeDtypeStruct((args.batch, vocab), jnp.float32),
                          jax.eval_shape(lambda: jax.random.key(0)), jnp.float32(1.0), jnp.float32(args.top_p))


def _as_on_the_card(sharding) -> dict:
    """Patches for tracing as on the GPU: the library picks cuDNN attention and its Pallas kernels when
    jax.default_backend() is "gpu", jax.nn's cuDNN attention checks the compute capability of a local GPU
    and Pallas's Triton lowering asks for the local GPU's (jax internals)."""
    from jax._src.pallas.triton import gpu_info

    capability = tuple(int(x) for x in sharding.mesh.devices.flat[0].compute_capability.split("."))
    version = lambda c: tuple(int(x) for x in c.split("."))  # noqa: E731
    attention = "jax._src.cudnn.fused_attention_stablehlo"
    card = gpu_info.GpuInfo(gpu_version=None, arch_name=".".join(map(str, capability)),
                            compute_capability=capability[0] * 10 + capability[1])
    return {"jax.default_backend": lambda: "gpu",
            f"{attention}.check_compute_capability": lambda c: capability >= version(c),
            f"{attention}.is_cuda_compute_capability_equal": lambda c: capability == version(c),
            "jax._src.pallas.triton.gpu_info.get_gpu_info": lambda: card}


def compile_program(args) -> tuple[str, dict]:
    """(optimized HLO text, record) of program `args.program` compiled for the H200 target."""
    import jax

    from bench import decode_profile
    from bench.common import host_event_table, host_trace

    if args.variant not in decode_profile.VARIANTS:
        raise SystemExit(f"--variant {args.variant!r} is not one of bench.decode_profile's "
                         f"{sorted(decode_profile.VARIANTS)}")
    options = dict(decode_profile.VARIANTS[args.variant])
    for flag in args.xla_flag:
        name, _, value = flag.partition("=")
        options[name.lstrip("-")] = {"true": True, "false": False}.get(value.lower(), value)
    sharding = h200_sharding(args.target)
    program, arguments = globals()[args.program](args)
    patch = getattr(decode_profile, "PATCHES", {}).get(args.variant)  # older versions had none
    with contextlib.ExitStack() as stack:
        for target, value in _as_on_the_card(sharding).items():
            stack.enter_context(mock.patch(target, value))
        if patch:
            saved = getattr(patch[0], patch[1])
            setattr(patch[0], patch[1], patch[2])
            stack.callback(setattr, patch[0], patch[1], saved)
        t0 = time.perf_counter()
        lowered = program.lower(*placed(arguments, sharding))
        t1 = time.perf_counter()
        with tempfile.TemporaryDirectory() as trace_dir:
            with host_trace(trace_dir) if args.profile else contextlib.nullcontext():
                compiled = lowered.compile(options or None)
            t2 = time.perf_counter()
            profile = host_event_table(trace_dir, top=40) if args.profile else None
    record = dict(program=args.program, batch=args.batch, sampling=args.sampling, variant=args.variant,
                  top_k=args.top_k if args.sampling else None, top_p=args.top_p if args.sampling else None,
                  options={k: str(v) for k, v in options.items()}, jax=jax.__version__,
                  device=str(sharding.mesh.devices.flat[0]), lower_s=round(t1 - t0, 2), compile_s=round(t2 - t1, 2),
                  memory_gib=planned_memory(compiled), compile_profile=profile)
    return compiled.as_text(), record


def planned_memory(compiled) -> dict | None:
    """XLA's memory plan of a compiled program in GiB: arguments, outputs, temporaries, aliased (donated
    arguments reused as outputs) and their peak, arguments + outputs + temporaries - aliased (the fourth
    session found it within 1 % of the H200's measured peak, bench/results/train_gpu.md)."""
    mem = compiled.memory_analysis()
    if mem is None:
        return None
    parts = dict(arguments=mem.argument_size_in_bytes, outputs=mem.output_size_in_bytes,
                 temporaries=mem.temp_size_in_bytes, aliased=mem.alias_size_in_bytes)
    parts["peak"] = parts["arguments"] + parts["outputs"] + parts["temporaries"] - parts["aliased"]
    return {k: round(v / 2**30, 2) for k, v in parts.items()}


def census_report(text: str, layers: int) -> dict:
    """The kernel census of an HLO text and, for the outermost while loop, its kernels per iteration."""
    from bench.hlo_census import expanded, kernel_census

    census = kernel_census(text, layers)
    outer = next((c for c in census["ENTRY"]["inner"] if census[c]["role"] == "while body"), None)
    step = expanded(census, outer) if outer else None
    copied = expanded(census, outer, "copy_bytes") if outer else None
    call, call_copied = expanded(census, "ENTRY"), expanded(census, "ENTRY", "copy_bytes")
    moved = expanded(census, "ENTRY", "moved_bytes")
    return dict(per_call=dict(call), per_call_kernels=sum(call.values()), per_call_copy_bytes=dict(call_copied),
                per_call_moved_bytes=dict(moved),
                computations={k: {f: v for f, v in c.items() if f != "inner"} for k, c in census.items()},
                per_step=dict(step) if step else None, per_step_kernels=sum(step.values()) if step else None,
                per_step_per_layer=sum(step.values()) / layers if step else None,
                per_step_copy_bytes=dict(copied) if copied else None)


def summary(name: str, report: dict) -> str:
    """A few lines: the kernels of the entry and of one iteration of the outermost loop, by kind."""
    lines = [f"{name}: entry {report['computations']['ENTRY']['kinds']}",
             f"  one call, loops run their known trip counts (unknown: once): {report['per_call_kernels']} kernels: "
             + ", ".join(f"{k} {v}" for k, v in sorted(report["per_call"].items(), key=lambda kv: -kv[1])),
             "  copied in one call: " + ", ".join(f"{k} {v / 2**20:.1f} MiB"
                                                 for k, v in report["per_call_copy_bytes"].items())]
    moved = report.get("per_call_moved_bytes", {})
    streaming = sum(v for k, v in moved.items() if not k.startswith(("gemm", "cudnn")))
    lines.append(f"  read and written in one call: {sum(moved.values()) / 2**30:.2f} GiB, of which kernels other than "
                 f"GEMMs and cuDNN {streaming / 2**30:.2f} GiB ({1e3 * streaming / 3e12:.1f} ms at 3 TB/s)")
    if report["per_step"]:
        lines.append(f"  per loop iteration: {report['per_step_kernels']} kernels "
                     f"({report['per_step_per_layer']:.1f} per layer): "
                     + ", ".join(f"{k} {v}" for k, v in sorted(report["per_step"].items(), key=lambda kv: -kv[1])))
        if report["per_step_copy_bytes"]:
            lines.append("  copied per loop iteration: " + ", ".join(
                f"{k} {v / 2**20:.1f} MiB" for k, v in report["per_step_copy_bytes"].items()))
    for comp, c in report["computations"].items():
        if c["role"] == "while body":
            lines.append(f"  while body {comp} (trip count {c['trip_count']}): {c['kernels']} kernels {c['kinds']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("program", nargs="?", choices=PROGRAMS)
    parser.add_argument("--census", metavar="HLO", help="only the census of this HLO text file (.txt or .txt.gz)")
    parser.add_argument("--out", default=None, help="directory for <tag>.hlo.txt.gz and <tag>.json")
    parser.add_argument("--profile", action="store_true",
                        help="trace XLA's compile with jax.profiler: host ms per compiler event in the record")
    parser.add_argument("--tag", default=None, help="file name stem (default: program, batch, sampling, variant)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt-len", type=int, default=4400)
    parser.add_argument("--steps", type=int, default=128, help="decode: tokens per row (the buffer's bucket)")
    parser.add_argument("--sampling", action="store_true",
                        help="decode, choose: sample with --top-k and --top-p (default: greedy)")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--variant", default="plain", help="decode_profile's VARIANTS / PATCHES name")
    parser.add_argument("--xla-flag", action="append", default=[], metavar="NAME=VALUE",
                        help="an XLA debug option for this program's compilation (repeatable)")
    parser.add_argument("--logits", default="labelled", choices=("labelled", "full", "last"), help="forward")
    parser.add_argument("--remat", default="none", help="train: the decoder's remat policy")
    parser.add_argument("--layers", type=int, default=34, help="decoder layers (per-layer counts)")
    parser.add_argument("--target", default=TARGET, help="GpuTargetConfig textproto")
    args = parser.parse_args(argv)
    if args.census:
        opener = gzip.open if args.census.endswith(".gz") else open
        with opener(args.census, "rt") as f:
            report = census_report(f.read(), args.layers)
        print(summary(args.census, report))
        return 0
    if not args.program:
        parser.error("name a program or give --census")
    text, record = compile_program(args)
    record.update(census_report(text, args.layers))
    sampled = f"_sampling{f'_k{args.top_k}' if args.top_k else ''}" if args.sampling else ""
    tag = args.tag or f"{args.program}_B{args.batch}{sampled}_{args.variant}"
    print(f"compiled in {record['compile_s']} s (lowered in {record['lower_s']} s); planned memory (GiB): "
          f"{record['memory_gib']}")
    print(summary(tag, record))
    if args.program == "smoke":
        print(text[text.index("ENTRY"):])
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with gzip.open(os.path.join(args.out, f"{tag}.hlo.txt.gz"), "wt") as f:
            f.write(text)
        with open(os.path.join(args.out, f"{tag}.json"), "w") as f:
            json.dump(record, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
