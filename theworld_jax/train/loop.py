"""The training run: model and data set up, the step loop with metrics, evaluation, checkpoints and
exact resume, and final/."""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from theworld_jax import interval_attention, sharding
from theworld_jax.train import data as data_lib
from theworld_jax.train import model as model_lib
from theworld_jax.train import outputs
from theworld_jax.train.step import TrainStep, learning_rate_schedule, make_optimizer

# Fault injection for the kill-and-resume test: SIGKILL this process after this step, once the checkpoint
# saves in flight are committed (an uncommitted one is discarded by Orbax on restart, also safe).
KILL_ENV = "THEWORLD_TRAIN_SIGKILL_AFTER_STEP"


def log(message: str) -> None:
    if jax.process_index() == 0:
        print(message, flush=True)


@dataclasses.dataclass
class Run:
    """Everything a run holds between steps."""

    config: object
    theworld: object
    mesh: object
    split: model_lib.SplitModel
    train_step: TrainStep
    sampler: data_lib.Sampler
    loader: data_lib.Loader
    total_steps: int
    batch_devices: int
    keep: int  # K of logits_to_keep: the most target tokens of a training row


def build_mesh(mesh_cfg):
    return sharding.make_mesh(mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor)


def batch_axes(mesh) -> tuple[str, ...]:
    return ("data", "fsdp")


