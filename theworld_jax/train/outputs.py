"""What a run writes under output_dir: step checkpoints (Orbax, async, the last N), metrics.jsonl,
TensorBoard event files, the resolved config, and final/.

A directory is ours when it holds `train_config.yaml` (written first by every run); the same output_dir
again resumes, and a non-empty directory that is not ours is refused (theworld_jax.io_safety): a run
never deletes or replaces what it did not create.
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import orbax.checkpoint as ocp
import yaml

MARKER = "train_config.yaml"
CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"
FINAL = "final"


def claim_output_dir(output_dir: str, config_dict: dict, sources=()) -> bool:
    """Create or reuse `output_dir` (theworld_jax.io_safety.make_output_dir: a non-empty directory is
    accepted only when it holds our marker, and never one that holds the `sources`); True when it held
    a run already (a resume). Writes the config."""
    from theworld_jax.io_safety import make_output_dir

    output_dir = os.path.abspath(output_dir)
    ours = os.path.isfile(os.path.join(output_dir, MARKER))
    if jax.process_index() == 0:
        make_output_dir(output_dir, resume=ours, sources=sources)
        tmp = os.path.join(output_dir, f".{MARKER}.tmp")
        with open(tmp, "w") as f:
            yaml.safe_dump(config_dict, f, sort_keys=False)
        os.replace(tmp, os.path.join(output_dir, MARKER))
    _barrier("claim_output_dir")
    return ours


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def save_final_collectively(theworld, directory: str) -> None:
    """save_pretrained for many processes: every process writes its shards of the parameters (Orbax),
    process 0 the configs and processor files, into one temporary directory renamed at the end."""
    from theworld_jax.checkpoint import save_params

    directory = os.path.abspath(directory)
    tmp = os.path.join(os.path.dirname(directory), f".{os.path.basename(directory)}.tmp-collective")
    old = tmp + "-old"
    if jax.process_index() == 0:
        for leftover in (tmp, old):  # of a run of ours killed while saving (they lie in our output_dir)
            shutil.rmtree(leftover, ignore_errors=True)
        os.makedirs(tmp)
        theworld.save_configs(tmp)
    _barrier("final-start")
    save_params(theworld.model, tmp)
    _barrier("final-params")
    if jax.process_index() == 0:  # an earlier final/ of this run (ours) is replaced
        if os.path.exists(directory):
            os.replace(directory, old)
        os.replace(tmp, directory)
        shutil.rmtree(old, ignore_errors=True)
    _barrier("final-done")


def checkpoint_manager(output_dir: str, keep: int) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True, create=True)
    return ocp.CheckpointManager(os.path.join(os.path.abspath(output_dir), CHECKPOINTS), options=options)


def save_checkpoint(manager: ocp.CheckpointManager, step: int, state: dict, meta: dict) -> None:
    """Start an async save of `state` (arrays) and `meta` (JSON) as step `step`."""
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))


def restore_checkpoint(manager: ocp.CheckpointManager, step: int, like: dict) -> tuple[dict, dict]:
    """(state, meta) of step `step`, each array read straight onto the sharding of `like`'s."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    out = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                        meta=ocp.args.JsonRestore()))
    return out["state"], out["meta"]


class MetricsWriter:
    """metrics.jsonl (one object per logged step) and TensorBoard scalars; process 0 only."""

    def __init__(self, output_dir: str, resume_step: int):
        self.active = jax.process_index() == 0
        self.path = os.path.join(output_dir, METRICS)
        self.tensorboard = None
        if not self.active:
            return
        if os.path.exists(self.path):  # drop lines past the restored step (a killed run's last steps)
            with open(self.path) as f:
                lines = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            with open(self.path, "w") as f:
                f.writelines(lines)
        from tensorboardX import SummaryWriter

        self.tensorboard = SummaryWriter(os.path.join(output_dir, TENSORBOARD))

    def write(self, record: dict) -> None:
        if not self.active:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                self.tensorboard.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
