"""Test-wide settings: offline hub, one torch thread, exact float32 matmuls in JAX, and a fresh
persistent compilation cache for the command lines the tests run (not the user's)."""

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402
import torch  # noqa: E402

os.environ["THEWORLD_JAX_COMPILE_CACHE"] = tempfile.mkdtemp(prefix="theworld-jax-compile-cache-")
torch.set_num_threads(1)
jax.config.update("jax_default_matmul_precision", "highest")