def to_global(mesh, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """This process's rows (A, g, ...) -> global arrays (A, G, ...) split over the batch mesh axes."""
    out = {}
    for key, value in local.items():
        spec = PartitionSpec(None, batch_axes(mesh), *([None] * (value.ndim - 2)))
        global_shape = (value.shape[0], value.shape[1] * jax.process_count(), *value.shape[2:])
        out[key] = jax.make_array_from_process_local_data(NamedSharding(mesh, spec), value, global_shape)
    return out


def setup(config) -> tuple[Run, dict, data_lib.Dataset, data_lib.Dataset | None]:
    """Build the model on the mesh, split it, read the data, make the sampler, loader and step."""
    mesh = build_mesh(config.mesh)
    theworld = model_lib.build_theworld(config.model, init=config.init, seed=config.seed, mesh=mesh)
    theworld.model = sharding.shard_module(theworld.model, mesh)
    theworld.mesh = mesh
    paths = model_lib.trainable_paths(theworld.model, theworld.config)
    split = model_lib.split_trainable(theworld.model, paths)

    gemma = theworld.gemma_config
    encoder = data_lib.Encoder(theworld.processor, gemma.image_token_id, config.data.loss_on,
                               world_marker_id=theworld.config.sow_token_id if theworld.config.enable_world else None)
    extra = model_lib.extra_tokens(theworld)
    train_set = data_lib.load_dataset(config.data.train, config.data, encoder, extra_tokens=extra)
    eval_set = None
    if config.data.eval:
        eval_set = data_lib.load_dataset(config.data.eval, config.data, encoder, extra_tokens=extra,
                                         max_rows=config.data.eval_rows)
    batch_devices = mesh.shape["data"] * mesh.shape["fsdp"]
    rows_per_micro = config.data.batch_size * batch_devices
    if rows_per_micro % jax.process_count():
        raise ValueError(f"{rows_per_micro} rows per micro-batch do not split over {jax.process_count()} processes")
    rows_per_step = rows_per_micro * config.optimizer.accumulation
    fused = train_set.lengths + extra
    multiple = pad_multiple(config.data.pad_multiple)
    buckets = data_lib.bucket_lengths(fused, config.data.length_buckets, multiple, config.data.max_length)
    sampler = data_lib.Sampler(fused, rows_per_step, seed=config.seed, buckets=buckets,
                               window=config.data.bucket_window)
    total = config.steps or data_lib.steps_for(config.epochs, sampler.steps_per_epoch)
    draw = None
    if config.data.draw_bboxes:
        from theworld_jax.spatial_regions import draw_regions as draw
    loader = data_lib.Loader(train_set, encoder, model_lib.image_preparer(theworld), extra_tokens=extra,
                             pad_id=gemma.text.pad_token_id, num_threads=config.data.num_threads, draw_boxes=draw)
    trainable = split.initial_trainable()
    optimizer = make_optimizer(config.optimizer, total, trainable)
    keep = model_lib.keep_size(train_set.targets)
    sets = [d for d in (train_set, eval_set) if d is not None]
    image_start = min(int(d.image_starts.min(initial=config.data.max_length)) for d in sets)
    layout = model_lib.attention_layout(theworld, image_start)
    step = TrainStep(split, optimizer, layout=layout, remat=config.model.remat)
    run = Run(config, theworld, mesh, split, step, sampler, loader, total, batch_devices, keep)
    replicated = NamedSharding(mesh, PartitionSpec())
    opt_state = jax.tree.map(lambda x: x if isinstance(x.sharding, NamedSharding) else jax.device_put(x, replicated),
                             jax.jit(optimizer.init)(trainable))
    state = {"params": trainable, "opt_state": opt_state}
    n_train = sum(int(np.prod(v.shape)) for v in trainable.values())
    log(f"model: {config.init or config.model.name}; training {len(trainable)} tensors ({n_train:,} parameters), "
        f"the rest frozen")
    log(f"data: {len(train_set.samples)} rows, {train_set.num_skipped} skipped {dict(train_set.skipped)}; "
        f"{rows_per_step} rows per step, {sampler.steps_per_epoch} steps per epoch, {total} steps; "
        f"padded lengths {buckets} (padding {sampler.padding_fraction():.1%})")
    return run, state, train_set, eval_set


def pad_multiple(multiple: int) -> int:
    """Padded fused lengths are multiples of `multiple`, and on GPUs of what the fast attention pads its
    calls to (`interval_attention.CUDNN_MULTIPLE`: it would pad anyway; padding tokens change no result)."""
    return math.lcm(multiple, interval_attention.CUDNN_MULTIPLE) if jax.default_backend() == "gpu" else multiple


def local_batch(run: Run, step: int) -> tuple[dict[str, np.ndarray], int]:
    """This process's share (A, g, ...) of step `step`'s rows, and its real token count."""
    plan = run.sampler.step(step)
    accumulation = run.config.optimizer.accumulation
    rows = plan.rows.reshape(accumulation, -1)
    share = rows.shape[1] // jax.process_count()
    mine = rows[:, jax.process_index() * share:(jax.process_index() + 1) * share].reshape(-1)
    flat = model_lib.with_keep(model_lib.prepare(run.theworld, run.loader.batch(mine, plan.length)), run.keep)
    tokens = int(flat["attention_mask"].sum()) + (model_lib.extra_tokens(run.theworld) - 2) * len(mine) * \
        run.theworld.config.enable_world
    return {k: v.reshape(accumulation, share, *v.shape[1:]) for k, v in flat.items()}, tokens


def evaluate(run: Run, trainable, eval_set: data_lib.Dataset, encoder_loader: data_lib.Loader) -> float:
    """Mean target-token cross-entropy over the eval rows."""
    rows_per_batch = run.config.data.batch_size * run.batch_devices
    extra = model_lib.extra_tokens(run.theworld)
    length = data_lib.bucket_lengths(eval_set.lengths + extra, 1, pad_multiple(run.config.data.pad_multiple),
                                     run.config.data.max_length)[-1]
    keep = model_lib.keep_size(eval_set.targets)
    total, count = 0.0, 0
    indices = np.arange(len(eval_set.samples))
    for start in range(0, len(indices), rows_per_batch):
        rows = indices[start:start + rows_per_batch]
        share = rows_per_batch // jax.process_count()
        padded = np.concatenate([rows, np.full(rows_per_batch - len(rows), -1)])
        mine = padded[jax.process_index() * share:(jax.process_index() + 1) * share]
        flat = model_lib.with_keep(model_lib.prepare(run.theworld, encoder_loader.batch(mine, length)), keep)
        batch = to_global(run.mesh, {k: v[None] for k, v in flat.items()})
        t, c = run.train_step.evaluate(trainable, run.split.frozen, batch)
        total, count = total + float(t), count + int(c)
    return total / max(count, 1)


def train(config) -> str:
    """Run (or resume) `config`; returns the final/ directory."""
    resumed = outputs.claim_output_dir(config.output_dir, config.to_dict(),
                                       sources=(config.init, config.data.train, config.data.eval))
    run, state, train_set, eval_set = setup(config)
    manager = outputs.checkpoint_manager(config.output_dir, config.keep_checkpoints)
    start = 0
    latest = manager.latest_step()
    if latest is not None:
        state, meta = outputs.restore_checkpoint(manager, latest, state)
        start = int(meta["step"])
        log(f"resumed from {os.path.join(config.output_dir, outputs.CHECKPOINTS, str(latest))} at step {start}")
    elif resumed:
        log("output_dir holds an earlier run without checkpoints: starting at step 0")
    eval_loader = None
    if eval_set is not None:
        eval_loader = data_lib.Loader(eval_set, run.loader.encoder, run.loader.prepare_image,
                                      extra_tokens=model_lib.extra_tokens(run.theworld),
                                      pad_id=run.loader.pad_id, num_threads=config.data.num_threads,
                                      draw_boxes=run.loader.draw_boxes)
    metrics = outputs.MetricsWriter(config.output_dir, start)
    kill_at = int(os.environ.get(KILL_ENV, "-1"))
    lr_at = learning_rate_schedule(config.optimizer, run.total_steps)
    bar = _progress(config, start, run.total_steps)
    params, opt_state = state["params"], state["opt_state"]
    prefetch = ThreadPoolExecutor(1)  # the next step's rows are read while the device works
    upcoming = prefetch.submit(local_batch, run, start) if start < run.total_steps else None
    window_tokens, window_start = 0, time.perf_counter()
    for step in range(start, run.total_steps):
        local, tokens = upcoming.result()
        if step + 1 < run.total_steps:
            upcoming = prefetch.submit(local_batch, run, step + 1)
        batch = to_global(run.mesh, local)
        params, opt_state, out = run.train_step.step(params, opt_state, run.split.frozen, batch)
        window_tokens += tokens * jax.process_count()
        done = step + 1
        if done % config.log_every == 0 or done == run.total_steps:
            loss = float(out["loss"])
            elapsed = time.perf_counter() - window_start
            steps_in_window = (done - start - 1) % config.log_every + 1
            record = {"step": done, "loss": loss, "learning_rate": float(lr_at(step)),
                      "tokens_per_s": window_tokens / elapsed, "step_s": elapsed / steps_in_window,
                      "grad_norm": float(out["grad_norm"]), "tokens": tokens * jax.process_count(),
                      "target_tokens": int(out["target_tokens"]), "padded_length": int(local["attention_mask"].shape[-1]),
                      "skipped_rows": run.loader.unreadable, "epoch": step // run.sampler.steps_per_epoch,
                      **_memory()}
            metrics.write(record)
            if bar is not None:
                bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
            else:
                log(f"step {done}/{run.total_steps} loss {loss:.4f} lr {record['learning_rate']:.3g} "
                    f"tokens/s {record['tokens_per_s']:.0f}")
            window_tokens, window_start = 0, time.perf_counter()
        if bar is not None:
            bar.update(1)
        if eval_set is not None and config.eval_every and (done % config.eval_every == 0 or done == run.total_steps):
            eval_loss = evaluate(run, params, eval_set, eval_loader)
            metrics.write({"step": done, "eval_loss": eval_loss})
            log(f"step {done}: eval loss {eval_loss:.4f}")
            window_start = time.perf_counter()
        if done % config.checkpoint_every == 0 or done == run.total_steps:
            outputs.save_checkpoint(manager, done, {"params": params, "opt_state": opt_state},
                                    {"step": done, "seed": config.seed, "skipped": dict(train_set.skipped),
                                     "unreadable": run.loader.unreadable})
        if done == kill_at:  # a crash after the last checkpoint was committed
            manager.wait_until_finished()
            os.kill(os.getpid(), signal.SIGKILL)
    prefetch.shutdown()
    manager.wait_until_finished()
    manager.close()
    if bar is not None:
        bar.close()
    metrics.close()
    final = os.path.join(os.path.abspath(config.output_dir), outputs.FINAL)
    if config.save_final:
        save_final(run, params, final)
        log(f"the trained model is in {final}")
    log(f"done: {run.total_steps} steps (train step compiled {run.train_step.compiles}x)")
    return final


def save_final(run: Run, params, directory: str) -> None:
    """`TheWorld.save_pretrained(output_dir/final)` of the trained model (trained parameters cast back
    to the model's dtype)."""
    run.theworld.model = run.split.merge(params, cast=True)
    if jax.process_count() == 1:
        run.theworld.save_pretrained(directory, overwrite=True)  # final/ of this run (ours)
    else:
        outputs.save_final_collectively(run.theworld, directory)


def _memory() -> dict:
    """Peak device memory of this process's first device, where the backend reports it (GPU, TPU)."""
    stats = jax.local_devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return {} if peak is None else {"peak_memory_gib": peak / 2 ** 30}


def _progress(config, start: int, total: int):
    if not config.progress_bar or jax.process_index() != 0 or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)

