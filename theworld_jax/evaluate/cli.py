"""Evaluate TheWorld on a benchmark file, optionally against a baseline, resumably.

    python -m theworld_jax.evaluate --model DIR --data FILE --out DIR [--baseline DIR | --no-world-baseline]
        [--batch-size N] [--max-new-tokens N] [--judge DIR] [--cosmos VAE_DIR] [--dtype bfloat16] [--limit N]
        [--mesh DATA,FSDP,TENSOR]

OUT/<name>/predictions.jsonl and OUT/<name>/report.json for each model (name: model, baseline or
no_world), OUT/report.md and OUT/accuracy.png for all of them. `--no-world-baseline` runs the same
checkpoint with the world branch off (Gemma 3 alone: upstream's enable_world=False ablation). Rerunning
the same command continues an interrupted run. All arguments are checked before a model is loaded.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from theworld_jax import cli, progress

MARKER = "evaluate.json"  # written first into OUT; marks the directory as this tool's
RUN_INFO = "run.json"  # per model: its path and whether the world branch ran
DEFAULT_NEW_TOKENS = {"choice": 16, "binary": 8, "open": 32, "quantity": 128, "judge": 128}
JUDGE_NEW_TOKENS = 8


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m theworld_jax.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a TheWorld / Gemma 3 checkpoint directory or hub id")
    p.add_argument("--data", required=True, help="benchmark rows: .jsonl, .json or .parquet")
    p.add_argument("--out", required=True, help="output directory (new, empty, or an earlier run's to resume)")
    base = p.add_mutually_exclusive_group()
    base.add_argument("--baseline", help="a second checkpoint to compare with")
    base.add_argument("--no-world-baseline", action="store_true",
                      help="compare with the same checkpoint, world branch off")
    p.add_argument("--batch-size", type=int, default=8, help="rows per generate call (default 8)")
    p.add_argument("--max-new-tokens", type=int,
                   help="default: by the kinds of rows (choice 16, binary 8, open 32, SpatialRGPT 128)")
    p.add_argument("--judge", help="a local Gemma 3 / TheWorld checkpoint judging the qualitative rows")
    p.add_argument("--cosmos", help="the Cosmos VAE for a plain Gemma 3 --model / --baseline")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16", help="compute dtype (default bfloat16)")
    p.add_argument("--limit", type=int, help="only the first N rows")
    p.add_argument("--mesh", help="DATA,FSDP,TENSOR: place the model on a mesh of all devices (one may be -1)")
    cli.add_common(p)
    args = p.parse_args(argv)
    cli.prepare_jax(args)
    return args


def _check_checkpoint(flag: str, path: str | None) -> None:
    if path is None or os.path.isdir(path):
        return
    if os.path.exists(path) or path.startswith((".", "/", "~")) or path.count("/") != 1:
        raise SystemExit(f"error: {flag} {path!r} is not a checkpoint directory (nor a hub id owner/name)")


def _models(args) -> dict:
    models = {"model": {"path": args.model, "world": True}}
    if args.baseline:
        models["baseline"] = {"path": args.baseline, "world": True}
    elif args.no_world_baseline:
        models["no_world"] = {"path": args.model, "world": False}
    return models


def prepare_out(out: str, settings: dict, sources: list[str]) -> None:
    """Create OUT (or accept an earlier run of the same settings) through io_safety.make_output_dir; never
    touch a directory of other files, a source, or the current directory."""
    from theworld_jax.io_safety import UnsafeTargetError, make_output_dir

    marker = os.path.join(out, MARKER)
    if os.path.exists(out) and not os.path.isdir(out):
        raise SystemExit(f"error: --out {out!r} is a file")
    ours = os.path.isfile(marker)
    if os.path.isdir(out) and os.listdir(out):
        if not ours:
            raise SystemExit(f"error: --out {out!r} is not empty and was not made by this tool; pick a new one")
        with open(marker) as f:
            before = json.load(f)
        if before != settings:
            changed = sorted(k for k in set(before) | set(settings) if before.get(k) != settings.get(k))
            raise SystemExit(f"error: --out {out!r} holds a run with other {changed}; pick a new --out")
    try:
        make_output_dir(out, resume=ours, sources=sources, what="--out")
    except UnsafeTargetError as e:
        raise SystemExit(f"error: {e}") from e
    if not ours:
        with open(marker, "w") as f:
            json.dump(settings, f, indent=2)


def _load(path: str, args, *, text_only: bool = False):
    import jax.numpy as jnp

    from theworld_jax import TheWorld

    settings = {}
    config_path = os.path.join(path, "config.json")
    plain_gemma = False
    if os.path.isfile(config_path):
        with open(config_path) as f:
            plain_gemma = json.load(f).get("model_type") in ("gemma3", "gemma3_text")
    if plain_gemma and (text_only or not args.cosmos):
        settings["enable_world"] = False
    elif args.cosmos:
        settings["cosmos_model_name"] = args.cosmos
    if args.mesh:
        from theworld_jax.sharding import make_mesh

        settings["mesh"] = make_mesh(*_mesh_sizes(args.mesh))
    return TheWorld.from_pretrained(path, dtype=getattr(jnp, args.dtype), **settings)


def _mesh_sizes(text: str) -> tuple[int, int, int]:
    try:
        sizes = tuple(int(v) for v in text.split(","))
    except ValueError:
        sizes = ()
    if len(sizes) != 3 or any(v == 0 or v < -1 for v in sizes):
        raise SystemExit(f"error: --mesh must be DATA,FSDP,TENSOR (positive sizes, one may be -1), got {text!r}")
    return sizes


def main(argv=None) -> int:
    args = parse_args(argv)
    for flag, value in (("--batch-size", args.batch_size), ("--max-new-tokens", args.max_new_tokens),
                        ("--limit", args.limit)):
        if value is not None and value < 1:
            raise SystemExit(f"error: {flag} must be a positive integer, got {value}")
    for flag in ("model", "baseline", "judge", "cosmos"):
        _check_checkpoint(f"--{flag}", getattr(args, flag))
    if args.mesh:
        _mesh_sizes(args.mesh)
    progress.set_quiet(args.quiet)
    if args.debug:
        return _evaluate(args)
    try:
        return _evaluate(args)
    except KeyboardInterrupt:
        print("evaluate: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # the work's errors (a model that does not load, ...): one line, --debug for more
        print(f"evaluate: error: {cli.one_line(err)}", file=sys.stderr)
        return 1


def _evaluate(args) -> int:
    from theworld_jax.evaluate import plot, report, runner
    from theworld_jax.evaluate.data import load_items

    try:
        items, bad = load_items(args.data, limit=args.limit)
    except (OSError, ValueError, ImportError) as e:
        raise SystemExit(f"error: --data: {e}") from e
    if not items and not bad:
        raise SystemExit(f"error: --data {args.data!r} holds no rows")
    max_new = args.max_new_tokens or max((DEFAULT_NEW_TOKENS[it.kind] for it in items), default=16)
    models = _models(args)
    settings = {"data": os.path.abspath(args.data), "limit": args.limit, "models": models,
                "max_new_tokens": max_new, "judge": args.judge, "cosmos": args.cosmos, "dtype": args.dtype}
    prepare_out(args.out, settings, [args.data, args.model, args.baseline, args.judge, args.cosmos])

    logs, infos, loaded = {}, {}, {}
    for name, spec in models.items():
        directory = os.path.join(args.out, name)
        os.makedirs(directory, exist_ok=True)
        info_path = os.path.join(directory, RUN_INFO)
        log = runner.JsonlLog(os.path.join(directory, runner.PREDICTIONS))
        if all(r.id in log.rows for r in items + bad) and os.path.isfile(info_path):
            logs[name] = log  # finished earlier: no model load
        else:
            if spec["path"] not in loaded:
                loaded = {spec["path"]: _load(spec["path"], args)}  # one model in memory at a time
            model = loaded[spec["path"]]
            world = spec["world"] and model.config.enable_world
            report.write_json(info_path, {"model": spec["path"], "world": world, "data": settings["data"]})
            generate = runner.Generator(model, world=world, max_new_tokens=max_new)
            logs[name] = runner.run_predictions(generate, items, bad, directory, batch_size=args.batch_size,
                                                desc=name)
        with open(info_path) as f:
            infos[name] = json.load(f)
    loaded = {}
    judgments = {name: runner.JsonlLog(os.path.join(args.out, name, runner.JUDGMENTS)).rows for name in models}
    waiting = any(it.kind == "judge" and it.id not in judgments[name] and "prediction" in logs[name].rows.get(it.id, {})
                  for name in models for it in items)
    if args.judge and waiting:
        judge = runner.Generator(_load(args.judge, args, text_only=True), world=False,
                                 max_new_tokens=JUDGE_NEW_TOKENS)
        for name in models:
            judgments[name] = runner.run_judge(judge, items, logs[name], os.path.join(args.out, name),
                                               batch_size=args.batch_size, desc=f"judge {name}").rows
    reports = {}
    for name in models:
        info = dict(infos[name], judge=args.judge)
        reports[name] = report.build_report(items, logs[name].rows, judgments[name], info=info)
        report.write_json(os.path.join(args.out, name, "report.json"), reports[name])
    report.write_text(os.path.join(args.out, "report.md"), report.markdown(reports))
    report.write_text(os.path.join(args.out, "accuracy.png"), plot.accuracy_png(reports))
    for name, r in reports.items():
        o = r["overall"]
        acc = "-" if o["accuracy"] is None else f"{100 * o['accuracy']:.1f}%"
        print(f"{name}: accuracy {acc} over {o['n']} rows ({r['rows']['bad']} bad)")
    print(f"report: {os.path.join(args.out, 'report.md')}")
    return 0

