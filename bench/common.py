"""Shared pieces of the GPU scripts: the gemma-3-4b-it config, prompt ids, a timestamped log, timing."""

from __future__ import annotations

import datetime
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time

from tests.helpers.full_size import GEMMA3_4B_CONFIG  # noqa: F401 (re-exported for the GPU scripts)

TEXT_IDS = (3, 255999)  # random prompt words: no pad/eos/bos, below the image ids

_T0 = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - _T0:7.1f}s] {message}", flush=True)


class ClockLog:
    """The GPU's SM clock, power draw and throttle reasons, sampled by `nvidia-smi` every `interval_ms` in
    the background while the context is open. `summary(start, end)`, inside the context, describes the
    samples between two `time.time()` stamps; leaving the context stops nvidia-smi and deletes its log.
    Without nvidia-smi (CPU runs) nothing is sampled and every summary is None.

    The sixteenth session found the training step at the H200's 700 W limit, its SM clock 16-22 % below the
    top one (bench/results/train_gpu.md): step times from different calls compare only with their clocks."""

    QUERY = "timestamp,clocks.sm,power.draw,clocks_event_reasons.active"
    SW_POWER_CAP = 0x4  # nvidia-smi's clocks_event_reasons bit: the driver lowered the clock for power

    def __init__(self, interval_ms: int = 100):
        self.interval_ms = interval_ms
        self._process = self._file = None

    def __enter__(self) -> "ClockLog":
        if shutil.which("nvidia-smi"):
            self._file = tempfile.NamedTemporaryFile("w+", suffix=".csv", prefix="clocks_")
            self._process = subprocess.Popen(
                ["nvidia-smi", f"--query-gpu={self.QUERY}", "--format=csv,noheader,nounits", "-i", "0",
                 "-lms", str(self.interval_ms)], stdout=self._file, stderr=subprocess.DEVNULL)
        return self

    def __exit__(self, *exc) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait()
            self._file.close()  # a NamedTemporaryFile: closing deletes it
            self._process = self._file = None

    def summary(self, start: float, end: float) -> dict | None:
        if self._file is None:
            return None
        self._file.flush()
        with open(self._file.name) as f:
            return clock_summary(f.read().splitlines(), start, end)


