"""jax.distributed from the config or the environment (explicit flags, SLURM, cloud TPU)."""

from __future__ import annotations

import os

import jax

# Environments in which jax.distributed.initialize() finds the coordinator itself.
_AUTO_ENV = {
    "SLURM": lambda env: int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in env,
    "cloud TPU": lambda env: "," in env.get("TPU_WORKER_HOSTNAMES", ""),
    "JAX_COORDINATOR_ADDRESS": lambda env: bool(env.get("JAX_COORDINATOR_ADDRESS")),
}


def detect(env=None) -> str | None:
    """The multi-process environment found in `env` (default os.environ), or None."""
    env = os.environ if env is None else env
    return next((name for name, found in _AUTO_ENV.items() if found(env)), None)


def initialize(dist_cfg) -> str | None:
    """Start jax.distributed when asked (coordinator flags) or when the environment is multi-process;
    returns how it was started, None for a single process. Call before any other JAX work."""
    if dist_cfg.coordinator_address:
        if dist_cfg.num_processes is None or dist_cfg.process_id is None:
            raise ValueError("distributed.coordinator_address needs distributed.num_processes and "
                             "distributed.process_id")
        jax.distributed.initialize(dist_cfg.coordinator_address, dist_cfg.num_processes, dist_cfg.process_id)
        return "flags"
    found = detect()
    if found is not None:
        jax.distributed.initialize()
    return found
