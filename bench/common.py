"""Shared pieces of the GPU scripts: the gemma-3-4b-it config, prompt ids, a timestamped log, timing."""

from __future__ import annotations

import json
import os
import statistics
import time

import torch

from tests.helpers.full_size import GEMMA3_4B_CONFIG  # noqa: F401 (re-exported for the GPU scripts)

TEXT_IDS = (3, 255999)  # random prompt words: no pad/eos/bos, below the image ids

_T0 = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - _T0:7.1f}s] {message}", flush=True)


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


def hf_config(tiny: bool):
    import transformers

    if tiny:
        from tests.helpers.tiny_gemma import tiny_gemma3_config
        return tiny_gemma3_config()
    return transformers.Gemma3Config(**GEMMA3_4B_CONFIG)


def randomize_gemma(model, seed: int, embed_std: float):
    """Re-draw what transformers initialises to zero or one: RMSNorms, LayerNorms, SigLIP biases, projector."""
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
