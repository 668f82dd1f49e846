"""The training config: frozen dataclasses read from YAML, with dotted `key=value` overrides.

Top-level keys are the run's (output_dir, steps, checkpoint_every, init, ...); sections `model`, `data`,
`optimizer`, `mesh` and `distributed` hold the rest. An unknown key anywhere is an error naming it.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

import yaml


class TrainConfigError(ValueError):
    """A training config that cannot be used (unknown key, bad value)."""


def _f(default, help: str):
    """A config field with its --help text."""
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """What to train (TheWorldConfig's fields where the names match)."""

    name: str = _f("tiny", '"tiny" (a tiny random TheWorld built in place), or what TheWorld.from_pretrained takes')
    random_init: bool = _f(False, "random parameters in the architecture of `name` (a directory with a Gemma 3 "
                                  "config.json and processor files; benchmarks)")
    cosmos_model_name: str | None = _f(None, "the Cosmos VAE (diffusers directory or hub id) when `name` is a Gemma 3")
    enable_world: bool = _f(True, "false: Gemma 3 alone (no world tokens)")
    world_projection_mode: str = _f("spatial", "spatial (one token per latent pixel) or channel (one per channel)")
    projection_architecture: str = _f("mlp", "mlp, mlp_no_final_gelu or linear")
    world_attention: str = _f("causal", "causal, or bidirectional (the world block sees itself whole)")
    vae_image_size: tuple[int, int] = _f((512, 512), "the image size fed to the VAE (sets the world token count)")
    freeze_gemma_vision: bool = _f(True, "SigLIP and the multimodal projector stay frozen")
    freeze_gemma_language: bool = _f(True, "the language model (and its tied embedding) stays frozen")
    freeze_cosmos_vae: bool = _f(True, "the VAE encoder stays frozen (the world projector always trains)")
    dtype: str = _f("bfloat16", "compute dtype (float32 or bfloat16); trained parameters keep float32 masters")
    remat: str = _f("none", "decoder remat policy: none, dots_saveable (keep matmul outputs) or full")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Training data (theworld_jax/train/formats.py reads each format as upstream does)."""

    format: str = _f("chat", "chat, text_label, llava, spatial_rgpt or vsr")
    train: str | None = _f(None, "the training file (JSON or JSONL); required")
    eval: str | None = _f(None, "a held-out file, evaluated every `eval_every` steps")
    image_folder: str | None = _f(None, "where relative image paths are looked up (default: the data file's folder)")
    batch_size: int = _f(4, "rows per device per micro-step (upstream's per-device batch)")
    max_length: int = _f(8192, "longer rows are skipped and counted (world tokens included)")
    pad_multiple: int = _f(128, "padded lengths are multiples of this (and of 128 on GPUs), world tokens included")
    length_buckets: int = _f(1, "how many padded lengths batches are bucketed into (each compiles once)")
    bucket_window: int = _f(64, "steps whose rows are sorted by length together before bucketing")
    loss_on: str = _f("assistant", "assistant (assistant turns only) or all (upstream's targets)")
    question_template: str = _f("Describe this image in detail.", "the prompt of vsr ({caption}) rows")
    draw_bboxes: bool = _f(False, "spatial_rgpt: draw the region boxes on the image as upstream does")
    num_samples: int | None = _f(None, "read at most this many rows")
    num_threads: int = _f(4, "image decoding threads")
    eval_rows: int | None = _f(None, "evaluate at most this many rows")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """optax AdamW with warmup, then linear (HF Trainer's) or cosine decay; global-norm clipping."""

    learning_rate: float = _f(1e-4, "peak learning rate")
    schedule: str = _f("linear", "decay after warmup: linear (to 0) or cosine (to 0)")
    warmup_steps: int = _f(100, "linear warmup from 0")
    b1: float = _f(0.9, "AdamW beta1")
    b2: float = _f(0.999, "AdamW beta2")
    eps: float = _f(1e-8, "AdamW epsilon")
    weight_decay: float = _f(0.01, "AdamW weight decay (not on biases and norms)")
    max_grad_norm: float = _f(1.0, "global-norm gradient clipping")
    accumulation: int = _f(1, "micro-batches per optimizer step (the loss stays a true mean over target tokens)")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """The device mesh (theworld_jax.sharding.make_mesh); one size may be -1 (the rest)."""

    data: int = _f(-1, "data-parallel size")
    fsdp: int = _f(1, "fully sharded data-parallel size (parameters split, batch split)")
    tensor: int = _f(1, "tensor-parallel size (heads and MLP split)")


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """jax.distributed: explicit coordinator flags; without them SLURM / cloud TPU are detected."""

    coordinator_address: str | None = _f(None, "HOST:PORT of process 0")
    num_processes: int | None = _f(None, "how many processes")
    process_id: int | None = _f(None, "this process's index")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """A training run."""

    output_dir: str = _f("runs/default", "checkpoints/, metrics.jsonl, tensorboard/, final/; the same dir resumes")
    steps: int | None = _f(None, "optimizer steps (wins over epochs)")
    epochs: float = _f(1.0, "epochs, when steps is not set")
    checkpoint_every: int = _f(500, "steps between Orbax checkpoints (async)")
    keep_checkpoints: int = _f(3, "how many recent checkpoints are kept")
    log_every: int = _f(10, "steps between metrics.jsonl / TensorBoard records")
    eval_every: int = _f(0, "steps between evaluations of data.eval (0: never)")
    seed: int = _f(42, "data order and new parameters")
    init: str | None = _f(None, "an earlier run's final/ to start from (a new stage: fresh optimizer, new freeze set)")
    progress_bar: bool = _f(True, "a progress bar on a terminal")
    save_final: bool = _f(True, "write final/ (TheWorld.save_pretrained) at the end")
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    mesh: MeshConfig = MeshConfig()
    distributed: DistributedConfig = DistributedConfig()

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))


