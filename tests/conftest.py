"""Test-wide settings: offline hub, one torch thread, exact float32 matmuls in JAX."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)
jax.config.update("jax_default_matmul_precision", "highest")