def clock_summary(lines: list[str], start: float, end: float) -> dict | None:
    """Median SM clock (MHz) and power (W), and the share of samples under the software power cap, over
    the `nvidia-smi --format=csv,noheader,nounits` lines of ClockLog.QUERY stamped in [start, end] (local
    time, as time.time()); None when no sample falls there."""
    samples = []
    for line in lines:
        fields = [f.strip() for f in line.split(",")]
        if len(fields) != 4:
            continue
        try:
            stamp = datetime.datetime.strptime(fields[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()
            samples.append((stamp, float(fields[1]), float(fields[2]), int(fields[3], 16)))
        except ValueError:  # a partial last line, or "[N/A]"
            continue
    inside = [s for s in samples if start <= s[0] <= end]
    if not inside:
        return None
    return {"samples": len(inside), "sm_clock_mhz": statistics.median(s[1] for s in inside),
            "power_w": statistics.median(s[2] for s in inside),
            "power_capped_share": sum(1 for s in inside if s[3] & ClockLog.SW_POWER_CAP) / len(inside)}


def write_report(directory: str, name: str, report: dict, text: str) -> None:
    """directory/name.json (the report) and directory/name.md (its table)."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, f"{name}.json"), "w") as f:
        json.dump(report, f, indent=2, default=str)
    with open(os.path.join(directory, f"{name}.md"), "w") as f:
        f.write(text)


def timed(fn, wait=lambda out: out, repeats: int = 3, warmup: int = 0):
    """(result of the first call, first-call seconds, median seconds of `repeats` timed calls, their
    seconds). `wait(result)` blocks until the result is computed (CUDA sync, jax.block_until_ready);
    `warmup` more untimed calls run between the first call and the timed ones."""
    t0 = time.perf_counter()
    out = fn()
    wait(out)
    first = time.perf_counter() - t0
    for _ in range(warmup):
        wait(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        wait(fn())
        times.append(time.perf_counter() - t0)
    return out, first, statistics.median(times), times


KERNEL_KINDS = (("attention", ("flash", "fmha", "cudnn", "sdpa")),
                ("gemm", ("gemm", "xmma", "cutlass", "nvjet", "cublas", "sm90_", "matmul")),
                ("copy", ("copy", "transpose", "memcpy", "memset", "dynamic_update_slice", "dynamic_slice")),
                ("reduction", ("reduce", "reduction")))


def kernel_kind(name: str) -> str:
    """A coarse class of a GPU kernel name: gemm, attention, copy, reduction or elementwise."""
    low = name.lower()
    for kind, needles in KERNEL_KINDS:
        if any(n in low for n in needles):
            return kind
    return "elementwise"


def kernel_table(trace_dir: str) -> dict:
    """Kernels of the GPU planes of a jax.profiler trace: per hlo_op and per kernel name total ns and count,
    ns per kernel_kind, the busy span, and the idle time between kernels (`gaps`: total ns, and the 30
    longest with the kernels on either side)."""
    import collections
    import glob

    from jax.profiler import ProfileData

    paths = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
    data = ProfileData.from_file(paths[0])
    ops, names = collections.defaultdict(lambda: [0, 0]), collections.defaultdict(lambda: [0, 0])
    kinds, lines, starts, ends = collections.defaultdict(lambda: [0, 0]), {}, [], []
    kernels_ns, timeline = 0, []
    for plane in data.planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        for line in plane.lines:
            events = list(line.events)
            lines[f"{plane.name}/{line.name}"] = [len(events), int(sum(e.duration_ns for e in events))]
            if not line.name.startswith("Stream"):
                continue
            for e in events:
                stats = dict(e.stats)
                op = stats.get("hlo_op") or e.name
                for table, key in ((ops, op), (names, e.name), (kinds, kernel_kind(e.name))):
                    table[key][0] += int(e.duration_ns)
                    table[key][1] += 1
                kernels_ns += int(e.duration_ns)
                starts.append(e.start_ns)
                ends.append(e.start_ns + e.duration_ns)
                timeline.append((e.start_ns, e.start_ns + e.duration_ns, e.name))
    span = (max(ends) - min(starts)) if starts else 0
    top = lambda table, n=None: dict(sorted(table.items(), key=lambda kv: -kv[1][0])[:n])  # noqa: E731
    return dict(lines=lines, kernels_ns=kernels_ns, span_ns=int(span), kernel_count=sum(v[1] for v in ops.values()),
                kinds=top(kinds), names=top(names, 60), ops=top(ops), gaps=_gaps(timeline))


def _gaps(timeline: list[tuple[int, int, str]], top: int = 30) -> dict:
    """Idle time between consecutive kernels of (start_ns, end_ns, name) events on any stream: the total,
    a histogram (gaps under 2 us, 2-10 us, 10-100 us, longer: [count, ns]) and the `top` longest."""
    timeline = sorted(timeline)
    found, end, last = [], None, None
    for start, stop, name in timeline:
        if end is not None and start > end:
            found.append((start - end, last, name))
        if end is None or stop > end:
            end, last = stop, name
    bins = {"<2us": [0, 0], "2-10us": [0, 0], "10-100us": [0, 0], ">=100us": [0, 0]}
    for ns, _, _ in found:
        key = "<2us" if ns < 2e3 else "2-10us" if ns < 1e4 else "10-100us" if ns < 1e5 else ">=100us"
        bins[key][0] += 1
        bins[key][1] += int(ns)
    longest = sorted(found, key=lambda g: -g[0])[:top]
    return dict(total_ns=int(sum(g[0] for g in found)), bins=bins,
                longest=[[int(ns), before[:120], after[:120]] for ns, before, after in longest])


def host_trace(trace_dir: str):
    """jax.profiler into `trace_dir` without Python's events (the compiler's own are what is wanted)."""
    import jax

    options = jax.profiler.ProfileOptions()
    options.python_tracer_level = 0
    return jax.profiler.trace(trace_dir, profiler_options=options)


def host_event_table(trace_dir: str, top: int = 60) -> dict:
    """The host threads' events of a jax.profiler trace (XLA's compiler passes, autotuning, LLVM and
    ptxas among them): per event name the inclusive total ms and the count, the `top` longest."""
    import collections
    import glob

    from jax.profiler import ProfileData

    paths = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
    totals = collections.defaultdict(lambda: [0.0, 0])
    for plane in ProfileData.from_file(paths[0]).planes:
        if plane.name.startswith("/device:GPU"):
            continue
        for line in plane.lines:
            for e in line.events:
                totals[e.name][0] += e.duration_ns / 1e6
                totals[e.name][1] += 1
    ranked = sorted(totals.items(), key=lambda kv: -kv[1][0])[:top]
    return {name: [round(ms, 1), count] for name, (ms, count) in ranked}


def host_timeline(trace_dir: str, min_us: float = 50.0, limit: int = 400) -> list:
    """The host threads' events of at least `min_us` in a jax.profiler trace, in time order: [start in us
    from the first GPU kernel, duration in us, thread, name] (at most `limit`): where the host spent the
    time the device waited for it."""
    import glob

    from jax.profiler import ProfileData

    paths = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
    host, first = [], None
    for plane in ProfileData.from_file(paths[0]).planes:
        for line in plane.lines:
            for e in line.events:
                if plane.name.startswith("/device:GPU"):
                    if line.name.startswith("Stream"):
                        first = e.start_ns if first is None else min(first, e.start_ns)
                elif e.duration_ns >= min_us * 1e3:
                    host.append((e.start_ns, e.duration_ns, line.name, e.name))
    host.sort()
    first = first or 0
    return [[round((t - first) / 1e3, 1), round(d / 1e3, 1), thread[:40], name[:120]]
            for t, d, thread, name in host[:limit]]


def trace_call(fn, wait, name: str) -> None:
    """With BENCH_TRACE=DIR set: one more call of fn under jax.profiler, its kernel table written to
    DIR/kernels_<name>.json and summed per kind in the log. Without it: nothing."""
    directory = os.environ.get("BENCH_TRACE")
    if not directory:
        return
    import tempfile

    import jax

    os.makedirs(directory, exist_ok=True)
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            wait(fn())
        table = kernel_table(trace_dir)
        table["host"] = host_event_table(trace_dir, top=40)
        table["host_timeline"] = host_timeline(trace_dir)
    with open(os.path.join(directory, f"kernels_{name}.json"), "w") as f:
        json.dump(table, f, indent=1)
    kinds = ", ".join(f"{k} {v[0] / 1e6:.1f} ms ({v[1]})" for k, v in table["kinds"].items())
    log(f"trace {name}: kernels {table['kernels_ns'] / 1e6:.1f} ms in {table['kernel_count']}, span "
        f"{table['span_ns'] / 1e6:.1f} ms; {kinds}")


def hf_config(tiny: bool):
    import transformers

    if tiny:
        from tests.helpers.tiny_gemma import tiny_gemma3_config
        return tiny_gemma3_config()
    return transformers.Gemma3Config(**GEMMA3_4B_CONFIG)


def randomize_gemma(model, seed: int, embed_std: float):
    """Re-draw what transformers initialises to zero or one: RMSNorms, LayerNorms, SigLIP biases, projector."""
    import torch
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

    emb = model.model.language_model.embed_tokens.weight
    gen = torch.Generator(device=emb.device).manual_seed(seed)
    rand = lambda p: torch.randn(p.shape, generator=gen, device=p.device, dtype=p.dtype)  # noqa: E731
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, Gemma3RMSNorm):
                module.weight.copy_(0.1 * rand(module.weight))
            elif isinstance(module, torch.nn.LayerNorm):
                module.weight.copy_(1 + 0.1 * rand(module.weight))
        for name, param in model.model.vision_tower.named_parameters():
            if name.endswith("bias"):
                param.copy_(0.05 * rand(param))
        proj = model.model.multi_modal_projector.mm_input_projection_weight
        proj.copy_(rand(proj) / proj.shape[0] ** 0.5)
        emb.copy_(embed_std * rand(emb))
    return model