def describe(cls=TrainConfig, prefix: str = "") -> str:
    """Every config key with its default and help, one a line (for --help)."""
    hints = typing.get_type_hints(cls)
    lines = []
    for field in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[field.name]):
            section = hints[field.name]
            lines.append(f"\n{prefix}{field.name}: {section.__doc__.splitlines()[0]}")
            lines.append(describe(section, f"{prefix}{field.name}."))
        else:
            default = yaml.safe_dump(_plain(field.default), default_flow_style=True).strip().removesuffix("\n...")
            lines.append(f"  {prefix}{field.name}={default}  {field.metadata.get('help', '')}")
    return "\n".join(lines)


CHOICES = {
    "data.format": ("chat", "text_label", "llava", "spatial_rgpt", "vsr"),
    "data.loss_on": ("assistant", "all"),
    "optimizer.schedule": ("linear", "cosine"),
    "model.dtype": ("float32", "bfloat16"),
}


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def _coerce(key: str, value: Any, hint) -> Any:
    """`value` (from YAML or a command line string) as the field's type, or a TrainConfigError."""
    args = typing.get_args(hint)
    optional = type(None) in args
    if value is None:
        if optional:
            return None
        raise TrainConfigError(f"{key} must not be null")
    base = next((a for a in args if a is not type(None)), hint) if isinstance(hint, types.UnionType) else hint
    origin = typing.get_origin(base)
    try:
        if origin is tuple:
            if isinstance(value, str):
                value = yaml.safe_load(value)
            inner = typing.get_args(base)[0]
            return tuple(_coerce(key, v, inner) for v in value)
        if base is bool:
            if isinstance(value, str):
                value = yaml.safe_load(value)
            if not isinstance(value, bool):
                raise ValueError
            return value
        if base is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if base is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if base is str:
            return str(value)
    except (TypeError, ValueError):
        pass
    raise TrainConfigError(f"{key}={value!r} is not a valid {getattr(base, '__name__', base)}")


def _build(cls, raw: dict[str, Any], prefix: str = ""):
    if not isinstance(raw, dict):
        raise TrainConfigError(f"{prefix.rstrip('.') or 'the config'} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - fields)
    if unknown:
        raise TrainConfigError(f"unknown config key {prefix + unknown[0]!r}; known keys here: {sorted(fields)}")
    values = {}
    for name, value in raw.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = _build(hint, value or {}, f"{prefix}{name}.")
        else:
            values[name] = _coerce(prefix + name, value, hint)
            allowed = CHOICES.get(prefix + name)
            if allowed and values[name] not in allowed:
                raise TrainConfigError(f"{prefix + name}={values[name]!r} is not supported; expected one of "
                                       f"{list(allowed)}")
    return cls(**values)


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply one `dotted.key=value` to the raw YAML dict (the value is read as YAML)."""
    if "=" not in item:
        raise TrainConfigError(f"override {item!r} is not key=value")
    key, text = item.split("=", 1)
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise TrainConfigError(f"override {item!r}: {part!r} is not a section")
    node[parts[-1]] = yaml.safe_load(text) if text.strip() else None


def load_config(path: str | None, overrides: list[str] = ()) -> TrainConfig:
    """The config of YAML file `path` (None: the defaults) with `overrides` ("a.b=value") applied."""
    raw: dict[str, Any] = {}
    if path is not None:
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
    for item in overrides:
        apply_override(raw, item)
    config = _build(TrainConfig, raw)
    check(config)
    return config


def check(config: TrainConfig) -> None:
    """Cross-field checks with one-line errors."""
    positive = {"data.batch_size": config.data.batch_size, "data.max_length": config.data.max_length,
                "data.pad_multiple": config.data.pad_multiple, "data.length_buckets": config.data.length_buckets,
                "optimizer.accumulation": config.optimizer.accumulation,
                "checkpoint_every": config.checkpoint_every, "keep_checkpoints": config.keep_checkpoints,
                "log_every": config.log_every}
    for key, value in positive.items():
        if value < 1:
            raise TrainConfigError(f"{key} must be >= 1, got {value}")
    if config.steps is not None and config.steps < 1:
        raise TrainConfigError(f"steps must be >= 1, got {config.steps}")
    if config.data.train is None:
        raise TrainConfigError("data.train is not set: the training file (JSON or JSONL)")
